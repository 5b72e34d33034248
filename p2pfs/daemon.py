"""`--daemon`: run a long-lived command (mount, share) in the background and
return once it is ready.

Theory of operation
-------------------
`spawn` re-executes the same command line (`python -P -m p2pfs ARGV`, with
this package's directory first on PYTHONPATH, so that a `p2pfs` folder in
the current directory cannot take its place) in a new session with `READY_ENV` naming the write end of a pipe, and waits.  The
child, once it is ready, calls `detach`: it points its stdin and stdout at
/dev/null and its stderr at a log file in the home (so its warnings and any
crash are kept), then writes its ready message to the pipe and closes it.
The parent prints the message (every line but the last on standard output,
the last on standard error with "(pid N)" added) and returns 0.  If the pipe
closes without a message, the child failed: the parent prints what it wrote
on standard error and returns its exit status.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

READY_ENV = "P2PFS_MOUNT_READY_FD"


def ready_fd() -> int | None:
    """The pipe to report readiness on, if this process is a daemon's child
    (taken out of the environment, so that its own children do not see it)."""
    fd = os.environ.pop(READY_ENV, None)
    return None if fd is None else int(fd)


def detach(fd: int, message: str, log_path: str | os.PathLike) -> None:
    """Leave the parent's terminal: stdio to /dev/null and `log_path`, then
    send `message` (lines) to the waiting parent."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        logfd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        logfd = os.dup(devnull)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(logfd, 2)
    os.close(devnull)
    os.close(logfd)
    os.chdir("/")  # a daemon keeps no directory busy (every path it uses is absolute)
    last = message.rstrip("\n").splitlines()[-1]
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {last} (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    os.write(fd, message.encode() + b"\n")
    os.close(fd)


def command(argv: list[str]) -> tuple[list[str], dict]:
    """The command line and environment that re-run this p2pfs as the daemon.

    The child must import this very p2pfs, whatever the current directory
    holds: ``-P`` keeps the current directory off ``sys.path`` (a folder
    named ``p2pfs`` there would otherwise win), and the directory this
    package was imported from goes first on PYTHONPATH."""
    import p2pfs
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(p2pfs.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return [sys.executable, "-P", "-m", "p2pfs", *argv], env


def spawn(argv: list[str], what: str) -> int:
    """Re-run `p2pfs ARGV` in a new session and wait until it is ready (or failed).

    `what` names it in the message for a child that exits 0 before it was ready."""
    r, w = os.pipe()
    cmd, env = command(argv)
    env[READY_ENV] = str(w)
    child = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        pass_fds=(w,), start_new_session=True, env=env,
    )
    os.close(w)
    message = b""
    errors = b""
    open_fds = {r: "ready", child.stderr.fileno(): "stderr"}
    # the message is one write of less than PIPE_BUF bytes: one read has it all (and
    # the pipe may stay open: a mount's fusermount3 watchdog inherits it)
    while "ready" in open_fds.values() and not message:
        readable, _, _ = select.select(list(open_fds), [], [])
        for fd in readable:
            chunk = os.read(fd, 65536)
            if open_fds[fd] == "ready":
                message += chunk
            else:
                errors += chunk
            if not chunk:
                del open_fds[fd]
    os.close(r)
    if message:
        # What the child said before it was ready (a peer dropped, say) is not
        # lost: it pointed its stderr at its log before saying "ready", so what
        # is left in the pipe is all there is (read without waiting, in case
        # something else still holds the pipe).
        os.set_blocking(child.stderr.fileno(), False)
        try:
            while chunk := os.read(child.stderr.fileno(), 65536):
                errors += chunk
        except BlockingIOError:
            pass
        child.stderr.close()
        sys.stderr.write(errors.decode(errors="replace"))
        lines = message.decode(errors="replace").rstrip("\n").splitlines()
        for line in lines[:-1]:
            print(line, flush=True)
        sys.stderr.write(lines[-1] + f" (pid {child.pid})\n")
        return 0
    errors += child.stderr.read()
    child.stderr.close()
    code = child.wait()
    sys.stderr.write(errors.decode(errors="replace"))
    if code == 0:
        print(f"p2pfs: {what} exited before it was ready", file=sys.stderr)
        return 1
    return code
