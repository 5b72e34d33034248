"""`p2pfs share DIR` end to end (issue 9): a real share process, real inotify,
a second home mounting the key over loopback, `kill -9` for real.

These tests open sockets: run them under `unshare -n` (as scripts/test does).
Every share process and mount is stopped in a `finally`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import (REPO, cat_digest, cli_command, cli_env, file_digest, parse_ls_lR, run_cli,
                     source_listing, stop_process, write_random)
from test_mount import mounted, mtimes, wait_until

VISIBLE = 3.0  # s: acceptance 1, from the end of a command to the mount showing it
GiB = 1 << 30


class Share:
    """A running `p2pfs share` (its stderr and stdout go to one log file)."""

    def __init__(self, home: Path, directory: Path, extra, prefix=()):
        self.home = home
        self.directory = directory
        self.log_path = home.parent / f"share-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            [*prefix, *cli_command(home, "share", directory, "--listen", "127.0.0.1:0", *extra)],
            env=cli_env(), cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.key = self.address = None

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> "Share":
        def ready():
            text = self.text()
            if self.proc.poll() is not None:
                raise AssertionError(f"share exited {self.proc.returncode}: {text}")
            m = re.search(r"listening on ([0-9.]+:\d+)", text)
            return m and m.group(1)
        self.address = wait_until(ready, timeout, "share to listen")
        self.key = re.search(r"^([ybndrfg8ejkmcpqxot1uwisza345h769]{52})$", self.text(), re.M).group(1)
        return self

    def versions(self) -> list[tuple[int, int]]:
        """(version, new content blocks) of each version this process published."""
        return [(int(v), int(c)) for v, c in
                re.findall(r"version (\d+): .*?; (\d+) new content blocks", self.text())]

    def stop(self, sig=signal.SIGTERM) -> int:
        return stop_process(self.proc, sig)


@contextmanager
def sharing(home, directory, *extra, prefix=()):
    share = Share(home, directory, extra, prefix)
    try:
        yield share.wait_ready()
    finally:
        share.stop()
        share.log.close()


def same_tree(src, mnt, content: str = ".") -> None:
    """Types, sizes (but a directory's), modes, link targets and mtimes, and
    `diff -r` of the bytes below `content`."""
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(src / content),
                           str(mnt / content)], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr

    def find(root):
        out = subprocess.run(["find", ".", "-printf", r"%y %p %s %m %l\n"], cwd=root, check=True,
                             capture_output=True).stdout.decode("utf-8", "surrogateescape")
        return sorted(re.sub(r"^d (.*) \d+ (\d+) $", r"d \1 - \2 ", line)
                      for line in out.splitlines())
    assert find(mnt) == find(src)
    assert mtimes(mnt) == mtimes(src)


def newest(home, key) -> int:
    return json.loads(run_cli(home, "info", key, "--json").out)["version"]


def drive_listing(home, ref) -> dict:
    return parse_ls_lR(run_cli(home, "ls", "-l", "-R", ref).stdout)


def published(home, key, src, timeout: float = 30) -> None:
    """Wait until the newest version is exactly `src` (metadata; content by size+mtime)."""
    want = source_listing(src)
    wait_until(lambda: drive_listing(home, key) == want, timeout, "the share to publish DIR",
               interval=0.1)


def visible(what: str, predicate) -> float:
    start = time.monotonic()
    wait_until(predicate, 20, what, interval=0.02)
    took = time.monotonic() - start
    assert took < VISIBLE, f"{what}: {took:.2f} s"
    return took


def git_repo(path: Path) -> Path:
    path.mkdir()
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", "init", "-q", str(path)], check=True, env=env)
    for i in range(3):
        (path / f"file{i}.txt").write_text(f"commit {i}\n" * 100)
        (path / "src").mkdir(exist_ok=True)
        (path / "src" / f"m{i}.py").write_text("print('x')\n" * i)
        subprocess.run(["git", "-C", str(path), "add", "."], check=True, env=env)
        subprocess.run(["git", "-C", str(path), "commit", "-q", "-m", f"c{i}"], check=True, env=env)
    return path


# ------------------------------------------------------------------ acceptance 1 and 7

@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_share_follows_every_kind_of_change_in_a_remote_mount(tmp_path, home, home2):
    src = tmp_path / "src"
    (src / "many").mkdir(parents=True)
    for i in range(1000):
        (src / "many" / f"f{i:04d}").write_bytes(b"%d\n" % i * (i % 7 + 1))
    (src / "edit.txt").write_text("before\n")
    (src / "gone.txt").write_text("bye\n")
    (src / "old-name").write_bytes(os.urandom(100_000))
    repo = git_repo(tmp_path / "repo")
    mnt = tmp_path / "mnt"
    times = {}
    with sharing(home, src) as share, mounted(home2, share.key, mnt, "--peer", share.address):
        assert newest(home, share.key) == 1
        same_tree(src, mnt)
        model = {}  # path -> (change, from) between version 1 and the last

        (src / "new.txt").write_text("new\n")
        model["/new.txt"] = ("added", None)
        times["add"] = visible("an added file", lambda: (mnt / "new.txt").exists())

        (src / "edit.txt").write_text("after, longer\n")
        model["/edit.txt"] = ("modified", None)
        times["modify"] = visible("a modified file",
                                  lambda: (mnt / "edit.txt").read_text() == "after, longer\n")

        os.remove(src / "gone.txt")
        model["/gone.txt"] = ("deleted", None)
        times["delete"] = visible("a deleted file", lambda: not (mnt / "gone.txt").exists())

        os.rename(src / "old-name", src / "new-name")
        model["/new-name"] = ("renamed", "/old-name")
        times["rename file"] = visible("a renamed file", lambda: (mnt / "new-name").exists()
                                       and not (mnt / "old-name").exists())

        os.rename(src / "many", src / "renamed-many")
        model["/renamed-many"] = ("renamed", "/many")
        times["rename dir of 1,000"] = visible(
            "a renamed directory", lambda: not (mnt / "many").exists()
            and len(os.listdir(mnt / "renamed-many")) == 1000)

        subprocess.run("mkdir -p a/b/c && echo x > a/b/c/f", shell=True, cwd=src, check=True)
        model.update({p: ("added", None) for p in ("/a", "/a/b", "/a/b/c", "/a/b/c/f")})
        times["mkdir -p"] = visible("mkdir -p a/b/c && echo x > a/b/c/f",
                                    lambda: (mnt / "a/b/c/f").exists()
                                    and (mnt / "a/b/c/f").read_text() == "x\n")

        subprocess.run(["git", "clone", "-q", str(repo), str(src / "clone")], check=True)
        for dirpath, dirnames, filenames in os.walk(src / "clone"):
            for name in [""] + dirnames + filenames:
                model["/" + os.path.relpath(os.path.join(dirpath, name), src)] = ("added", None)

        def clone_complete():
            diff = subprocess.run(["diff", "-r", "--no-dereference", str(src / "clone"),
                                   str(mnt / "clone")], capture_output=True)
            return diff.returncode == 0
        times["git clone"] = visible("git clone", clone_complete)

        same_tree(src, mnt)
        print("visible in the remote mount after: " +
              ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))

        # acceptance 7: diff 1 N is exactly what the script did
        last = newest(home, share.key)
        got = json.loads(run_cli(home, "diff", share.key, "1", str(last), "--json").out)
        assert {c["path"]: (c["change"], c.get("from")) for c in got["changes"]} == model
        print(f"diff 1 {last}: {len(got['changes'])} changes, as the script made them")


def test_second_run_reuses_the_drive_and_catches_up_in_one_version(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    with sharing(home, src) as first:
        key = first.key
    assert first.proc.returncode == 0 and "p2pfs: share: stopped" in first.text()
    (src / "b").write_text("b")  # while no share runs
    os.remove(src / "a")
    with sharing(home, src) as second:
        assert second.key == key  # published before it listens, in one version
        assert newest(home, key) == 2 and second.versions() == [(2, 1)]
        assert drive_listing(home, key) == source_listing(src)
    with sharing(home, src) as third:  # nothing changed: no new version
        assert newest(home, key) == 2 and third.versions() == []
        # one share per drive: a second one for the same directory is refused
        again = run_cli(home, "share", src, "--listen", "127.0.0.1:0", check=False, timeout=60)
        assert again.returncode == 1 and "another p2pfs process is writing" in again.stderr
    assert run_cli(home, "log", key).out.count("share: ") == 2


def test_share_daemon(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f")
    res = run_cli(home, "share", src, "--listen", "127.0.0.1:0", "--daemon", timeout=120)
    lines = res.out.splitlines()
    assert re.fullmatch(r"[ybndrfg8ejkmcpqxot1uwisza345h769]{52}", lines[0])
    assert re.fullmatch(r"listening on 127\.0\.0\.1:\d+", lines[1])
    pid = int(re.search(r"\(pid (\d+)\)", res.stderr).group(1))
    try:
        assert f"sharing {os.path.realpath(src)} as {lines[0]}" in res.stderr
        (src / "g").write_text("g")
        wait_until(lambda: "version 2:" in (home / "share.log").read_text(), 20,
                   "the daemon to publish")
        assert f"(pid {pid})" in (home / "share.log").read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                   open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z", 20,
                   "the daemon to stop")


# ------------------------------------------------------------------ acceptance 2 and 3

@pytest.mark.slow
def test_1gib_copy_rename_and_one_byte(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    outside = tmp_path / "big.bin"
    write_random(outside, GiB, seed=9)
    with sharing(home, src, "--debounce", "0.2", "--max-delay", "0.5") as share:
        stop = threading.Event()

        def churn():  # versions keep being published while cp runs
            i = 0
            while not stop.is_set():
                (src / "tick").write_text(str(i))
                i += 1
                time.sleep(0.05)
        ticker = threading.Thread(target=churn)
        ticker.start()
        before = newest(home, share.key)
        try:
            # cp from a pipe fed at ~300 MB/s, so that the copy lasts a few seconds
            # and versions are published while it runs
            cp = subprocess.Popen(["cp", "/dev/stdin", str(src / "big.bin")],
                                  stdin=subprocess.PIPE)
            with open(outside, "rb") as f:
                while chunk := f.read(16 << 20):
                    cp.stdin.write(chunk)
                    time.sleep(0.05)
            cp.stdin.close()
            assert cp.wait() == 0
            during = newest(home, share.key) - before
        finally:
            stop.set()
            ticker.join()
        published(home, share.key, src, timeout=120)
        last = newest(home, share.key)
        sizes = []
        for n in range(1, last + 1):
            entries = drive_listing(home, f"{share.key}@{n}")
            sizes.append(entries.get(b"/big.bin", ("-", 0, None))[2])
        assert set(sizes) <= {None, GiB}, sizes  # no version ever held part of it
        assert sizes[-1] == GiB and during >= 2, (sizes, during)
        print(f"acceptance 2: {last} versions, {during} of them published while cp ran; "
              f"big.bin in them: {sizes.count(None)} absent, {sizes.count(GiB)} complete, "
              "none partial")

        os.rename(src / "big.bin", src / "renamed.bin")
        wait_until(lambda: share.versions()[-1][0] > last, 60, "the rename to be published")
        renamed = share.versions()[-1]
        assert renamed[1] == 0, renamed
        published(home, share.key, src)
        with open(src / "renamed.bin", "r+b") as f:
            f.seek(GiB // 2 + 12345)
            b = f.read(1)
            f.seek(GiB // 2 + 12345)
            f.write(bytes([b[0] ^ 0xFF]))
        wait_until(lambda: share.versions()[-1][0] > renamed[0], 60, "the one-byte change")
        changed = share.versions()[-1]
        assert changed[1] == 1, changed
        print(f"acceptance 3: renaming the 1 GiB file added {renamed[1]} content blocks; "
              f"one changed byte in its middle added {changed[1]}")
        rc, digest, _ = cat_digest(home, share.key, "/renamed.bin")
        assert rc == 0 and digest == file_digest(src / "renamed.bin")


# ------------------------------------------------------------------ acceptance 4

def test_tar_x_of_10000_files_in_few_versions(tmp_path, home, home2):
    tree = tmp_path / "tree"
    for d in range(100):
        (tree / f"dir{d:03d}").mkdir(parents=True)
        for i in range(100):
            (tree / f"dir{d:03d}" / f"file{i:03d}").write_bytes(b"%d.%d\n" % (d, i))
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname="tree")
    src = tmp_path / "src"
    src.mkdir()
    mnt = tmp_path / "mnt"
    with sharing(home, src) as share, mounted(home2, share.key, mnt, "--peer", share.address):
        start = time.monotonic()
        subprocess.run(["tar", "xf", str(archive), "-C", str(src)], check=True)
        took = time.monotonic() - start
        wait_until(lambda: os.path.isdir(mnt / "tree" / "dir099")
                   and len(os.listdir(mnt / "tree" / "dir099")) == 100, 60,
                   "the final tree in the mount", interval=0.1)
        published(home, share.key, src)
        versions = len(share.versions())
        # one batch per max-delay window while tar runs, plus the last one or two
        assert 1 <= versions <= took / 5.0 + 3, (versions, took)
        same_tree(src, mnt, content="tree/dir042")  # every file's bytes is 10,000 round trips
        print(f"acceptance 4: tar x of 10,000 files ({took:.1f} s) published in {versions} "
              "version(s); the remote mount shows the final tree")


# ------------------------------------------------------------------ acceptance 5

@contextmanager
def sysctl(path: str, value: int):
    old = Path(path).read_text()
    try:
        Path(path).write_text(f"{value}\n")
        yield
    finally:
        Path(path).write_text(old)


@pytest.mark.skipif(os.geteuid() != 0, reason="sets /proc/sys/fs/inotify/max_queued_events")
def test_queue_overflow_falls_back_to_a_rescan(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    # the limit counts when an inotify instance is made: lowered only until the
    # share has made its own (so other processes are not affected for long)
    with sysctl("/proc/sys/fs/inotify/max_queued_events", 32):
        share = Share(home, src, ())
        try:
            share.wait_ready()
        except BaseException:
            share.stop()
            share.log.close()
            raise
    try:
        # far more events than the queue holds, while the share cannot read them
        share.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(400):
                (src / f"f{i}").write_text(str(i))
            os.rename(src / "a", src / "b")
        finally:
            share.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "inotify queue overflowed" in share.text(), 20, "the overflow log line")
        published(home, share.key, src)
        assert "rescanning the whole tree" in share.text()
        (src / "after").write_text("x")  # and watching goes on
        published(home, share.key, src)
    finally:
        share.stop()
        share.log.close()


def test_watch_limit_falls_back_to_polling_rescans(tmp_path, home):
    """The watch limit of a user namespace of its own (so nothing else on the
    machine is short of watches): 3 watches for a tree of 20 directories."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-U", "--map-root-user", "true"]).returncode != 0:
        pytest.skip("needs unshare -U (user namespaces)")
    src = tmp_path / "src"
    for d in range(20):
        (src / f"d{d}" / "sub").mkdir(parents=True)
        (src / f"d{d}" / "sub" / "f").write_text(str(d))
    prefix = ["unshare", "-U", "--map-root-user", "sh", "-c",
              'echo 3 > /proc/sys/user/max_inotify_watches && exec "$@"', "-"]
    with sharing(home, src, "--max-delay", "1", prefix=prefix) as share:
        assert "inotify watch limit is reached" in share.text()
        assert drive_listing(home, share.key) == source_listing(src)
        (src / "d19" / "sub" / "f").write_text("changed where no watch is")
        os.rename(src / "d18", src / "d18-renamed")
        (src / "d0" / "new").write_text("new")
        published(home, share.key, src)
        assert run_cli(home, "cat", share.key, "/d19/sub/f").out == "changed where no watch is"


# ------------------------------------------------------------------ acceptance 6

class Churn(threading.Thread):
    """Heavy churn in DIR/churn: writes, appends, renames, deletes, directories."""

    def __init__(self, src: Path, seed: int):
        super().__init__(daemon=True)
        self.root = src / "churn"
        self.root.mkdir(exist_ok=True)
        self.rnd = random.Random(seed)
        self.halt = threading.Event()

    def run(self):
        rnd = self.rnd
        while not self.halt.is_set():
            name = self.root / f"d{rnd.randrange(8)}" / f"f{rnd.randrange(40)}"
            op = rnd.random()
            try:
                if op < 0.5:
                    name.parent.mkdir(exist_ok=True)
                    with open(name, "wb") as f:
                        f.write(rnd.randbytes(rnd.choice([10, 5000, 70_000, 300_000])))
                elif op < 0.7:
                    os.rename(name, name.with_name(f"f{rnd.randrange(40)}"))
                elif op < 0.85:
                    os.remove(name)
                elif op < 0.9:
                    shutil.rmtree(name.parent)
                else:
                    os.rename(name.parent, self.root / f"d{rnd.randrange(8)}")
            except OSError:
                pass

    def stop(self):
        self.halt.set()
        self.join()


@pytest.mark.slow
def test_kill_9_during_churn_then_restart_catches_up(tmp_path, home):
    rnd = random.Random(int(os.environ.get("P2PFS_KILL_SEED", "6")))
    src = tmp_path / "src"
    src.mkdir()
    (src / "base").write_bytes(os.urandom(200_000))
    key = None
    for round_ in range(5):
        share = Share(home, src, ("--debounce", "0.1", "--max-delay", "0.5"))
        try:
            share.wait_ready()
            key = key or share.key
            assert share.key == key
            assert drive_listing(home, key) == source_listing(src)  # caught up before serving
            assert len(share.versions()) <= 1
            churn = Churn(src, seed=round_)
            churn.start()
            time.sleep(rnd.uniform(0.5, 3.0))  # the random moment (nothing is waited for)
            share.stop(signal.SIGKILL)
            churn.stop()
        finally:
            share.stop()
            share.log.close()
        run_cli(home, "verify", key)  # no version is half-signed
        (src / f"while-down-{round_}").write_text("x")  # changes while no share runs
    with sharing(home, src) as last:
        assert drive_listing(home, key) == source_listing(src)
        versions = newest(home, key)
        for n in range(1, versions + 1):  # every version is whole and readable
            run_cli(home, "ls", "-R", f"{key}@{n}")
        print(f"kill -9 five times during churn: {versions} versions, all verified")
    run_cli(home, "verify", key)
    assert last.proc.returncode == 0


# ------------------------------------------------------------------ acceptance 8

def test_ignored_paths_never_appear_in_any_version(tmp_path, home):
    src = tmp_path / "src"
    (src / "node_modules" / "pkg").mkdir(parents=True)
    (src / "node_modules" / "pkg" / "index.js").write_text("no")
    (src / "node_modules" / "keep.tmp").write_text("no: inside an ignored directory")
    (src / "a.tmp").write_text("no")
    (src / "keep.tmp").write_text("yes")
    (src / ".p2pfsignore").write_text("*.tmp\nnode_modules/\n!keep.tmp\n")
    with sharing(home, src, "--exclude", "*.log", "--debounce", "0.2") as share:
        (src / "b.tmp").write_text("no")
        (src / "x.log").write_text("no")
        (src / "sub" / "node_modules").mkdir(parents=True)
        (src / "sub" / "node_modules" / "m.js").write_text("no")
        (src / "sub" / "keep.tmp").write_text("yes")
        (src / "sub" / "c.tmp").write_text("no")
        os.rename(src / "keep.tmp", src / "renamed.tmp")  # into an ignored name
        shutil.copytree(src / "node_modules", src / "sub" / "copy")  # out of one: published
        wait_until(lambda: (lambda ls: b"/sub/keep.tmp" in ls and b"/sub/copy/keep.tmp" in ls
                            and b"/keep.tmp" not in ls)(drive_listing(home, share.key)), 20,
                   "the share to publish")
        key = share.key
    with sharing(home, src) as again:  # the --exclude patterns are remembered
        assert again.versions() == []
    bad = re.compile(rb"(\.tmp$|node_modules|\.log$)")
    for n in range(1, newest(home, key) + 1):
        paths = drive_listing(home, f"{key}@{n}")
        leaked = [p for p in paths if bad.search(p) and not p.endswith(b"keep.tmp")]
        assert not leaked, (n, leaked)
        assert b"/node_modules/keep.tmp" not in paths
    assert b"/.p2pfsignore" in drive_listing(home, key)


def test_sigterm_during_the_first_import_leaves_no_half_signed_drive(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big", 400 << 20, seed=2)
    share = Share(home, src, ())
    try:
        # in a pipe the first import reports in plain lines: the first says what it reads
        wait_until(lambda: "share: 1 files, 400.0 MiB to read" in share.text()
                   or share.proc.poll() is not None, 60, "the first import to start")
        started = time.monotonic()
        assert share.stop() == 0
        assert time.monotonic() - started < 10
    finally:
        share.stop()
        share.log.close()
    assert "listening on" not in share.text()  # stopped before it was published
    assert run_cli(home, "drives").out == ""  # the drive was never signed
    with sharing(home, src) as again:  # and the next run starts over
        assert drive_listing(home, again.key) == source_listing(src)
        run_cli(home, "verify", again.key)
