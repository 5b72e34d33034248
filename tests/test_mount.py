"""Real FUSE mounts of local drives made with the real CLI (issue 4).

Every mount runs in its own process and is always unmounted in a `finally`
(`fusermount3 -uz`, then the process is killed if it is still there).  Waits
poll with a deadline; nothing sleeps to wait for something.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import (REPO, cli_command, cli_env, create, file_digest, find_once, flip_byte,
                     make_tree, run_cli, write_random)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                reason="needs /dev/fuse and fusermount3 (apt-get install fuse3)")

DEADLINE = 20.0  # generous: the machine is shared; polls return as soon as things are true


# ------------------------------------------------------------------- helpers

def wait_until(predicate, timeout: float = DEADLINE, what: str = "condition", interval: float = 0.01):
    """Poll `predicate` until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def mount_layers(mnt) -> list[str]:
    """fstype of every mount stacked at `mnt` (from /proc/self/mountinfo)."""
    from p2pfs.mount import _unescape
    path = os.path.abspath(mnt)
    layers = []
    with open("/proc/self/mountinfo", "rb") as f:
        for raw in f:
            left, _, right = raw.decode("latin-1").partition(" - ")
            if _unescape(left.split()[4]) == path:
                layers.append(right.split()[0])
    return layers


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def force_unmount(mnt) -> None:
    for _ in range(8):
        if not mount_layers(mnt):
            return
        subprocess.run(["fusermount3", "-u", "-z", "-q", str(mnt)], capture_output=True)


def stop(pid: int) -> None:
    if not alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not alive(pid), 10, f"mount process {pid} to exit")
    except (ProcessLookupError, AssertionError):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def daemon_pid(stderr: str) -> int:
    m = re.search(r"\(pid (\d+)\)", stderr)
    assert m, f"no pid in the daemon's message: {stderr!r}"
    return int(m.group(1))


@contextmanager
def mounted(home, ref: str, mnt: Path, *extra):
    """`p2pfs mount --daemon`; yields the mount process id; always unmounts."""
    mnt.mkdir(exist_ok=True)
    pid = None
    try:
        res = run_cli(home, "mount", ref, mnt, "--daemon", *extra, timeout=120)
        pid = daemon_pid(res.stderr)
        yield pid
    finally:
        force_unmount(mnt)
        if pid is not None:
            stop(pid)


@contextmanager
def foreground(home, ref: str, mnt: Path, *extra):
    """`p2pfs mount` in the foreground (a child process); yields the Popen once mounted."""
    mnt.mkdir(exist_ok=True)
    log = open(mnt.parent / f"{mnt.name}.log", "w+")
    proc = subprocess.Popen(cli_command(home, "mount", ref, mnt, *extra), env=cli_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=log,
                            # a background job of a non-interactive shell ignores SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def ready():
            # read through a file description of our own (see test_mount_net.seeding)
            text = Path(log.name).read_text(errors="replace")
            if proc.poll() is not None:
                raise AssertionError(f"mount exited {proc.returncode}: {text}")
            return "mounted" in text
        wait_until(ready, what="the foreground mount")
        yield proc
    finally:
        force_unmount(mnt)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


def listing(root) -> list[str]:
    """`find -printf '%p %s %m %l'` run from `root`, sorted."""
    out = subprocess.run(["find", ".", "-printf", r"%p %s %m %l\n"], cwd=root, check=True,
                         capture_output=True).stdout
    return sorted(out.decode("utf-8", "surrogateescape").splitlines())


def mtimes(root) -> dict[str, int]:
    root = os.path.abspath(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ["."]:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.lstat(full).st_mtime_ns
    return out


def same_tree(src, mnt) -> None:
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(mnt)],
                          capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert listing(mnt) == listing(src)
    assert mtimes(mnt) == mtimes(src)


def import_dir(home, key, src) -> None:
    run_cli(home, "import", key, src, "-q")


# ------------------------------------------------------------------- tests

def test_tree_round_trip(tmp_path, home):
    """Acceptance 1 (small): nested dirs, symlinks, exec bits, empty files, unicode names."""
    src = make_tree(tmp_path / "src", files=120)
    (src / "exec-only").write_bytes(b"x")
    (src / "exec-only").chmod(0o711)
    key = create(home, src)
    with mounted(home, key, tmp_path / "mnt"):
        same_tree(src, tmp_path / "mnt")
        st = os.stat(tmp_path / "mnt" / "run.sh")
        assert st.st_mode & 0o777 == 0o755 and os.access(tmp_path / "mnt" / "run.sh", os.X_OK)
        assert os.readlink(tmp_path / "mnt" / "link-dangling") == "does/not/exist"
        assert sorted(os.listdir(tmp_path / "mnt")) == sorted(os.listdir(src))


@pytest.mark.slow
def test_tree_round_trip_1gib(tmp_path, home):
    """Acceptance 1 with the 1 GiB file: diff -r, find -printf and mtimes match."""
    src = make_tree(tmp_path / "src", files=60, big=1 << 30)
    key = create(home, src)
    with mounted(home, key, tmp_path / "mnt"):
        same_tree(src, tmp_path / "mnt")
        assert file_digest(tmp_path / "mnt" / "big.bin") == file_digest(src / "big.bin")


def test_live_update_within_a_second(tmp_path, home):
    """Acceptance 3: a new version shows within one second, also for a file whose
    pages are already cached; a file descriptor opened before the update still
    reads the version it was opened at (issue 7, finding 13)."""
    src = make_tree(tmp_path / "src", files=20)
    write_random(src / "data.bin", 300_000, seed=5)
    (src / "note.txt").write_bytes(b"version one\n")
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt):
        assert (mnt / "note.txt").read_bytes() == b"version one\n"
        assert (mnt / "data.bin").read_bytes() == (src / "data.bin").read_bytes()  # cached now
        ino = os.stat(mnt / "note.txt").st_ino
        run_ino = os.stat(mnt / "run.sh").st_ino
        held_open = open(mnt / "note.txt", "rb")
        held_open.read()
        # Same sizes: only invalidation, not a size change, can reveal the new bytes.
        (src / "note.txt").write_bytes(b"version two\n")
        write_random(src / "data.bin", 300_000, seed=6)
        (src / "added.txt").write_bytes(b"new file\n")
        os.remove(src / "empty")
        (src / "run.sh").chmod(0o700)  # metadata only
        import_dir(home, key, src)
        start = time.monotonic()
        wait_until(lambda: (mnt / "added.txt").exists()
                   and (mnt / "note.txt").read_bytes() == b"version two\n"
                   and file_digest(mnt / "data.bin") == file_digest(src / "data.bin"),
                   timeout=1.0, what="the new version in the mount", interval=0.02)
        took = time.monotonic() - start
        assert not (mnt / "empty").exists()
        held_open.seek(0)
        assert held_open.read() == b"version one\n"  # an open file is a snapshot
        assert os.fstat(held_open.fileno()).st_nlink == 0  # like a file replaced by rename
        held_open.close()
        assert os.stat(mnt / "note.txt").st_ino != ino  # new content, new inode
        assert os.stat(mnt / "run.sh").st_ino == run_ino  # inode numbers are stable
        assert os.stat(mnt / "run.sh").st_mode & 0o777 == 0o700
        assert os.getxattr(mnt, "user.p2pfs.version") == b"2"
        same_tree(src, mnt)
        print(f"new version visible after {took:.3f} s")


def test_fixed_version_does_not_move(tmp_path, home):
    src = make_tree(tmp_path / "src", files=10)
    (src / "note.txt").write_bytes(b"one\n")
    key = create(home, src)
    (src / "note.txt").write_bytes(b"two\n")
    import_dir(home, key, src)  # version 2
    with mounted(home, f"{key}@1", tmp_path / "v1"), mounted(home, key, tmp_path / "live"):
        assert (tmp_path / "v1" / "note.txt").read_bytes() == b"one\n"
        assert (tmp_path / "live" / "note.txt").read_bytes() == b"two\n"
        (src / "note.txt").write_bytes(b"three\n")
        import_dir(home, key, src)  # version 3
        wait_until(lambda: (tmp_path / "live" / "note.txt").read_bytes() == b"three\n",
                   what="the live mount to show version 3")
        assert (tmp_path / "v1" / "note.txt").read_bytes() == b"one\n"
        assert os.getxattr(tmp_path / "v1", "user.p2pfs.version") == b"1"
        assert os.getxattr(tmp_path / "live", "user.p2pfs.version") == b"3"


def test_writes_are_refused_with_erofs(tmp_path, home):
    src = make_tree(tmp_path / "src", files=5)
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt):
        attempts = [
            lambda: open(mnt / "run.sh", "r+b"),
            lambda: open(mnt / "run.sh", "wb"),
            lambda: open(mnt / "run.sh", "ab"),
            lambda: open(mnt / "new.txt", "wb"),
            lambda: os.open(mnt / "run.sh", os.O_RDONLY | os.O_TRUNC),
            lambda: os.mkdir(mnt / "newdir"),
            lambda: os.remove(mnt / "run.sh"),
            lambda: os.rmdir(mnt / "d0-0"),
            lambda: os.rename(mnt / "run.sh", mnt / "moved.sh"),
            lambda: os.symlink("x", mnt / "newlink"),
            lambda: os.link(mnt / "run.sh", mnt / "hard"),
            lambda: os.chmod(mnt / "run.sh", 0o600),
            lambda: os.utime(mnt / "run.sh", (0, 0)),
            lambda: os.truncate(mnt / "run.sh", 0),
            lambda: os.setxattr(mnt / "run.sh", "user.x", b"1"),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS, (attempt, info.value)
        assert os.access(mnt / "run.sh", os.R_OK) and not os.access(mnt / "run.sh", os.W_OK)
        for missing, code in (("nothing-here", errno.ENOENT), ("x" * 300, errno.ENAMETOOLONG),
                              ("run.sh/below", errno.ENOTDIR)):
            with pytest.raises(OSError) as info:
                os.stat(mnt / missing)
            assert info.value.errno == code, missing
        same_tree(src, mnt)


def test_xattrs(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "three-blocks.bin", 2 * 65536 + 10, seed=3)
    (src / "zero").write_bytes(b"")
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt):
        f = mnt / "three-blocks.bin"
        assert os.getxattr(f, "user.p2pfs.key") == key.encode()
        assert os.getxattr(f, "user.p2pfs.version") == b"1"
        assert os.getxattr(f, "user.p2pfs.blocks_held") == b"3"
        assert os.getxattr(mnt / "zero", "user.p2pfs.blocks_held") == b"0"
        # answered by name, never listed: `cp -a` out of the mount copies none
        assert os.listxattr(f) == [] and os.listxattr(mnt) == []
        with pytest.raises(OSError) as info:
            os.getxattr(mnt, "user.p2pfs.blocks_held")
        assert info.value.errno == errno.ENODATA
        with pytest.raises(OSError) as info:
            os.getxattr(f, "user.nothing")
        assert info.value.errno == errno.ENODATA
        # No ACLs or security labels: "not supported", so `ls -l` stops asking
        for name in ("system.posix_acl_access", "security.selinux", "trusted.x"):
            with pytest.raises(OSError) as info:
                os.getxattr(f, name, follow_symlinks=False)
            assert info.value.errno == errno.EOPNOTSUPP, name
        vfs = os.statvfs(mnt)  # used: the drive's 3 blocks; entries: the root and 2 files
        assert vfs.f_bsize == 65536 and vfs.f_files == 3 and vfs.f_blocks - vfs.f_bfree == 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_even_with_a_file_open(tmp_path, home, sig):
    src = make_tree(tmp_path / "src", files=5)
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with foreground(home, key, mnt) as proc:
        fd = os.open(mnt / "run.sh", os.O_RDONLY)
        dir_fd = os.open(mnt / "d0-0", os.O_RDONLY)
        try:
            assert os.read(fd, 2) == b"#!"
            proc.send_signal(sig)
            assert proc.wait(timeout=DEADLINE) == 0
            assert mount_layers(mnt) == []
            assert not os.path.ismount(mnt)
        finally:
            for held in (fd, dir_fd):
                try:
                    os.close(held)
                except OSError as exc:  # the server is gone: the close's flush cannot reach it
                    assert exc.errno == errno.ENOTCONN


def test_daemon_returns_only_when_ready(tmp_path, home):
    src = make_tree(tmp_path / "src", files=5)
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt) as pid:
        # No polling: the mount must already answer when --daemon has returned.
        assert mount_layers(mnt) == ["fuse.p2pfs"]
        assert (mnt / "run.sh").read_bytes() == (src / "run.sh").read_bytes()
        assert alive(pid)
        assert f"(pid {pid})" in (home / "mount.log").read_text()  # where its warnings go
        # A second mount on the same live mount point is refused, not stacked.
        again = run_cli(home, "mount", key, mnt, "--daemon", check=False)
        assert again.returncode == 2 and "already mounted" in again.stderr
        assert mount_layers(mnt) == ["fuse.p2pfs"]
        run_cli(home, "umount", mnt)
        assert mount_layers(mnt) == []
        wait_until(lambda: not alive(pid), what="the mount process to exit after umount")


def test_daemon_reports_errors_and_exits(tmp_path, home):
    src = make_tree(tmp_path / "src", files=3)
    key = create(home, src)
    (tmp_path / "mnt").mkdir()
    bad = run_cli(home, "mount", f"{key}@7", tmp_path / "mnt", "--daemon", check=False)
    assert bad.returncode == 1 and "no version 7" in bad.stderr
    missing = run_cli(home, "mount", key, tmp_path / "nowhere", "--daemon", check=False)
    assert missing.returncode == 2 and "create it first" in missing.stderr
    notdir = run_cli(home, "mount", key, src / "run.sh", check=False)
    assert notdir.returncode == 2 and "not a directory" in notdir.stderr
    assert mount_layers(tmp_path / "mnt") == []
    nomount = run_cli(home, "umount", tmp_path / "mnt", check=False)
    assert nomount.returncode == 2 and "not mounted" in nomount.stderr


def test_umount_with_open_file(tmp_path, home):
    src = make_tree(tmp_path / "src", files=5)
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt) as pid:
        f = open(mnt / "run.sh", "rb")
        try:
            res = run_cli(home, "umount", mnt)
            assert "lazily unmounted" in res.stderr
            assert mount_layers(mnt) == []
        finally:
            f.close()
        wait_until(lambda: not alive(pid), what="the mount process to exit")


@pytest.mark.parametrize("watchdog_too", [False, True], ids=["process", "process+watchdog"])
def test_kill_9_then_mount_again(tmp_path, home, watchdog_too):
    """Acceptance 5: after kill -9 the next mount succeeds without manual clean-up.

    With the fusermount3 watchdog killed too, a dead mount stays behind
    ("Transport endpoint is not connected"); the next mount must clear it."""
    src = make_tree(tmp_path / "src", files=5)
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt) as pid:
        if watchdog_too:
            watchdogs = [int(p) for p in subprocess.run(["pgrep", "-P", str(pid), "fusermount3"],
                                                        capture_output=True, text=True).stdout.split()]
            assert watchdogs, "no auto_unmount watchdog found"
            for w in watchdogs:
                os.kill(w, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), what="the killed process to go")
        if watchdog_too:
            with pytest.raises(OSError) as info:
                os.listdir(mnt)
            assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        with mounted(home, key, mnt):
            assert mount_layers(mnt) == ["fuse.p2pfs"]
            assert (mnt / "run.sh").read_bytes() == (src / "run.sh").read_bytes()


def test_damaged_block_gives_eio_never_bytes(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "good.bin", 200_000, seed=8)
    write_random(src / "bad.bin", 200_000, seed=9)
    key = create(home, src)
    needle = (src / "bad.bin").read_bytes()[70_000:70_032]  # inside the second block
    flip_byte(home / "store" / "data.mdb", find_once(home / "store" / "data.mdb", needle))
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt):
        with open(mnt / "bad.bin", "rb") as f:
            assert f.read(65536) == (src / "bad.bin").read_bytes()[:65536]  # first block is fine
            with pytest.raises(OSError) as info:
                f.read(65536)
            assert info.value.errno == errno.EIO
        assert (mnt / "good.bin").read_bytes() == (src / "good.bin").read_bytes()


def test_big_directory_listing(tmp_path, home):
    """readdirplus over thousands of entries, repeated: counts and attributes hold up."""
    src = tmp_path / "src"
    (src / "many").mkdir(parents=True)
    for i in range(3000):
        (src / "many" / f"file-{i:05d}").write_bytes(str(i).encode())
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt):
        for _ in range(2):
            names = sorted(os.listdir(mnt / "many"))
            assert names == sorted(os.listdir(src / "many"))
            sizes = {e.name: e.stat().st_size for e in os.scandir(mnt / "many")}
            assert sizes == {n: len(str(int(n[5:]))) for n in names}
        assert (mnt / "many" / "file-02999").read_bytes() == b"2999"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize("allow_other", [False, True], ids=["owner-only", "allow-other"])
def test_allow_other(tmp_path, home, allow_other):
    import tempfile

    from helpers import as_nobody
    src = make_tree(tmp_path / "src", files=5)
    (src / "public.txt").write_bytes(b"for everyone\n")
    (src / "public.txt").chmod(0o644)
    key = create(home, src)
    # pytest's tmp dirs are private to root: mount where another user can walk to.
    top = Path(tempfile.mkdtemp(prefix="p2pfs-allow-other-"))
    try:
        top.chmod(0o755)
        mnt = top / "mnt"
        with mounted(home, key, mnt, *(["--allow-other"] if allow_other else [])):
            other = subprocess.run([*as_nobody(), "cat", str(mnt / "public.txt")],
                                   capture_output=True)
            if allow_other:
                assert other.returncode == 0 and other.stdout == b"for everyone\n", other.stderr
            else:
                assert other.returncode != 0 and b"Permission denied" in other.stderr
            assert (mnt / "public.txt").read_bytes() == b"for everyone\n"  # the owner always can
    finally:
        force_unmount(top / "mnt")
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop the kernel's caches")
def test_forgotten_inodes_come_back_with_the_same_numbers(tmp_path, home):
    """After the kernel forgets every inode (FORGET for each), lookups start
    over and every path gets the number it had: inode numbers are stable."""
    src = make_tree(tmp_path / "src", files=60)
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt):
        def inodes():
            out = {}
            for dirpath, dirnames, filenames in os.walk(mnt):
                for name in dirnames + filenames:
                    p = os.path.join(dirpath, name)
                    out[os.path.relpath(p, mnt)] = os.lstat(p).st_ino
            return out
        before = inodes()
        assert len(set(before.values())) == len(before)  # unique
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")  # dentries and inodes: the kernel sends FORGET
        assert inodes() == before
        same_tree(src, mnt)


def test_live_update_replaces_a_directory_by_a_file(tmp_path, home):
    """A path that changes kind gets a new inode; the old one's children vanish."""
    src = tmp_path / "src"
    (src / "thing").mkdir(parents=True)
    for i in range(10):
        (src / "thing" / f"child{i}").write_bytes(b"c%d" % i)
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt):
        assert len(os.listdir(mnt / "thing")) == 10
        children = [os.stat(mnt / "thing" / n).st_ino for n in os.listdir(mnt / "thing")]
        old_ino = os.stat(mnt / "thing").st_ino
        shutil.rmtree(src / "thing")
        (src / "thing").write_bytes(b"now a file\n")
        import_dir(home, key, src)
        wait_until(lambda: os.path.isfile(mnt / "thing"), what="the directory to become a file")
        assert (mnt / "thing").read_bytes() == b"now a file\n"
        assert os.stat(mnt / "thing").st_ino != old_ino
        assert os.stat(mnt / "thing").st_ino not in children
        same_tree(src, mnt)


@pytest.mark.parametrize("how", ["in-place", "rename"])
def test_an_open_file_reads_one_version_while_the_owner_imports(tmp_path, home, how):
    """Issue 7, acceptance 5 (finding 13): a file read through the mount while
    the owner imports a new version of it gives exactly one version's bytes.
    The read stops half-way until the mount shows the new version, and the
    pages it read are dropped from the page cache, so the rest comes from the
    mount process after the switch."""
    src = tmp_path / "src"
    src.mkdir()
    size = 8 << 20
    write_random(src / "f.bin", size, seed=1)
    old = (src / "f.bin").read_bytes()
    new = bytes(b ^ 0x5A for b in old)  # every byte differs
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt):
        with open(mnt / "f.bin", "rb", buffering=0) as f:
            got = bytearray(f.read(size // 2))
            if how == "in-place":
                with open(src / "f.bin", "r+b") as w:
                    w.write(new)
            else:
                (src / "f.new").write_bytes(new)
                os.rename(src / "f.new", src / "f.bin")
            import_dir(home, key, src)
            wait_until(lambda: os.getxattr(mnt, "user.p2pfs.version") == b"2",
                       what="the mount to show version 2")
            assert (mnt / "f.bin").read_bytes() == new  # a new open sees the new version
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            for piece in (4096, 65536 + 1, 1 << 20):  # several read sizes
                got += f.read(piece)
            while chunk := f.read(1 << 20):
                got += chunk
        assert len(got) == size and bytes(got) == old, "bytes of two versions mixed"
        assert (mnt / "f.bin").read_bytes() == new


# ------------------------------------------- issue 7, findings 17 and 19

def dir_links(root) -> dict[str, int]:
    """{directory: link count} under root (`find -type d -printf '%p %n'`)."""
    out = subprocess.run(["find", ".", "-type", "d", "-printf", r"%p %n\n"], cwd=root, check=True,
                         capture_output=True).stdout.decode("utf-8", "surrogateescape")
    return dict((p, int(n)) for p, n in (line.rsplit(" ", 1) for line in out.splitlines()))


def test_daemon_does_not_depend_on_the_current_directory(tmp_path, home):
    """`mount --daemon` from a directory holding a folder named p2pfs (finding 17):
    the daemon re-runs this p2pfs, not the folder's; it then leaves that directory."""
    src = make_tree(tmp_path / "src", files=5)
    key = create(home, src)
    cwd = tmp_path / "work"
    (cwd / "p2pfs").mkdir(parents=True)
    (cwd / "p2pfs" / "__init__.py").write_text("raise ImportError('the wrong p2pfs')\n")
    (cwd / "p2pfs" / "__main__.py").write_text("raise SystemExit('the wrong p2pfs')\n")
    (cwd / "mnt").mkdir()
    mnt = cwd / "mnt"
    pid = None
    try:
        # as the installed `p2pfs` script starts: not from the current directory
        r = subprocess.run([sys.executable, "-P", "-m", "p2pfs", "--home", os.path.relpath(home, cwd),
                            "mount", key, "mnt", "--daemon"], cwd=cwd, env=cli_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        pid = daemon_pid(r.stderr)
        assert (mnt / "run.sh").read_bytes() == (src / "run.sh").read_bytes()
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
    finally:
        force_unmount(mnt)
        if pid is not None:
            stop(pid)


def test_mount_over_a_non_empty_directory_is_refused(tmp_path, home):
    """Its files would be hidden (finding 19): refused unless --allow-non-empty, as rclone does."""
    src = make_tree(tmp_path / "src", files=5)
    key = create(home, src)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "mine.txt").write_text("mine")
    for extra in ([], ["--daemon"]):
        r = run_cli(home, "mount", key, mnt, *extra, check=False, timeout=60)
        assert r.returncode == 2 and "not empty" in r.stderr and "--allow-non-empty" in r.stderr, r.stderr
        assert mount_layers(mnt) == [] and (mnt / "mine.txt").read_text() == "mine"
    with mounted(home, key, mnt, "--allow-non-empty"):
        assert not (mnt / "mine.txt").exists() and (mnt / "run.sh").exists()
    assert (mnt / "mine.txt").read_text() == "mine"


def test_df_and_directory_link_counts(tmp_path, home):
    """df: the drive's size used, the store's free space available, every entry
    an inode; a directory's link count is 2 + its subdirectories, also after
    a version adds some (finding 19)."""
    src = make_tree(tmp_path / "src", files=30, depth=3, fanout=3)
    write_random(src / "big.bin", 5 * 65536 + 1, seed=4)
    key = create(home, src)
    info = json.loads(run_cli(home, "info", key, "--json").stdout)
    entries = sum(1 for _ in src.rglob("*")) + 1  # and the root
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt):
        vfs = os.statvfs(mnt)
        used = vfs.f_blocks - vfs.f_bfree
        assert used == -(-info["bytes"] // 65536) and vfs.f_bavail == vfs.f_bfree > 0
        store_free = os.statvfs(home).f_bavail * os.statvfs(home).f_frsize
        assert abs(vfs.f_bavail * vfs.f_frsize - store_free) < 64 << 20
        assert vfs.f_files == entries and vfs.f_ffree == 0
        df = subprocess.run(["df", "-P", str(mnt)], capture_output=True, text=True).stdout
        assert "100%" not in df, df
        assert subprocess.run(["df", "-i", "-P", str(mnt)], capture_output=True,
                              text=True).stdout.split()[-5] == str(entries)
        assert dir_links(mnt) == dir_links(src)
        assert os.stat(mnt / "d0-0").st_nlink == os.stat(src / "d0-0").st_nlink
        before = os.stat(mnt / "d0-1").st_nlink
        for name in ("new-a", "new-b"):
            (src / "d0-1" / name).mkdir()
        shutil.rmtree(src / "d0-2")
        import_dir(home, key, src)
        wait_until(lambda: os.stat(mnt / "d0-1").st_nlink == before + 2,
                   what="the new link count after a version switch")
        assert dir_links(mnt) == dir_links(src)
