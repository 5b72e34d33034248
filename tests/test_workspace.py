"""The writable tree without FUSE (issue 10): POSIX rules, staged content,
commits that reuse unchanged blocks, holes, and what a reader then sees."""

from __future__ import annotations

import errno
import random

import pytest

from p2pfs import publish
from p2pfs.drive import Drive, verify_drive
from p2pfs.index import KIND_DIR, KIND_FILE, KIND_SYMLINK
from p2pfs.store import Staging, Store
from p2pfs.workspace import RENAME_EXCHANGE, RENAME_NOREPLACE, Workspace, WorkspaceError

BS = 65536


@pytest.fixture
def ws(tmp_path):
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_bytes(b"alpha\n")
    rnd = random.Random(7)
    (src / "big.bin").write_bytes(rnd.randbytes(10 * BS + 123))
    store = Store(tmp_path / "home")
    key = publish.create_drive(store, src).key
    drive = Drive(store, key)
    drive.open_local()
    staging, left = Staging.open_fresh(store.home, key)
    assert left is None
    with store.writer_lock(key):
        w = Workspace(drive, staging)
        yield w
    staging.close(remove=True)
    store.close()


def reader(w: Workspace) -> Drive:
    """A separate view of the drive, as another process would open it."""
    d = Drive(w.drive.store, w.drive.key)
    d.open_local()
    return d


def content(d: Drive, path: bytes) -> bytes:
    e = d.open_local() and d._now(lambda: d.lookup(path))
    return d.read_local(e, 0, e.size + 1)


def code(call) -> int:
    with pytest.raises(WorkspaceError) as info:
        call()
    return info.value.errno


def test_create_write_commit_and_a_reader_sees_it(ws):
    f = ws.create(b"/docs", b"new.txt", 0o644)
    assert ws.write(f, 0, b"hello ") == 6
    assert ws.write(f, 6, b"world\n") == 6
    assert ws.read(f, 0, 100) == b"hello world\n"
    assert ws.lookup(b"/docs/new.txt").size == 12
    assert [n for n, _ in ws.listdir(b"/docs")] == [b"a.txt", b"new.txt"]
    ws.release(f)
    before = ws.drive.version
    result = ws.commit()
    assert result.version == before + 1 and ws.commit() is None  # nothing changed since
    d = reader(ws)
    assert d.version == before + 1
    assert content(d, b"/docs/new.txt") == b"hello world\n"
    assert d.commit.files == 3 and d.commit.bytes == 6 + 10 * BS + 123 + 12
    assert verify_drive(d) == []
    assert ws.staging.stats() == (0, 0, 0)  # committed: nothing left staged


def test_one_changed_byte_appends_one_block(ws):
    f = ws.open(b"/big.bin")
    old = ws.read(f, 0, 11 * BS)
    ws.write(f, 5 * BS + 100, b"X")
    ws.release(f)
    result = ws.commit()
    assert result.new_content_blocks == 1 and result.reused_blocks == 10
    expect = old[:5 * BS + 100] + b"X" + old[5 * BS + 101:]
    assert content(reader(ws), b"/big.bin") == expect


def test_holes_read_as_zeros_before_and_after_a_commit(ws):
    f = ws.create(b"/", b"sparse", 0o600)
    ws.write(f, 3 * BS + 10, b"tail")
    want = bytes(3 * BS + 10) + b"tail"
    assert ws.read(f, 0, 4 * BS) == want
    ws.truncate(f, 200 * BS)  # a long hole: shared zero blocks, not 200 new ones
    want += bytes(200 * BS - len(want))
    ws.release(f)
    result = ws.commit()
    assert result.new_content_blocks <= 3  # the block with data, and the file's last
    assert content(reader(ws), b"/sparse") == want
    g = ws.open(b"/sparse")
    ws.truncate(g, 3 * BS + 12)  # down into the written block ...
    ws.truncate(g, 4 * BS)  # ... and up again: the cut bytes read as zeros
    assert ws.read(g, 3 * BS, BS) == bytes(10) + b"ta" + bytes(BS - 12)
    ws.release(g)
    ws.commit()
    assert content(reader(ws), b"/sparse") == bytes(3 * BS + 10) + b"ta" + bytes(BS - 12)
    assert verify_drive(reader(ws)) == []


def test_truncate_and_grow_a_committed_file(ws):
    f = ws.open(b"/big.bin")
    old = ws.read(f, 0, 11 * BS)
    ws.truncate(f, 2 * BS + 5)
    ws.write(f, 4 * BS, b"end")
    ws.release(f)
    ws.commit()
    assert content(reader(ws), b"/big.bin") == old[:2 * BS + 5] + bytes(2 * BS - 5) + b"end"


def test_rename_rules(ws):
    ws.mkdir(b"/", b"d", 0o755)
    ws.mkdir(b"/d", b"sub", 0o755)
    f = ws.create(b"/d/sub", b"f", 0o644)
    ws.write(f, 0, b"in sub")
    ws.release(f)
    assert code(lambda: ws.rename(b"/", b"d", b"/d/sub", b"x")) == errno.EINVAL  # into itself
    assert code(lambda: ws.rename(b"/", b"d", b"/", b"docs")) == errno.ENOTEMPTY
    assert code(lambda: ws.rename(b"/d/sub", b"f", b"/", b"docs")) == errno.EISDIR
    assert code(lambda: ws.rename(b"/", b"d", b"/", b"big.bin")) == errno.ENOTDIR
    assert code(lambda: ws.rename(b"/", b"big.bin", b"/docs", b"a.txt",
                                  RENAME_NOREPLACE)) == errno.EEXIST
    assert code(lambda: ws.rename(b"/", b"nothing", b"/", b"x")) == errno.ENOENT
    assert code(lambda: ws.rename(b"/", b"big.bin", b"/", b"x", 4)) == errno.EINVAL  # whiteout
    # a whole directory with a file still staged in it
    ws.rename(b"/", b"d", b"/docs", b"moved")
    assert ws.lookup(b"/d") is None
    g = ws.open(b"/docs/moved/sub/f")
    assert ws.read(g, 0, 100) == b"in sub"
    ws.release(g)
    # over an existing file: the old one is gone, totals follow
    ws.rename(b"/docs/moved/sub", b"f", b"/docs", b"a.txt")
    ws.rename(b"/", b"big.bin", b"/docs", b"moved", RENAME_EXCHANGE)
    assert ws.lookup(b"/big.bin").kind == KIND_DIR
    assert ws.lookup(b"/docs/moved").kind == KIND_FILE
    assert ws.lookup(b"/big.bin/sub").kind == KIND_DIR
    ws.commit()
    d = reader(ws)
    assert content(d, b"/docs/a.txt") == b"in sub"
    assert {p for p, _ in d.walk_local()} == {
        b"/", b"/docs", b"/docs/a.txt", b"/docs/moved", b"/big.bin", b"/big.bin/sub"}
    assert d.commit.files == 2 and d.commit.entries == 6
    assert verify_drive(d) == []


def test_rmdir_unlink_and_kinds(ws):
    assert code(lambda: ws.rmdir(b"/", b"docs")) == errno.ENOTEMPTY
    assert code(lambda: ws.rmdir(b"/", b"big.bin")) == errno.ENOTDIR
    assert code(lambda: ws.unlink(b"/", b"docs")) == errno.EISDIR
    assert code(lambda: ws.mkdir(b"/", b"docs", 0o755)) == errno.EEXIST
    assert code(lambda: ws.create(b"/big.bin", b"x", 0o644)) == errno.ENOTDIR
    assert code(lambda: ws.create(b"/", b"x" * 256, 0o644)) == errno.ENAMETOOLONG
    assert code(lambda: ws.symlink(b"/", b"l", b"")) == errno.EINVAL
    ws.symlink(b"/", b"link", b"docs/a.txt")
    assert ws.lookup(b"/link").kind == KIND_SYMLINK and ws.lookup(b"/link").target == b"docs/a.txt"
    ws.unlink(b"/docs", b"a.txt")
    ws.rmdir(b"/", b"docs")
    ws.commit()
    assert {p for p, _ in reader(ws).walk_local()} == {b"/", b"/big.bin", b"/link"}


def test_an_unlinked_open_file_works_until_released(ws):
    f = ws.open(b"/docs/a.txt")
    ws.write(f, 6, b"more\n")
    ws.unlink(b"/docs", b"a.txt")
    assert ws.lookup(b"/docs/a.txt") is None
    ws.write(f, 0, b"ALPHA")
    assert ws.read(f, 0, 100) == b"ALPHA\nmore\n"
    ws.commit()  # the unlinked file is in no version; its staged blocks stay until released
    assert ws.read(f, 0, 100) == b"ALPHA\nmore\n"
    assert ws.staging.stats()[0] == 1
    ws.release(f)
    assert ws.staging.stats() == (0, 0, 0)
    assert reader(ws)._now(lambda: reader(ws).listdir(b"/docs")) == []


def test_metadata_xattrs_and_modes(ws):
    ws.chmod(b"/big.bin", 0o4755)  # setuid never enters a drive
    ws.utimens(b"/docs", 123_456_789_012_345_678)
    ws.setxattr(b"/docs/a.txt", b"user.note", b"v1")
    ws.setxattr(b"/docs/a.txt", b"user.note", b"v2")
    ws.setxattr(b"/docs/a.txt", b"user.other", b"x")
    ws.removexattr(b"/docs/a.txt", b"user.other")
    assert code(lambda: ws.removexattr(b"/docs/a.txt", b"user.other")) == errno.ENODATA
    assert code(lambda: ws.setxattr(b"/docs/a.txt", b"security.selinux", b"x")) == errno.EOPNOTSUPP
    assert code(lambda: ws.setxattr(b"/docs/a.txt", b"user.p2pfs.version", b"9")) == errno.EOPNOTSUPP
    assert code(lambda: ws.setxattr(b"/docs/a.txt", b"user.huge", bytes(BS // 4))) == errno.ENOSPC
    for i in range(1, 40):  # many: until they would not fit in an index node
        try:
            ws.setxattr(b"/big.bin", b"user.v%d" % i, bytes(1000))
        except WorkspaceError as exc:
            assert exc.errno == errno.ENOSPC and i > 10
            break
    f = ws.open(b"/docs/a.txt")
    ws.write(f, 0, b"A")
    ws.utimens(b"/docs/a.txt", 42)  # after a write: the file's mtime is the one set
    ws.release(f)
    ws.commit()
    d = reader(ws)
    entries = dict(d.walk_local())
    assert entries[b"/big.bin"].mode == 0o755
    assert entries[b"/docs"].mtime_ns == 123_456_789_012_345_678
    assert entries[b"/docs/a.txt"].xattrs == ((b"user.note", b"v2"),)
    assert entries[b"/docs/a.txt"].mtime_ns == 42


def test_a_broken_workspace_refuses_changes(ws):
    f = ws.create(b"/", b"x", 0o644)
    ws.write(f, 0, b"data")
    ws.release(f)
    ws.drive.store.env.close()  # the store fails under the commit (as a dying disk would)
    with pytest.raises(Exception):
        ws.commit()
    with pytest.raises(WorkspaceError) as info:
        ws.mkdir(b"/", b"y", 0o755)
    assert info.value.errno == errno.EIO and "takes no more changes" in str(info.value)


def test_leftovers_of_a_killed_writer_are_reported_and_deleted(tmp_path, ws):
    f = ws.create(b"/", b"x", 0o644)
    ws.write(f, 0, b"staged, never committed" * 5000)
    ws.staging.env.close()  # killed: the next writer finds the area as it was left
    again, left = Staging.open_fresh(ws.drive.store.home, ws.drive.key)
    try:
        assert left == (1, 2, len(b"staged, never committed") * 5000)
        assert again.stats() == (0, 0, 0)
    finally:
        again.env.close()


def test_an_entry_that_makes_no_sense_is_shown_but_never_read(tmp_path, ws):
    """A version written elsewhere (another tool holding the key) may hold
    a file whose extents do not cover its size, or past the log, and a link
    with a NUL in its target.  The writable view read the missing blocks
    as zeros; now opening or reading the link is EIO naming the problem,
    and the entry can still be removed or replaced."""
    from p2pfs.index import Entry
    T = 1_700_000_000_000_000_000
    big = ws.lookup(b"/big.bin")
    first = big.extents[0][0]
    bad = {
        b"/short.bin": Entry(KIND_FILE, 0o644, T, 5 * BS, ((first, 2),)),  # 5 blocks named, 2 held
        b"/past.bin": Entry(KIND_FILE, 0o644, T, BS, ((1 << 40, 1),)),
        b"/header.bin": Entry(KIND_FILE, 0o644, T, 10, ((0, 1),)),
        b"/nul": Entry(KIND_SYMLINK, 0o777, T, 3, (), b"a\x00b"),
    }
    for path, entry in bad.items():
        ws.writer.put(path, entry)
    ws.entries += len(bad)
    ws.changed = True
    ws.commit()
    staging, _left = Staging.open_fresh(ws.drive.store.home, ws.drive.key)
    w = Workspace(reader(ws), staging)  # as the next mount sees that version
    try:
        names = {name for name, _e in w.listdir(b"/")}
        assert {b"short.bin", b"past.bin", b"header.bin", b"nul"} <= names
        for path in (b"/short.bin", b"/past.bin", b"/header.bin"):
            with pytest.raises(WorkspaceError) as info:
                w.open(path)
            assert info.value.errno == errno.EIO and "bad entry" in str(info.value), path
        with pytest.raises(WorkspaceError) as info:
            w.readlink(b"/nul")
        assert info.value.errno == errno.EIO and "NUL" in str(info.value)
        assert code(lambda: w.readlink(b"/docs")) == errno.EINVAL
        # removed, and replaced by a rename: the drive is mended
        w.unlink(b"/", b"short.bin")
        w.unlink(b"/", b"nul")
        f = w.create(b"/", b"new.bin", 0o644)
        w.write(f, 0, b"mended\n")
        w.release(f)
        w.rename(b"/", b"new.bin", b"/", b"past.bin")
        w.commit()
        d = reader(ws)
        assert content(d, b"/past.bin") == b"mended\n"
        names = {name for name, _e in w.listdir(b"/")}
        assert b"header.bin" in names and not {b"short.bin", b"nul"} & names
    finally:
        staging.close(remove=True)
