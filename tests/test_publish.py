"""The write path: ignore rules and the Publisher (changes -> one signed version)."""

from __future__ import annotations

import os
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfs.drive import Drive, verify_drive
from p2pfs.errors import UsageError
from p2pfs.ignore import Rules
from p2pfs.index import KIND_FILE
from p2pfs.publish import Abandoned, Changes, Publisher, create_drive, scan_directory
from p2pfs.store import Store

from helpers import run_cli, create, write_random

BS = 4096


# ---------------------------------------------------------------- ignore rules


def test_rules_follow_gitignore():
    r = Rules(["*.tmp", "node_modules/", "!keep.tmp", "/build", "# a comment", ""])
    cases = {
        (b"/a.tmp", False): True, (b"/d/a.tmp", False): True,
        (b"/keep.tmp", False): False, (b"/d/keep.tmp", False): False,
        (b"/node_modules", True): True, (b"/x/node_modules", True): True,
        (b"/node_modules", False): False,  # a file of that name is not a directory
        (b"/node_modules/keep.tmp", False): True,  # inside an ignored directory: no way back
        (b"/node_modules/a/b.js", False): True,
        (b"/build", True): True, (b"/src/build", True): False,  # anchored
        (b"/", True): False, (b"/.p2pfsignore", False): False,
        ("/\udcff.tmp".encode("utf-8", "surrogateescape"), False): True,  # not UTF-8
    }
    for (path, is_dir), want in cases.items():
        assert r.ignored(path, is_dir) is want, (path, is_dir)
    assert Rules().empty and Rules(["# only a comment", ""]).empty and not r.empty
    # the command line comes last, so it wins over a negation in the file
    assert Rules(["!*.log"], ["*.log"]).ignored(b"/a.log", False)
    assert Rules(["*"]).ignored(b"/x", False) and not Rules(["*"]).ignored(b"/.p2pfsignore", False)
    with pytest.raises(UsageError, match="bad ignore pattern"):
        Rules(["\\"])


def test_rules_load_reads_the_directory_file(tmp_path):
    (tmp_path / ".p2pfsignore").write_bytes(b"*.tmp\n")
    assert Rules.load(tmp_path).ignored(b"/x.tmp", False)
    assert Rules.load(tmp_path / "missing").empty
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".p2pfsignore").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        Rules.load(tmp_path / "d")


def test_create_and_import_leave_ignored_paths_out(home, tmp_path):
    src = tmp_path / "src"
    (src / "node_modules" / "pkg").mkdir(parents=True)
    (src / "node_modules" / "keep.tmp").write_text("no")
    (src / "node_modules" / "pkg" / "index.js").write_text("no")
    (src / "a.tmp").write_text("no")
    (src / "keep.tmp").write_text("yes")
    (src / "notes.log").write_text("no")
    (src / "main.c").write_text("yes")
    (src / ".p2pfsignore").write_text("*.tmp\nnode_modules/\n!keep.tmp\n")
    key = create(home, src, "--exclude", "*.log")
    want = ".p2pfsignore\nkeep.tmp\nmain.c\n"
    assert run_cli(home, "ls", key).out == want
    (src / "b.tmp").write_text("no")
    (src / "node_modules" / "new.js").write_text("no")
    run_cli(home, "import", "-q", key, src, "--exclude", "*.log")
    assert run_cli(home, "ls", key).out == want
    # without --exclude the log is published; rules that change take paths out again
    run_cli(home, "import", "-q", key, src)
    assert "notes.log" in run_cli(home, "ls", key).out
    (src / ".p2pfsignore").write_text("*.tmp\nnode_modules/\n!keep.tmp\n*.c\n*.log\n")
    run_cli(home, "import", "-q", key, src)
    assert run_cli(home, "ls", key).out == ".p2pfsignore\nkeep.tmp\n"


# ---------------------------------------------------------------- the publisher


@pytest.fixture
def owned(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    store = Store(home)
    result = create_drive(store, src, block_size=BS)
    yield store, result.key, src
    store.close()


def publish(store, key, src, changes, **kw):
    drive = Drive(store, key)
    with store.writer_lock(key):
        return Publisher(drive, src, kw.pop("rules", None), **kw).publish(changes)


def listing(store, key) -> dict:
    """{path: (kind, mode, mtime_ns, size, target, content)} of the newest version."""
    drive = Drive(store, key).open_local()
    out = {}
    for path, e in drive.walk_local():
        data = b""
        if e.kind == KIND_FILE:
            data = drive.read_local(e, 0, e.size, path)
        out[path] = (e.kind, e.mode, e.mtime_ns, e.size, e.target, data)
    return out


def on_disk(src, rules=None) -> dict:
    out = {}
    for it in scan_directory(src, rules=rules):
        data = open(it.source, "rb").read() if it.kind == KIND_FILE else b""
        out[it.path] = (it.kind, it.mode, it.mtime_ns, it.size, it.target, data)
    return out


def test_moves_keep_blocks_and_changed_paths_reuse_them(owned):
    store, key, src = owned
    (src / "dir").mkdir()
    for i in range(50):
        (src / "dir" / f"f{i}").write_bytes(os.urandom(BS + 1 + i))
    write_random(src / "big", 64 * BS, seed=3)
    r = publish(store, key, src, Changes(paths={b"/", b"/dir", b"/big"}))
    assert r.published and r.new_content_blocks == 50 * 2 + 64 and r.added == 52
    assert on_disk(src) == listing(store, key)

    os.rename(src / "dir", src / "moved")
    os.rename(src / "big", src / "moved" / "big")
    r = publish(store, key, src, Changes(moves=[(b"/dir", b"/moved"), (b"/big", b"/moved/big")],
                                         paths={b"/", b"/moved"}))
    assert r.moved == 2 and r.new_content_blocks == 0 and r.reused_blocks == 0
    assert on_disk(src) == listing(store, key)

    with open(src / "moved" / "big", "r+b") as f:  # one byte in the middle
        f.seek(32 * BS + 100)
        f.write(b"!")
    r = publish(store, key, src, Changes(paths={b"/moved/big"}))
    assert r.new_content_blocks == 1 and r.reused_blocks == 63 and r.changed == 1
    assert on_disk(src) == listing(store, key)

    nothing = publish(store, key, src, Changes(paths={b"/moved/big", b"/moved"}))
    assert not nothing.published and nothing.version == r.version
    assert verify_drive(Drive(store, key)) == []


def test_paths_deletions_kind_changes_and_new_directories(owned):
    store, key, src = owned
    (src / "a").write_text("a")
    (src / "gone").mkdir()
    (src / "gone" / "x").write_text("x")
    publish(store, key, src, Changes.everything())
    (src / "a").unlink()
    (src / "a").mkdir()  # a file replaced by a directory
    (src / "a" / "inner").write_text("i")
    (src / "gone" / "x").unlink()
    (src / "gone").rmdir()
    os.makedirs(src / "n" / "b" / "c")
    (src / "n" / "b" / "c" / "f").write_text("x")
    os.symlink("a/inner", src / "link")
    # only the tops are named: a new directory is scanned whole, a missing
    # parent in the index is found and scanned, a vanished one deleted whole
    r = publish(store, key, src, Changes(paths={b"/a", b"/gone", b"/n/b", b"/link", b"/"}))
    assert on_disk(src) == listing(store, key)
    assert r.deleted == 3 and r.added == 7  # a, gone, gone/x; a, a/inner, n, n/b, n/b/c, f, link
    info = Drive(store, key).open_local().commit
    assert (info.files, info.bytes) == (r.files, r.bytes) == (2, 2)  # a/inner, n/b/c/f


def test_a_file_that_changes_while_read_is_left_for_later(owned):
    store, key, src = owned
    (src / "steady").write_text("steady")
    write_random(src / "busy", 64 << 20, seed=4)  # progress reports every 8 MiB of it
    before = Drive(store, key).head.length

    class Meddler:
        def start(self, nbytes, files):
            pass

        def advance(self, nbytes, files=0):
            if files == 0:  # mid-file: someone writes to it
                with open(src / "busy", "r+b") as f:
                    f.write(b"torn")

    r = publish(store, key, src, Changes.everything(), progress=Meddler())
    assert r.retry == {b"/busy"} and r.published
    assert b"/busy" not in listing(store, key) and b"/steady" in listing(store, key)
    assert r.new_content_blocks == 1  # the torn file's blocks were rolled back
    assert Drive(store, key).head.length - before == 1 + r.index_blocks + 1
    r = publish(store, key, src, Changes(paths=r.retry))
    assert r.retry == set() and on_disk(src) == listing(store, key)
    # import (strict) tries a few times and then says what is wrong
    with open(src / "busy", "ab") as f:
        f.write(b"more")
    with pytest.raises(UsageError, match="kept changing while it was read"):
        publish(store, key, src, Changes.everything(), progress=Meddler(), strict=True)


def test_stop_abandons_the_version_before_signing(owned):
    store, key, src = owned
    write_random(src / "big", 32 << 20, seed=5)
    stop = threading.Event()
    head = Drive(store, key).head

    class Stopper:
        def start(self, nbytes, files):
            pass

        def advance(self, nbytes, files=0):
            stop.set()

    with pytest.raises(Abandoned):
        publish(store, key, src, Changes.everything(), progress=Stopper(), stop=stop)
    assert Drive(store, key).head == head and verify_drive(Drive(store, key)) == []
    r = publish(store, key, src, Changes.everything())
    assert r.version == 2 and on_disk(src) == listing(store, key)


def test_ignored_paths_never_reach_the_index(owned):
    store, key, src = owned
    rules = Rules(["*.tmp", "node_modules/", "!keep.tmp"])
    (src / "node_modules").mkdir()
    (src / "node_modules" / "keep.tmp").write_text("no")
    (src / "x.tmp").write_text("no")
    (src / "keep.tmp").write_text("yes")
    publish(store, key, src, Changes(paths={b"/", b"/node_modules", b"/node_modules/keep.tmp",
                                            b"/x.tmp", b"/keep.tmp"}), rules=rules)
    assert set(listing(store, key)) == {b"/", b"/keep.tmp"}
    os.rename(src / "keep.tmp", src / "moved.tmp")  # renamed into an ignored name
    os.rename(src / "x.tmp", src / "keep.tmp")  # and out of one
    publish(store, key, src, Changes(moves=[(b"/keep.tmp", b"/moved.tmp"), (b"/x.tmp", b"/keep.tmp")],
                                     paths={b"/"}), rules=rules)
    assert on_disk(src, rules) == listing(store, key)
    assert listing(store, key)[b"/keep.tmp"][5] == b"no"


# a model of what the watcher reports: every path an operation touched, and renames

NAMES = ["a", "b", "c", "d"]


@st.composite
def operations(draw):
    return draw(st.lists(st.tuples(
        st.sampled_from(["write", "append", "delete", "mkdir", "rename", "chmod", "symlink",
                         "move-in"]),
        st.lists(st.sampled_from(NAMES), min_size=1, max_size=2),
        st.lists(st.sampled_from(NAMES), min_size=1, max_size=2),
        st.integers(0, 3 * BS)), max_size=30))


def apply(src, op, rnd) -> tuple[set, list]:
    """Do one operation; return (paths touched, renames) as the watcher would report."""
    kind, p1, p2, size = op
    a = "/" + "/".join(p1)
    b = "/" + "/".join(p2)
    la, lb = str(src) + a, str(src) + b
    touched = {a.encode(), os.path.dirname(a).encode()}
    if kind in ("write", "mkdir", "symlink") and not os.path.isdir(os.path.dirname(la)):
        top = os.path.dirname(a)
        while not os.path.isdir(str(src) + os.path.dirname(top)):
            top = os.path.dirname(top)
        try:
            os.makedirs(os.path.dirname(la))
        except OSError:
            return set(), []
        touched |= {top.encode(), os.path.dirname(top).encode()}  # only the top is reported
    try:
        if kind == "write":
            with open(la, "wb") as f:
                f.write(rnd.randbytes(size))
        elif kind == "append":
            with open(la, "ab") as f:
                f.write(rnd.randbytes(size % 100 + 1))
        elif kind == "delete":
            if os.path.isdir(la) and not os.path.islink(la):
                import shutil
                for dirpath, dirnames, filenames in os.walk(la):  # each gets a DELETE event
                    for name in dirnames + filenames:
                        touched.add(os.fsencode(os.path.join(dirpath, name)[len(str(src)):]))
                shutil.rmtree(la)
            else:
                os.unlink(la)
        elif kind == "mkdir":
            os.mkdir(la)
        elif kind == "chmod":
            os.chmod(la, 0o600 + size % 0o100, follow_symlinks=False)
        elif kind == "symlink":
            os.symlink(b, la)
        elif kind == "move-in":  # a tree from outside: only its top is reported
            outside = f"{src}-outside-{rnd.random()}"
            os.makedirs(outside + "/x/y")
            for name in ("x/f", "x/y/g", "h"):
                with open(f"{outside}/{name}", "wb") as f:
                    f.write(rnd.randbytes(size))
            os.rename(outside, la)
        else:
            os.rename(la, lb)
            touched |= {b.encode(), os.path.dirname(b).encode()}
            return touched, [(a.encode(), b.encode())]
    except (OSError, NotImplementedError):
        return set(), []
    return touched, []


@given(operations(), st.integers(1, 3))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
def test_publishing_reported_changes_equals_a_full_rescan(tmp_path_factory, ops, batches):
    tmp = tmp_path_factory.mktemp("model")
    src = tmp / "src"
    for d in ("a", "b", "d/a"):
        (src / d).mkdir(parents=True)
    for f in ("a/a", "a/b", "b/c", "c", "d/a/b"):
        (src / f).write_bytes(b"%s\n" % f.encode() * 500)
    rnd = random.Random(len(ops))
    with Store(tmp / "home") as store:
        key = create_drive(store, src, block_size=BS).key
        step = max(1, len(ops) // batches)
        for start in range(0, len(ops) + 1, step):
            changes = Changes()
            for op in ops[start:start + step]:
                touched, moves = apply(src, op, rnd)
                for old, new in moves:  # what was pending below a renamed path moves too
                    changes.paths = {new + p[len(old):] if p == old or p.startswith(old + b"/")
                                     else p for p in changes.paths}
                changes.paths |= touched
                changes.moves += moves
            publish(store, key, src, changes)
            assert listing(store, key) == on_disk(src)
        assert verify_drive(Drive(store, key)) == []
