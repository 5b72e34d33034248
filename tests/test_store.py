"""The LMDB store: records, accounting, the crash rule, key files, sharing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from p2pfs.errors import KeyFileError
from p2pfs.store import MAP_SIZE, DriveRecord, Store, default_home
from p2pfs.types import Head, Node

from helpers import REPO, cli_env, run_cli, tree_modes

K1 = bytes(range(32))
K2 = bytes(range(1, 33))


def test_default_home(monkeypatch, tmp_path):
    monkeypatch.setenv("P2PFS_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"
    monkeypatch.delenv("P2PFS_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_home() == tmp_path / "xdg" / "p2pfs"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "u"))
    assert default_home() == tmp_path / "u" / ".local" / "share" / "p2pfs"


def test_map_is_large_and_sparse(store, home):
    assert store.env.info()["map_size"] == MAP_SIZE
    store.put_blocks(K1, 0, [b"x" * 1000])
    assert os.stat(home / "store" / "data.mdb").st_blocks * 512 < 64 << 20


def test_blocks_and_accounting(store):
    assert store.held(K1) == (0, 0)
    store.put_blocks(K1, 0, [b"a" * 10, b"b" * 20, b"c" * 30])
    store.put_blocks(K2, 5, [b"z"])
    assert store.held(K1) == (3, 60) and store.held(K2) == (1, 1)
    store.put_blocks(K1, 1, [b"B" * 5])  # overwrite: count same, bytes adjusted
    assert store.held(K1) == (3, 45)
    assert store.get_blocks(K1, [0, 1, 2, 3]) == [b"a" * 10, b"B" * 5, b"c" * 30, None]
    assert list(store.block_indices(K1)) == [0, 1, 2]
    store.put_blocks(K1, 7, [b"q", b"r"])
    assert store.held_ranges(K1) == [(0, 3), (7, 9)]
    assert store.discard_blocks_from(K1, 2) == 3
    assert store.held(K1) == (2, 15) and store.held_ranges(K1) == [(0, 2)]
    assert store.held_ranges(K2) == [(5, 6)]  # the other drive untouched
    assert [(i, bytes(v)) for i, v in store.iter_blocks(K1)] == [(0, b"a" * 10), (1, b"B" * 5)]


def test_nodes_heads_forks(store):
    nodes = [Node(0, b"h" * 32, 10), Node(1, b"p" * 32, 20), Node(2, b"i" * 32, 10)]
    store.put_nodes(K1, nodes)
    assert store.get_node(K1, 1) == nodes[1]
    assert store.get_nodes(K1, [0, 5, 2]) == [nodes[0], None, nodes[2]]
    assert list(store.iter_nodes(K1)) == nodes and list(store.iter_nodes(K2)) == []
    assert store.latest_head(K1) is None
    h2, h10 = Head(2, b"r" * 32, b"s" * 64), Head(10, b"R" * 32, b"S" * 64)
    store.put_head(K1, h10)
    store.put_head(K1, h2)
    store.put_head(K2, Head(300, b"x" * 32, b"y" * 64))
    assert store.latest_head(K1) == h10 and store.get_head(K1, 2) == h2
    assert store.heads(K1) == [h2, h10]
    assert store.latest_head(K2).length == 300
    assert store.get_drive(K1) == DriveRecord(pinned=False)  # a head makes the drive known
    fork = Head(10, b"F" * 32, b"G" * 64)
    store.put_fork(K1, fork)
    assert store.forks(K1) == [fork] and store.forks(K2) == []


def test_commit_version_is_one_transaction(store):
    head = Head(2, b"r" * 32, b"s" * 64)
    store.put_blocks(K1, 0, [b"one"])
    assert store.latest_head(K1) is None and store.get_drive(K1) is None
    store.commit_version(K1, head, [Node(0, b"n" * 32, 3)], DriveRecord(5, True, True),
                         blocks=[(1, b"two")])
    assert store.latest_head(K1) == head
    assert store.get_drive(K1) == DriveRecord(5, True, True)
    assert store.held(K1) == (2, 6)
    assert [k for k, _ in store.list_drives()] == [K1]


def test_secret_files(store, home):
    assert store.load_secret("abc") is None
    path = store.save_secret("abc", b"\x07" * 32)
    assert path == home / "keys" / "abc.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert store.load_secret("abc") == b"\x07" * 32
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        store.load_secret("abc")
    path.chmod(0o600)
    path.write_text("garbage")
    with pytest.raises(KeyFileError, match="malformed"):
        store.load_secret("abc")


def test_two_processes_share_the_store(home):
    """Another process writes while this one holds the environment open."""
    with Store(home) as mine:
        mine.put_blocks(K1, 0, [b"mine"])
        code = (f"from p2pfs.store import Store\n"
                f"s = Store({str(home)!r})\n"
                f"assert s.get_block({K1!r}, 0) == b'mine'\n"
                f"s.put_blocks({K2!r}, 0, [b'theirs' * 1000] * 50)\n")
        subprocess.run([sys.executable, "-c", code], check=True, env=cli_env(), cwd=REPO)
        assert mine.get_block(K2, 49) == b"theirs" * 1000
        assert mine.held(K2) == (50, 300_000)


def test_handles_in_one_process_share_the_environment(home):
    a = Store(home)
    b = Store(home)  # LMDB alone would refuse a second open in one process
    a.put_blocks(K1, 0, [b"shared"])
    assert b.get_block(K1, 0) == b"shared"
    a.close()
    a.close()  # idempotent
    assert b.get_block(K1, 0) == b"shared"
    b.close()
    with Store(home) as c:
        assert c.get_block(K1, 0) == b"shared"


def test_writer_lock_and_orphans(home):
    with Store(home) as s:
        s.put_blocks(K1, 0, [b"unsigned"] * 3)  # a create that never signed
        s.put_blocks(K2, 0, [b"signed"])
        s.put_head(K2, Head(1, b"r" * 32, b"s" * 64))
        assert s.orphan_keys() == [K1]
        with s.writer_lock(K1):
            code = (f"from p2pfs.store import Store\n"
                    f"s = Store({str(home)!r})\n"
                    f"with s.writer_lock({K1!r}, 'drive X'): pass\n")
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env=cli_env(), cwd=REPO)
            assert p.returncode != 0 and "another p2pfs process is writing drive X" in p.stderr
            assert f"(pid {os.getpid()}: p2pfs" in p.stderr  # the holder is named (argv may be empty: CI)
        with s.writer_lock(K1, holder="mount --rw /mnt"):
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env=cli_env(), cwd=REPO)
            assert f"(pid {os.getpid()}: mount --rw /mnt)" in p.stderr
        with s.writer_lock(K1):  # released: can be taken again
            pass


# --- the cache's bookkeeping (issue 12) ----------------------------------------------------

def test_touch_orders_blocks_by_last_read_and_counts_them(store):
    store.put_blocks(K1, 0, [b"a" * 10, b"b" * 20, b"c" * 30, b"d" * 40])
    assert store.cached(K1) == (0, 0) and store.cache_usage() == (0, 0)
    store.touch_blocks(K1, [0, 1, 2, 9], tick=100)   # 9 is not held: skipped
    assert store.cached(K1) == (3, 60)
    store.touch_blocks(K1, [0], tick=200)            # read again: now the newest
    store.touch_blocks(K1, [1], tick=50)             # an older tick never moves a block back
    assert store.cached(K1) == (3, 60)
    # least recently read first: 1 (100), 2 (100), then 0 (200); block 3 never read
    assert store.evict(15) == (1, 20) and store.get_block(K1, 1) is None
    assert store.held(K1) == (3, 80) and store.cached(K1) == (2, 40)
    assert store.evict(10 ** 9) == (2, 40)
    assert store.get_blocks(K1, [0, 2, 3]) == [None, None, b"d" * 40]  # the untouched one stays
    assert store.held(K1) == (1, 40) and store.cache_usage() == (0, 0)
    assert store.evict(10 ** 9) == (0, 0)


def test_evict_spares_what_keep_says_and_forgets_its_bookkeeping(store):
    store.put_blocks(K1, 0, [b"x" * 10] * 4)
    store.put_blocks(K2, 0, [b"y" * 10] * 4)
    store.touch_blocks(K1, range(4), 1)
    store.touch_blocks(K2, range(4), 2)
    freed = store.evict(10 ** 9, keep=lambda key, block: key == K1 or block == 3)
    assert freed == (3, 30)
    assert store.held(K1) == (4, 40) and store.held(K2) == (1, 10)
    assert store.cache_usage() == (0, 0)  # kept blocks left the bookkeeping too


def test_evict_works_in_bounded_transactions(store, monkeypatch):
    import p2pfs.store as store_mod
    monkeypatch.setattr(store_mod, "EVICT_BATCH", 5)
    store.put_blocks(K1, 0, [b"z"] * 12)
    store.touch_blocks(K1, range(12), 1)
    assert store.evict(10 ** 9) == (5, 5)
    assert store.evict(10 ** 9) == (5, 5)
    assert store.evict(10 ** 9) == (2, 2)


def test_pins_and_untracking(store):
    head = Head(4, b"r" * 32, b"s" * 64)
    store.put_head(K1, head)
    assert store.get_drive(K1) == DriveRecord(pinned=False)
    store.put_blocks(K1, 0, [b"q" * 8] * 4)
    store.touch_blocks(K1, range(4), 7)
    record = store.set_pins(K1, paths=[b"/b", b"/a", b"/a"])
    assert record.paths == (b"/a", b"/b") and not record.kept
    assert store.cached(K1) == (4, 32)
    record = store.set_pins(K1, pinned=True)
    assert record.kept and record.paths == (b"/a", b"/b")
    assert store.cached(K1) == (0, 0) and store.evict(10 ** 9) == (0, 0)  # kept: out at once
    assert store.held(K1) == (4, 32)
    with pytest.raises(LookupError):
        store.set_pins(K2, pinned=True)


def test_forget_drops_every_record_of_one_drive(store, monkeypatch):
    import p2pfs.store as store_mod
    monkeypatch.setattr(store_mod, "EVICT_BATCH", 3)
    for k in (K1, K2):
        store.put_head(k, Head(5, b"r" * 32, b"s" * 64))
        store.put_block_items(k, [(i, b"w" * 9) for i in range(5)],
                              [Node(i, b"h" * 32, 9) for i in range(0, 10, 2)])
        store.put_fork(k, Head(5, b"R" * 32, b"S" * 64))
        store.touch_blocks(k, range(5), 3)
    steps = 0
    while store.forget_some(K1):
        steps += 1
        assert store.held(K1)[0] == max(0, 5 - 3 * steps)  # accounting stays exact meanwhile
    store.forget_drive(K1)
    assert steps == 4  # 5 blocks and 5 nodes, 3 at a time
    assert store.get_drive(K1) is None and store.heads(K1) == [] and store.forks(K1) == []
    assert store.held(K1) == (0, 0) and store.cached(K1) == (0, 0)
    assert list(store.iter_nodes(K1)) == [] and list(store.block_indices(K1)) == []
    # the other drive is untouched, and its bookkeeping still works
    assert store.held(K2) == (5, 45) and store.cached(K2) == (5, 45) and len(store.heads(K2)) == 1
    assert store.evict(10 ** 9) == (3, 27) and store.evict(10 ** 9) == (2, 18)
# --- issue 7, finding 14: the home is private ------------------------------------------

def test_a_new_home_is_private(tmp_path):
    from p2pfs.store import make_private_dir, open_private

    home = tmp_path / "not" / "yet" / "home"
    saved = os.umask(0o022)  # what a user usually has: it must not matter
    try:
        with Store(home) as s:
            s.put_blocks(K1, 0, [b"secret plaintext"])
            with s.writer_lock(K1):
                pass
            s.save_secret("abc", b"\x07" * 32)
    finally:
        os.umask(saved)
    fd = open_private(home / "later.log", os.O_WRONLY)  # what later code writes into a home
    os.close(fd)
    make_private_dir(home / "later")
    modes = tree_modes(home)
    assert set(modes) == {".", "store", "store/data.mdb", "store/lock.mdb", "keys", "keys/abc.key",
                          "locks", f"locks/{K1.hex()}.lock", "later.log", "later"}
    for path, mode in modes.items():
        want = 0o700 if (home / path).is_dir() else 0o600
        assert mode == want, (path, oct(mode))
    # a file that others could read is made private when opened through the helper
    loose = home / "loose"
    loose.write_bytes(b"x")
    loose.chmod(0o644)
    os.close(open_private(loose, os.O_RDONLY))
    assert loose.stat().st_mode & 0o777 == 0o600


def test_an_old_home_is_tightened_once_saying_so(tmp_path):
    from helpers import create, make_tree
    home = tmp_path / "home"
    key = create(home, make_tree(tmp_path / "src", files=5))
    # as an older p2pfs left it, plus a file of the user's own
    for p in [home, *home.rglob("*")]:
        if p.parent.name != "keys":  # key files were always 0600
            p.chmod(0o755 if p.is_dir() else 0o644)
    (home / "notes.txt").write_text("mine")
    (home / "notes.txt").chmod(0o644)
    first = run_cli(home, "ls", key)
    lines = first.stderr.splitlines()
    assert len(lines) == 1 and str(home) in lines[0] and "made it private" in lines[0], first.stderr
    modes = tree_modes(home)
    assert modes.pop("notes.txt") == 0o644  # not p2pfs's: left alone
    for path, mode in modes.items():
        assert mode == (0o700 if (home / path).is_dir() else 0o600), (path, oct(mode))
    again = run_cli(home, "ls", key)
    assert again.stderr == "" and again.stdout == first.stdout


def test_a_shared_directory_as_home_is_not_changed(tmp_path):
    """A home that is a sticky shared directory (like /tmp) keeps its mode;
    the store inside it is private all the same."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with Store(shared) as s:
        s.put_blocks(K1, 0, [b"x"])
    modes = tree_modes(shared)
    assert modes.pop(".") == 0o1777
    assert modes == {"store": 0o700, "store/data.mdb": 0o600, "store/lock.mdb": 0o600}


def test_every_store_method_that_touches_lmdb_turns_its_errors_into_store_errors():
    """An lmdb.Error escaping a Store method is a traceback for the user (the
    cache methods and the DHT signature ones once lacked the guard)."""
    import ast
    import inspect

    import p2pfs.store as store_mod
    tree = ast.parse(inspect.getsource(store_mod))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Store")
    bare = []
    for fn in cls.body:
        if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
            continue
        names = {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}
        touches = any(isinstance(n, ast.Attribute) and n.attr in ("env", "_write")
                      and isinstance(n.value, ast.Name) and n.value.id == "self"
                      for n in ast.walk(fn))
        if touches and not names & {"_guard", "_guard_iter"}:
            bare.append(fn.name)
    assert bare == [], f"unguarded Store methods: {bare}"
