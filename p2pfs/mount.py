"""The mount process: `p2pfs mount` and `p2pfs umount`.

Theory of operation
-------------------
A mount is one process running trio: it opens the drive through
`node.open_drive` (so `--peer` and `--timeout` mean what they mean
elsewhere), mounts a `fs.DriveFS` with `pyfuse3.init`, and runs
`pyfuse3.main()` beside the drive follower until one of:

* the file system is unmounted from outside (`p2pfs umount`, `fusermount3 -u`):
  `pyfuse3.main()` returns;
* SIGINT or SIGTERM: `pyfuse3.terminate()` ends the main loop.

Whatever ends it, `pyfuse3.close(unmount=True)` runs in a `finally`, which
unmounts lazily (MNT_DETACH), so it works even while files are open.  The
mount option `auto_unmount` is the backstop for a process killed with
SIGKILL: fusermount3 stays behind as a watchdog and unmounts when our
`/dev/fuse` descriptor closes.

A mount left behind anyway (a watchdog killed too, a crash of an older
build) answers `Transport endpoint is not connected`.  Mounting over it
would stack a second mount, so `prepare_mountpoint` first clears every
stale layer with `fusermount3 -uz` (found with `statfs`, which unlike
`stat` is never answered from the kernel's attribute cache).  A mount point that is live (another
p2pfs mount answering) is refused with a message saying to unmount it.

Readiness: the mount is ready once a `statfs` of the mount point, which the
kernel always passes to our own main loop, has returned.  `--daemon` is
`p2pfs.daemon`: the command re-runs itself in a new session and its
"mounted" line, sent once ready, is what the parent prints (the child's
stderr then goes to HOME/mount.log).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import pyfuse3
import trio

from p2pfs import daemon as daemon_mod, node, status
from p2pfs.crypto import encode_key
from p2pfs.drive import Drive
from p2pfs.errors import P2pfsError, ReadOnlyError, UsageError
from p2pfs.fs import DriveFS
from p2pfs.publish import prepare_version
from p2pfs.store import Staging
from p2pfs.wfs import DEFAULT_COMMIT_INTERVAL, WritableFS
from p2pfs.workspace import Workspace

__all__ = [
    "mount_command", "umount_command", "prepare_mountpoint", "clear_stale",
    "find_mount", "unmount", "READ_AHEAD_KB", "parse_mount_options", "MountOptions",
]


LOG_NAME = "mount.log"  # in the home: what a --daemon mount would have printed
READ_AHEAD_KB = 1024  # kernel read-ahead for the mount: 1 MiB reads (the FUSE maximum)
FUSERMOUNT = "fusermount3"
_MAX_STALE_LAYERS = 16
STOP_GRACE = 1.0  # s that requests in flight get to finish after SIGINT/SIGTERM
# A FUSE mount whose server died answers ENOTCONN (ECONNABORTED while the
# kernel is still aborting requests that were in flight).
_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)


class MountError(P2pfsError):
    """The kernel refused a mount or an unmount."""


# ------------------------------------------------------------------ mountinfo

def _unescape(field: str) -> str:
    """Undo /proc/self/mountinfo's octal escapes (\\040 for a space, ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    # mountinfo escapes bytes; undo the str-per-byte split for non-ASCII names
    return "".join(out).encode("latin-1", "surrogateescape").decode("utf-8", "surrogateescape")


def find_mount(path: str) -> tuple[str, str] | None:
    """(fstype, source) of the topmost mount at `path`, or None if it is not a mount point."""
    path = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for raw in f:
            line = raw.decode("latin-1")
            left, _, right = line.partition(" - ")
            fields = left.split()
            rest = right.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            if _unescape(fields[4]) == path:
                found = (rest[0], _unescape(rest[1]))
    return found


def _is_p2pfs(mount: tuple[str, str] | None) -> bool:
    return mount is not None and (mount[0] == "fuse.p2pfs" or mount[1].startswith("p2pfs://"))


# ------------------------------------------------------- stale mounts, umount

def _fusermount(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([FUSERMOUNT, *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise MountError(f"{FUSERMOUNT} is not installed; install the fuse3 package") from None


def clear_stale(path: str) -> int:
    """Lazily unmount every dead FUSE mount stacked at `path`; how many were cleared."""
    cleared = 0
    while cleared < _MAX_STALE_LAYERS:
        # statfs always reaches the server (stat may be answered from the
        # kernel's attribute cache even when the server is long dead).
        try:
            os.statvfs(path)
            return cleared
        except OSError as exc:
            if exc.errno not in _DEAD:
                return cleared
        done = _fusermount("-u", "-z", "-q", path)
        if done.returncode != 0:
            raise MountError(f"{path}: cannot clear a stale mount ({done.stderr.strip()}); "
                             f"try '{FUSERMOUNT} -uz {path}' as its owner")
        cleared += 1
    raise MountError(f"{path}: more than {_MAX_STALE_LAYERS} stale mounts are stacked here")


def prepare_mountpoint(path: str, allow_non_empty: bool = False) -> str:
    """Absolute mount point, checked and cleared of stale mounts.  UsageError if
    unusable, or not empty (its files would be hidden) unless `allow_non_empty`."""
    path = os.path.abspath(path)
    if clear_stale(path):
        print(f"p2pfs: cleared a stale mount at {path}", file=sys.stderr)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such directory; create it first (mkdir -p {path})") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is not a directory")
    mount = find_mount(path)
    if mount is not None and mount[0].startswith("fuse"):
        raise UsageError(f"{path} is already mounted ({mount[1]}); "
                         f"run 'p2pfs umount {path}' first")
    if not allow_non_empty:
        try:
            with os.scandir(path) as entries:
                busy = next(entries, None) is not None
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from None
        if busy:
            raise UsageError(f"{path} is not empty: the mount would hide its files; "
                             "mount on an empty directory, or give --allow-non-empty")
    return path


def unmount(path: str) -> str:
    """Unmount a p2pfs mount; returns "unmounted" or "lazily unmounted" (files were open)."""
    path = os.path.abspath(path)
    mount = find_mount(path)
    if mount is None:
        raise UsageError(f"{path} is not mounted")
    if not _is_p2pfs(mount):
        raise UsageError(f"{path} is not a p2pfs mount (it is {mount[0]} from {mount[1]})")
    done = _fusermount("-u", "-q", path)
    if done.returncode == 0:
        return "unmounted"
    # Busy (files open, a shell's working directory) or dead: detach it now;
    # the kernel finishes the unmount when the last user lets go.
    lazy = _fusermount("-u", "-z", "-q", path)
    if lazy.returncode != 0:
        raise MountError(f"{path}: cannot unmount ({(lazy.stderr or done.stderr).strip()})")
    return "lazily unmounted"


def umount_command(mountpoint: str) -> int:
    how = unmount(mountpoint)
    if how != "unmounted":
        print(f"p2pfs: {os.path.abspath(mountpoint)} {how}: files were still open there",
              file=sys.stderr)
    return 0


# ------------------------------------------------------------- -o options

# Options of `-o`, as mount(8), mount.fuse3 and /etc/fstab pass them.
KERNEL_FLAGS = {"noexec", "noatime", "nodiratime", "relatime", "strictatime", "lazytime",
                "sync", "dirsync"}   # passed on to the kernel
IGNORED = {"ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "atime", "diratime", "async",
           "auto", "noauto", "user", "nouser", "users", "owner", "group", "defaults",
           "_netdev", "nofail", "silent", "loud"}  # said by mount(8) and fstab; p2pfs is ro,nodev,nosuid
VALUED = ("timeout", "cache_size", "peer", "listen", "bootstrap", "home")
FLAGS = ("allow_other", "nonempty", "no_lan", "no_dht")


@dataclass
class MountOptions:
    """What `-o opt[,opt...]` said (None: not said)."""

    allow_other: bool = False
    allow_non_empty: bool = False  # nonempty (FUSE 2's name): --allow-non-empty
    timeout: str | None = None
    cache_size: str | None = None
    peers: list[str] = field(default_factory=list)
    bootstrap: list[str] | None = None
    listen: str | None = None
    home: str | None = None
    lan: bool | None = None
    dht: bool | None = None
    kernel: list[str] = field(default_factory=list)


def parse_mount_options(texts: Sequence[str]) -> MountOptions:
    """`-o` texts (comma-separated) -> MountOptions.  UsageError for an unknown option."""
    out = MountOptions()
    for text in texts:
        for opt in filter(None, (o.strip() for o in text.split(","))):
            name, eq, value = opt.partition("=")
            if opt in IGNORED or name.startswith("x-") or name == "comment":
                continue
            if opt in KERNEL_FLAGS:
                out.kernel.append(opt)
            elif opt == "allow_other":
                out.allow_other = True
            elif opt == "nonempty":
                out.allow_non_empty = True
            elif opt in ("no_lan", "no_dht"):
                setattr(out, opt[3:], False)
            elif name in VALUED and eq and value:
                if name == "peer":
                    out.peers.append(value)
                elif name == "bootstrap":
                    out.bootstrap = (out.bootstrap or []) + [value]
                else:
                    setattr(out, name, value)
            else:
                raise UsageError(f"unknown mount option {opt!r} (p2pfs takes "
                                 f"{', '.join(FLAGS)}, {', '.join(v + '=' for v in VALUED)}, "
                                 f"the kernel's {', '.join(sorted(KERNEL_FLAGS))}, and ignores "
                                 "ro, rw, dev, suid, exec, auto, user, _netdev, nofail, x-*)")
    return out


# ------------------------------------------------------------------ mounting

def mount_options(key: bytes, allow_other: bool, writable: bool = False,
                  kernel: Sequence[str] = ()) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    opts |= {f"fsname=p2pfs://{encode_key(key)}", "subtype=p2pfs", "auto_unmount"}
    if not writable:
        opts.add("ro")
    if allow_other:
        opts.add("allow_other")
    opts.update(kernel)
    return opts


def _fuse_init(ops: DriveFS, mountpoint: str, options: set[str]) -> None:
    """pyfuse3.init, with fusermount3's stderr captured for the error message.

    The auto_unmount watchdog inherits the stderr it is started with and
    would later print "not mounted" into ours; it gets a temporary file."""
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            pyfuse3.init(ops, mountpoint, options)
        except RuntimeError:
            os.dup2(saved, 2)
            err.seek(0)
            detail = err.read().decode(errors="replace").strip().splitlines()
            why = detail[-1] if detail else "see dmesg"
            hint = ""
            if "allow_other" in why or "user_allow_other" in why:
                hint = "; add user_allow_other to /etc/fuse.conf or drop --allow-other"
            raise MountError(f"cannot mount at {mountpoint}: {why}{hint}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _answering(mountpoint: str) -> None:
    """Return once the mount answers (from a worker thread: our loop serves it),
    after asking the kernel for 1 MiB reads (default 128 KiB)."""
    os.statvfs(mountpoint)
    dev = os.stat(mountpoint).st_dev
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError:
        pass  # not root: the kernel's default works, only slower


@dataclass
class Writable:
    """`--rw`: the owner's writable mount."""

    commit_interval: float = DEFAULT_COMMIT_INTERVAL  # s after the last change
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)


async def serve(store, ref: str, mountpoint: str, *, allow_other: bool = False,
                allow_non_empty: bool = False, net: node.NetOptions | None = None,
                ready: Callable[[DriveFS], None] | None = None,
                writable: Writable | None = None, cache_size: int | None = None,
                kernel: Sequence[str] = ()) -> None:
    """Mount `ref` (KEY or KEY@N) at `mountpoint` and serve until unmounted or signalled.

    SIGINT/SIGTERM before the mount is up abandon the opening; after, they
    end the FUSE main loop, and the mount is undone in a `finally`
    (`writable`: after the last commit)."""
    mountpoint = prepare_mountpoint(mountpoint, allow_non_empty)
    net = net or node.NetOptions()
    mounted = False
    session = trio.CancelScope()

    async def run_session(ops: DriveFS, key: bytes,
                          peers: Callable[[], list[dict]] | None = None) -> None:
        nonlocal mounted, mountpoint
        mountpoint = prepare_mountpoint(mountpoint, allow_non_empty)
        _fuse_init(ops, mountpoint, mount_options(key, allow_other, writable is not None, kernel))
        mounted = True
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(ops.run)
                await nursery.start(status.publish, store.home, "mount",
                                    lambda: _state(ops, mountpoint, writable is not None), peers)

                async def announce():
                    await trio.to_thread.run_sync(_answering, mountpoint)
                    if ready is not None:
                        ready(ops)

                nursery.start_soon(announce)
                with session:
                    await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            mounted = False
            pyfuse3.close(unmount=True)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:

            async def stop_on_signal():
                async for _ in signals:
                    if not mounted:
                        outer.cancel_scope.cancel()
                        return
                    # Let requests in flight finish, but not wait a whole
                    # fetch timeout for a read no peer answers.
                    pyfuse3.terminate()
                    await trio.sleep(STOP_GRACE)
                    session.cancel()
                    return

            outer.start_soon(stop_on_signal)
            if writable is not None:
                async with _writable_fs(store, ref, net, writable) as ops:
                    try:
                        await run_session(ops, ops.drive.key)
                    finally:
                        await ops.close()
            else:
                async with node.open_drive(store, ref, net=net, cache_size=cache_size) as drive:
                    # Read-ahead pays only when blocks come from peers; P2PFS_READAHEAD=0
                    # turns it off (for measuring it).
                    prefetch = drive.source is not None and os.environ.get("P2PFS_READAHEAD") != "0"
                    await run_session(DriveFS(drive, live=drive.live, prefetch=prefetch), drive.key,
                                      (lambda: drive.source.peer_info(drive.key))
                                      if drive.source is not None else None)
            outer.cancel_scope.cancel()


@asynccontextmanager
async def _writable_fs(store, ref: str, net: node.NetOptions, opts: Writable):
    """The writable file system of an owned drive, holding its writer lock,
    with a fresh staging area, and serving the drive to peers if `net` says so."""
    key, version = node.parse_drive_ref(ref)
    if version is not None:
        raise UsageError("--rw mounts the newest version to write the next one: "
                         "give the key without @VERSION")
    drive = node.local_drive(store, key)
    try:
        drive.seed()
    except ReadOnlyError:
        raise ReadOnlyError(f"drive {drive.key_text} cannot be mounted with --rw: its secret key "
                            f"file {store.key_path(drive.key_text)} is not in this home "
                            f"({store.home}); mount it without --rw to read it") from None
    with store.writer_lock(key, f"drive {drive.key_text}"):
        pad_to = prepare_version(drive, opts.log)
        staging, left = Staging.open_fresh(store.home, key)
        if left is not None:
            opts.log(f"p2pfs: a writable mount of drive {drive.key_text} was killed before it "
                     f"committed {left[0]} files ({left[2]} bytes in {left[1]} blocks); those "
                     f"changes are gone, the drive is at version {drive.version}, its last commit")
        clean = False
        try:
            workspace = Workspace(drive, staging, pad_to=pad_to)
            async with AsyncExitStack() as stack:
                serving = None
                if net.networked or net.listen is not None:
                    swarm = await stack.enter_async_context(node.open_network(
                        store, net, on_listening=lambda addrs: [
                            opts.log(f"p2pfs: listening on {a}") for a in addrs]))
                    serving = swarm.add_drive(Drive(store, key))

                def committed(result) -> None:
                    if serving is not None:
                        serving.reload_head()  # peers hear of it now, not at the next poll
                    opts.log(f"p2pfs: {time.strftime('%H:%M:%S')} committed version "
                             f"{result.version}: {result.new_content_blocks} new content blocks, "
                             f"{result.reused_blocks} reused, {result.index_blocks} index "
                             f"blocks, length {result.length}")

                ops = WritableFS(workspace, commit_interval=opts.commit_interval,
                                 on_commit=committed)
                yield ops
                clean = not workspace.changed
        finally:
            staging.close(remove=clean)


def _state(ops: DriveFS, mountpoint: str, writable: bool = False) -> dict:
    """What `p2pfs status` shows of this mount."""
    drive = ops.drive
    source = drive.source
    return {"mountpoint": mountpoint,
            "drives": [{"key": encode_key(drive.key), "version": drive.version,
                        "length": drive.length,
                        "state": "writable" if writable else "live" if ops.live else "fixed",
                        "bytes_held": drive.store.held(drive.key)[1]}],
            "peers": len(source.peer_info(drive.key)) if source is not None else 0}


def _ready_message(ops: DriveFS, mountpoint: str) -> str:
    drive = ops.drive
    how = "writable" if isinstance(ops, WritableFS) else "live" if ops.live else "fixed"
    return (f"p2pfs: mounted {encode_key(drive.key)}@{drive.version} ({how}) at "
            f"{os.path.abspath(mountpoint)}")


def mount_command(*, home, ref: str, mountpoint: str, daemon: bool = False,
                  allow_other: bool = False, allow_non_empty: bool = False,
                  net: node.NetOptions | None = None,
                  argv: Sequence[str] | None = None, writable: Writable | None = None,
                  cache_size: int | None = None, kernel: Sequence[str] = ()) -> int:
    """`p2pfs mount`: foreground by default; `daemon` re-runs `argv` detached."""
    ready_fd = daemon_mod.ready_fd()
    if daemon and ready_fd is None:
        if argv is None:
            raise ValueError("daemon mode needs the command line to re-run")
        return daemon_mod.spawn(list(argv), f"the mount process for {mountpoint}")

    def ready(ops: DriveFS) -> None:
        message = _ready_message(ops, mountpoint)
        if ready_fd is None:
            print(message + "; Ctrl-C or 'p2pfs umount' to unmount", file=sys.stderr, flush=True)
            return
        # warnings (an EIO's cause) and any crash go to HOME/mount.log
        daemon_mod.detach(ready_fd, message, os.path.join(store.home, LOG_NAME))

    store = node.open_store(home)
    try:
        trio.run(lambda: serve(store, ref, mountpoint, allow_other=allow_other,
                               allow_non_empty=allow_non_empty, net=net, ready=ready,
                               writable=writable, cache_size=cache_size, kernel=kernel))
    finally:
        store.close()
    return 0
