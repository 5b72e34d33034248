"""Index: block formats, path keys, and the copy-on-write B-tree against a dict model."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfs import index as ix
from p2pfs.errors import MissingBlock, NotFoundError, UsageError, VerificationError
from p2pfs.index import (
    KIND_DIR, KIND_FILE, KIND_SYMLINK, Commit, Entry, Header, Index, IndexWriter, Internal,
    Leaf, NodeCache, build, children_range, decode_block, encode_block, key_path,
    normalize_path, path_key, split_path, subtree_ranges,
)


class Log:
    """An in-memory append-only log: a list of bytes as the BlockReader."""

    def __init__(self) -> None:
        self.blocks: list[bytes] = [encode_block(Header(created_ns=1))]
        self.reads = 0

    def read_block(self, index: int) -> bytes:
        self.reads += 1
        if not 0 <= index < len(self.blocks):
            raise MissingBlock(index)
        return self.blocks[index]

    def append(self, blocks: list[bytes]) -> None:
        self.blocks += blocks


def f(n: int = 0, **kw) -> Entry:
    return Entry(KIND_FILE, 0o644, n, n, ((n, 1),) if n else (), **kw)


DIR = Entry(KIND_DIR, 0o755, 7)


# ---------------------------------------------------------------- strategies

names = st.sampled_from([b"a", b"b", b"a!", b"a0", b"a.b", b"zz", "é".encode(), b"\xff\xfe", b"a\x01"])
paths = st.lists(names, min_size=1, max_size=3).map(lambda parts: b"/" + b"/".join(parts))
u63 = st.integers(0, 2**63 - 1)  # decoding bounds every size, count and index to this
small = st.integers(0, 2**40)
entries = st.builds(
    Entry,
    kind=st.sampled_from([KIND_FILE, KIND_DIR, KIND_SYMLINK]),
    mode=st.integers(0, 0o7777),
    mtime_ns=st.integers(-(2**63), 2**63 - 1),
    size=u63,
    extents=st.lists(st.tuples(small, st.integers(1, 2**32)), max_size=3).map(tuple),
    target=st.binary(max_size=40),
    xattrs=st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=20)), max_size=2).map(
        lambda x: tuple(sorted(x))),
)
keys_sorted = st.lists(st.binary(max_size=30), unique=True, max_size=20).map(sorted)
structs = st.one_of(
    st.builds(Header, format=st.integers(1, 5), block_size=st.integers(512, ix.MAX_BLOCK_SIZE),
              created_ns=st.integers(-(2**63), 2**63 - 1)),
    st.builds(Commit, version=st.integers(1, 2**40), root=small, prev=st.integers(-1, 2**40),
              time_ns=st.integers(0, 2**63 - 1), message=st.text(max_size=50), files=small, bytes=u63),
    keys_sorted.flatmap(lambda ks: st.lists(entries, min_size=len(ks), max_size=len(ks)).map(
        lambda es: Leaf(ks, es))),
    keys_sorted.flatmap(lambda ks: st.lists(small, min_size=len(ks) + 1, max_size=len(ks) + 1).map(
        lambda cs: Internal(ks, cs))),
)


# ---------------------------------------------------------------- formats


@given(structs)
def test_every_struct_round_trips(obj):
    data = encode_block(obj)
    assert decode_block(data) == obj
    assert type(decode_block(data)) is type(obj)


@given(entries)
def test_entry_round_trips_inside_a_leaf(entry):
    leaf = Leaf([b"/\x00x"], [entry])
    assert decode_block(encode_block(leaf)).entries[0] == entry


@given(st.binary(max_size=300))
@settings(max_examples=2000)
def test_decode_random_bytes_raises_only_verification_error(data):
    try:
        decode_block(data)
    except VerificationError:
        pass


@given(structs, st.data())
@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
def test_decode_mutated_blocks_raises_only_verification_error(obj, data):
    raw = bytearray(encode_block(obj))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and raw:
            del raw[pos]
        elif op == "truncate":
            del raw[pos:]
    try:
        decode_block(bytes(raw))
    except VerificationError:
        pass


def nested(depth):
    value = [1]
    for _ in range(depth):
        value = [value]
    return value


def test_decode_rejects_structurally_bad_nodes():
    bad = [
        b"",
        b"\xc1",
        encode_block(Leaf([b"b", b"a"], [f(), f()])),           # unsorted
        encode_block(Leaf([b"a", b"a"], [f(), f()])),           # duplicate
        encode_block(Leaf([b"a"], [])),                          # lengths differ
        encode_block(Internal([b"a"], [1])),                     # one child too few
        encode_block(Internal([], [])),
        msgspec.msgpack.encode([3, [b"a"], [[9, 0, 0]]]),         # kind out of range
        msgspec.msgpack.encode([3, [b"a"], [[0, 0o10000, 0]]]),   # mode out of range
        msgspec.msgpack.encode([3, [b"a"], [[0, 0, 0, 1, [[1, 0]]]]]),  # zero-length extent
        msgspec.msgpack.encode([4, [], [-1]]),                    # negative child
        msgspec.msgpack.encode([9, 1]),                           # unknown tag
        msgspec.msgpack.encode([3, [b"x" * (ix.MAX_KEY + 1)], [[0, 0, 0]]]),
        msgspec.msgpack.encode(nested(40)),
        b"\x91" * 100_000,                                        # deep nesting
        msgspec.msgpack.encode(b"x" * 100),
    ]
    for data in bad:
        with pytest.raises(VerificationError):
            decode_block(data)


@pytest.mark.parametrize("entry", [
    Entry(KIND_FILE, 0o644, 0, 2**63),                        # size: st_size is a signed off_t
    Entry(KIND_FILE, 0o644, 2**63, 0),                        # mtime: signed 64-bit ns
    Entry(KIND_FILE, 0o644, 0, 0, ((2**63, 1),)),             # a block index
    Entry(KIND_FILE, 0o644, 0, 0, ((1, 2**63),)),             # a block count
    Entry(KIND_FILE, 0o644, 0, 0, ((1, 0),)),                 # an empty extent
    Entry(KIND_FILE, 0o644, 0, 0, xattrs=((b"user." + b"x" * 251, b""),)),  # name > 255
    Entry(KIND_FILE, 0o644, 0, 0, xattrs=((b"user.x", b"v" * (65536 + 1)),)),  # value > 64 KiB
    Entry(KIND_FILE, 0o644, 0, 0, xattrs=tuple((b"user.%03d" % i, b"") for i in range(257))),
], ids=["size", "mtime", "block", "count", "empty-extent", "xattr-name", "xattr-value", "xattrs"])
def test_decode_bounds_every_number_and_length(entry):
    """Finding 3: nothing a drive signs may overflow stat or the xattr calls."""
    with pytest.raises(VerificationError):
        decode_block(encode_block(Leaf([b"/\x00x"], [entry])))


@pytest.mark.parametrize("commit", [Commit(2**63, 1, -1, 0), Commit(1, 1, -1, 0, files=2**63),
                                    Commit(1, 1, -1, 2**63), Commit(1, 2**63, -1, 0)],
                         ids=["version", "files", "time", "root"])
def test_decode_bounds_every_number_of_a_commit(commit):
    with pytest.raises(VerificationError):
        decode_block(encode_block(commit))


def test_scan_unseen_skips_shared_subtrees_of_another_version():
    log, root, model = big_drive(4, 30, 512)
    writer = IndexWriter(log, root)
    writer.put(b"/d0001/new", f(5))
    blocks, root2 = writer.finish(len(log.blocks), 512)
    log.append(blocks)
    seen: set[int] = set()
    first = list(Index(log, root).scan_unseen(seen))
    assert [k for k, _ in first] == [k for k, _ in Index(log, root).scan()]
    second = list(Index(log, root2).scan_unseen(seen))
    assert (path_key(b"/d0001/new"), f(5)) in second
    assert 0 < len(second) < len(first)  # only the leaves the change rewrote
    assert list(Index(log, root2).scan_unseen(seen)) == []


def test_valid_names_and_keys():
    for name, why in ((b"", "empty name"), (b".", "name is '.'"), (b"..", "name is '..'"),
                      (b"a/b", "contains '/'"), (b"a\x00b", "NUL"), (b"x" * 256, "256 bytes long")):
        assert not ix.valid_name(name)
        assert not ix.valid_key(b"/\x00" + name)
        assert why in ix.name_problem(name)
    for name in (b"a", b"...", b".a", b"x" * 255, "é".encode(), b"\xff", b"a\nb"):
        assert ix.valid_name(name) and ix.valid_key(b"/\x00" + name)
        assert ix.name_problem(name) is None
    assert ix.valid_key(b"") and ix.valid_key(b"/a/b\x00c")
    for parent in (b"", b"a", b"/a/", b"//a", b"/a/./b", b"/a/../b"):
        assert not ix.valid_key(parent + b"\x00c"), parent
    assert ix.shown(b"a\nb\xff") == "a\\nb\\xff"


def test_decode_enforces_a_size_bound():
    data = encode_block(Leaf([b"k"], [f(1, target=b"t" * 2000)]))
    assert decode_block(data, max_size=len(data)).keys == [b"k"]
    with pytest.raises(VerificationError, match="exceeds"):
        decode_block(data, max_size=len(data) - 1)


def test_entry_fields_with_defaults_may_be_absent():
    plain = Entry(KIND_DIR, 0o755, 5)
    assert msgspec.msgpack.decode(encode_block(Leaf([b""], [plain])))[2][0] == [1, 0o755, 5, 0, [], b"", []]
    assert decode_block(msgspec.msgpack.encode([3, [b""], [[1, 0o755, 5]]])).entries[0] == plain


# ---------------------------------------------------------------- paths and keys


@pytest.mark.parametrize("given_path, want", [
    (b"/", b"/"), (b"", b"/"), (b"//", b"/"), (b"/a/", b"/a"), (b"a/b", b"/a/b"),
    (b"/a/./b//c", b"/a/b/c"), ("/é", "/é".encode()), (b"/\xff", b"/\xff"),
])
def test_normalize_path(given_path, want):
    assert normalize_path(given_path) == want


@pytest.mark.parametrize("bad", [b"/a/../b", b"..", b"/a\x00b", b"/" + b"x" * 256, b"/a" * 2049])
def test_normalize_path_rejects(bad):
    with pytest.raises(UsageError):
        normalize_path(bad)


@given(paths)
def test_key_path_inverts_path_key(path):
    assert key_path(path_key(path)) == path
    parent, name = split_path(path)
    assert path_key(path) == parent + b"\x00" + name
    lo, hi = children_range(parent)
    assert lo <= path_key(path) < hi


def test_root_keys():
    assert path_key(b"/") == b"" and key_path(b"") == b"/" and split_path(b"/") == (b"", b"")
    assert path_key(b"/a") == b"/\x00a"


@given(st.lists(paths, unique=True, max_size=30), paths)
def test_subtree_ranges_hold_exactly_the_descendants(all_paths, top):
    keys = {path_key(p): p for p in all_paths}
    inside = {p for k, p in keys.items()
              if any(lo <= k and (hi is None or k < hi) for lo, hi in subtree_ranges(top))}
    assert inside == {p for p in all_paths if p.startswith(top + b"/")}
    children = {p for k, p in keys.items() if children_range(top)[0] <= k < children_range(top)[1]}
    assert children == {p for p in all_paths if split_path(p)[0] == top}


# ---------------------------------------------------------------- the B-tree against a model


def check_version(log: Log, root: int, model: dict, cache: NodeCache | None = None) -> None:
    index = Index(log, root, cache if cache is not None else NodeCache(64))
    assert dict(index.walk()) == model
    assert [path_key(p) for p, _ in index.walk()] == sorted(path_key(p) for p in model)
    children: dict[bytes, list] = {p: [] for p in model}
    for p, e in model.items():
        if p != b"/":
            parent, name = split_path(p)
            children.setdefault(parent, []).append((name, e))
    children.setdefault(b"/", [])
    for d, kids in children.items():
        assert list(index.listdir(d)) == sorted(kids), d
    for p, e in model.items():
        assert index.lookup(p) == e
    assert index.lookup(b"/nothing/here") is None


def model_delete(model: dict, path: bytes) -> None:
    for p in [p for p in model if p == path or p.startswith(path + b"/")]:
        del model[p]


ops = st.one_of(
    st.tuples(st.just("put"), paths, entries),
    st.tuples(st.just("delete"), paths),
    st.tuples(st.just("move"), paths, paths),
    st.tuples(st.just("fill"), paths, st.integers(1, 60)),
    st.tuples(st.just("commit")),
)


BASE = {b"/": DIR, b"/a": DIR, b"/b": DIR, b"/b/a": DIR}
BASE.update({d + b"/f%03d" % i: f(i) for d in (b"/a", b"/b/a", b"/zz") for i in range(400)})


@pytest.mark.parametrize("block_size", [512, 1024, 65536])
@pytest.mark.parametrize("split_count", [3, ix._SPLIT_COUNT])
@pytest.mark.parametrize("base", [{b"/": DIR}, BASE], ids=["empty", "deep"])
def test_writer_matches_a_dict_model_and_old_versions_stay(block_size, split_count, base):
    old_split = ix._SPLIT_COUNT
    ix._SPLIT_COUNT = split_count
    try:
        run_model(block_size, base)
    finally:
        ix._SPLIT_COUNT = old_split


def run_model(block_size, base):
    @given(st.lists(ops, max_size=40), st.booleans())
    @settings(max_examples=50 if len(base) == 1 else 25, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    def prop(sequence, fresh_writers):
        log = Log()
        cache = NodeCache(max_nodes=8)
        blocks, root = build(base.items(), 1, block_size)
        log.append(blocks)
        model = dict(base)
        versions = [(root, dict(model))]
        writer = IndexWriter(log, root, cache)
        for op in sequence + [("commit",)]:
            if op[0] == "put":
                writer.put(op[1], op[2])
                model[op[1]] = op[2]
            elif op[0] == "delete":
                assert writer.delete(op[1]) == any(p == op[1] or p.startswith(op[1] + b"/") for p in model)
                model_delete(model, op[1])
            elif op[0] == "fill":
                for i in range(op[2]):
                    p = op[1] + b"/f%03d" % i
                    writer.put(p, f(i))
                    model[p] = f(i)
            elif op[0] == "move":
                old, new = op[1], op[2]
                if old not in model:
                    with pytest.raises(NotFoundError):
                        writer.move(old, new)
                elif new.startswith(old + b"/"):
                    with pytest.raises(UsageError):
                        writer.move(old, new)
                else:
                    writer.move(old, new)
                    if new != old:
                        moved = {new + p[len(old):]: e for p, e in model.items()
                                 if p == old or p.startswith(old + b"/")}
                        model_delete(model, old)
                        model_delete(model, new)
                        model.update(moved)
            else:
                first = len(log.blocks)
                blocks, root = writer.finish(first, block_size)
                assert all(len(b) <= block_size for b in blocks)
                for i, b in enumerate(blocks):  # children before parents
                    node = decode_block(b)
                    if isinstance(node, Internal):
                        assert all(c < first + i for c in node.children)
                assert root == (first + len(blocks) - 1 if blocks else root)
                log.append(blocks)
                versions.append((root, dict(model)))
                for old_root, snapshot in versions:
                    check_version(log, old_root, snapshot, cache if fresh_writers else None)
                if fresh_writers:
                    writer = IndexWriter(log, root, cache)
            assert dict(writer.items()) == model

    prop()


@pytest.mark.parametrize("block_size", [512, 1024, 4096])
def test_build_matches_a_dict_model(block_size):
    @given(st.dictionaries(paths, entries, max_size=80))
    @settings(max_examples=80, deadline=None)
    def prop(model):
        log = Log()
        blocks, root = build(model.items(), 1, block_size)
        assert all(len(b) <= block_size for b in blocks)
        log.append(blocks)
        check_version(log, root, model)

    prop()


@pytest.mark.parametrize("block_size", [512, 777, 1024])
def test_node_splits_at_boundaries(block_size):
    """Grow a directory one entry at a time across many split points, in both builders."""
    log = Log()
    model = {}
    writer = IndexWriter(log, None)
    previous_leaves = 0
    for n in range(400):
        p = b"/d/%05d" % n
        model[p] = f(n)
        writer.put(p, f(n))
        blocks, root = writer.finish(len(log.blocks), block_size)
        assert blocks and all(len(b) <= block_size for b in blocks)
        log.append(blocks)
        bulk = build(model.items(), 1, block_size)[0]
        leaves = sum(isinstance(decode_block(b), Leaf) for b in bulk)
        assert leaves >= previous_leaves
        previous_leaves = leaves
        if n % 37 == 0 or leaves != previous_leaves:
            check_version(log, root, model)
    assert previous_leaves > 10
    check_version(log, root, model)


def test_a_leaf_filled_to_exactly_the_block_size():
    """A leaf of exactly block_size bytes is one block; one byte less splits it."""
    tried = 0
    for n in range(1, 120):
        items = [(b"/%03d" % i, f(i)) for i in range(n)]
        exact = len(encode_block(Leaf([path_key(p) for p, _ in items], [e for _, e in items])))
        if exact <= 512:
            continue
        tried += 1
        blocks, root = build(items, 1, exact)
        assert len(blocks) == 1 and len(blocks[0]) == exact
        for size in (exact - 1, exact + 1):
            blocks, root = build(items, 1, size)
            assert all(len(b) <= size for b in blocks)
            assert (len(blocks) > 1) == (size < exact)
            log = Log()
            log.append(blocks)
            check_version(log, root, dict(items))
    assert tried > 50


# ---------------------------------------------------------------- copy-on-write, errors, scale


def big_drive(dirs: int, files: int, block_size: int = 65536):
    items = [(b"/", DIR)] + [(b"/d%04d" % d, DIR) for d in range(dirs)]
    items += [(b"/d%04d/f%05d" % (d, i), f(d * files + i)) for d in range(dirs) for i in range(files)]
    log = Log()
    blocks, root = build(items, 1, block_size)
    log.append(blocks)
    return log, root, dict(items)


def test_commit_writes_only_the_changed_path():
    log, root, model = big_drive(100, 100, 1024)
    depth = len(Index(log, root).path_blocks(b"/d0050/f00050"))
    assert depth >= 3
    before = {p: Index(log, root).path_blocks(p) for p in (b"/d0010/f00001", b"/d0090/f00099")}
    writer = IndexWriter(log, root)
    writer.put(b"/d0050/f00050", f(1))
    blocks, new_root = writer.finish(len(log.blocks), 1024)
    assert len(blocks) == depth  # one node per level, nothing else
    log.append(blocks)
    for p, path in before.items():
        assert Index(log, new_root).path_blocks(p)[1:][-1] == path[-1]  # same leaf block
    assert Index(log, root).lookup(b"/d0050/f00050") == model[b"/d0050/f00050"]
    assert Index(log, new_root).lookup(b"/d0050/f00050") == f(1)
    # No change: nothing to append, same root.
    assert IndexWriter(log, new_root).finish(len(log.blocks), 1024) == ([], new_root)


def test_moving_a_directory_keeps_its_files_content():
    log, root, model = big_drive(20, 50, 1024)
    writer = IndexWriter(log, root)
    writer.move(b"/d0003", b"/d0019/inner/moved")
    blocks, root2 = writer.finish(len(log.blocks), 1024)
    log.append(blocks)
    new = Index(log, root2)
    assert new.lookup(b"/d0003") is None
    assert [n for n, _ in new.listdir(b"/d0019/inner/moved")] == [b"f%05d" % i for i in range(50)]
    assert new.lookup(b"/d0019/inner/moved/f00007") == model[b"/d0003/f00007"]
    check_version(log, root, model)


def test_root_cannot_be_deleted_or_moved():
    writer = IndexWriter(Log(), None)
    writer.put(b"/", DIR)
    with pytest.raises(UsageError):
        writer.delete(b"/")
    with pytest.raises(UsageError):
        writer.move(b"/", b"/x")
    writer.put(b"/x", DIR)
    with pytest.raises(UsageError):
        writer.move(b"/x", b"/")
    with pytest.raises(UsageError):
        writer.move(b"/x", b"/x/y")
    with pytest.raises(NotFoundError):
        writer.move(b"/nope", b"/y")


def test_an_entry_too_big_for_a_node_names_its_path():
    writer = IndexWriter(Log(), None)
    writer.put(b"/", DIR)
    writer.put(b"/huge", f(1, xattrs=((b"user.blob", b"x" * 70_000),)))
    with pytest.raises(UsageError, match="/huge"):
        writer.finish(1, 65536)
    with pytest.raises(UsageError, match="/huge"):
        build([(b"/huge", f(1, xattrs=((b"user.blob", b"x" * 700),)))], 1, 512)


def test_empty_index_and_emptied_index():
    log = Log()
    blocks, root = IndexWriter(log, None).finish(1, 512)
    log.append(blocks)
    assert list(Index(log, root).walk()) == [] and Index(log, root).lookup(b"/") is None
    log2, root2, model = big_drive(5, 40, 512)
    writer = IndexWriter(log2, root2)
    for d in range(5):
        writer.delete(b"/d%04d" % d)
    blocks, root3 = writer.finish(len(log2.blocks), 512)
    log2.append(blocks)
    check_version(log2, root3, {b"/": DIR})
    assert len(blocks) == 1  # one leaf holding the root entry: emptied subtrees collapse


def test_missing_blocks_propagate_and_the_writer_can_retry():
    log, root, model = big_drive(30, 30, 512)
    held = dict(enumerate(log.blocks))
    leaf = Index(log, root).path_blocks(b"/d0007/f00003")[-1]

    class Partial:
        def read_block(self, i):
            if i not in held:
                raise MissingBlock(i)
            return held[i]

    del held[leaf]
    with pytest.raises(MissingBlock) as info:
        Index(Partial(), root).lookup(b"/d0007/f00003")
    assert info.value.indices == [leaf]
    with pytest.raises(MissingBlock):
        list(Index(Partial(), root).walk())
    writer = IndexWriter(Partial(), root)
    with pytest.raises(MissingBlock):
        writer.put(b"/d0007/f00003", f(99))
    held[leaf] = log.blocks[leaf]  # "fetched": retry the same call
    writer.put(b"/d0007/f00003", f(99))
    model[b"/d0007/f00003"] = f(99)
    blocks, new_root = writer.finish(len(log.blocks), 512)
    log.append(blocks)
    check_version(log, new_root, model)


def test_hostile_nodes_raise_verification_error():
    log = Log()
    log.append([encode_block(Leaf([b"/\x00a"], [f(1)]))])            # 1
    log.append([encode_block(Internal([b"/\x00b"], [1, 3]))])         # 2: child 3 is later
    log.append([encode_block(Internal([], [2]))])                      # 3
    log.append([encode_block(Commit(version=1, root=1, prev=-1, time_ns=0))])  # 4
    log.append([encode_block(Internal([], [4]))])                      # 5: child is a commit
    log.append([b"\x93\x03garbage"])                                   # 6
    log.append([encode_block(Internal([b"/\x00b"], [1, 1]))])         # 7: one leaf twice
    log.append([encode_block(Leaf([], []))])                           # 8
    log.append([encode_block(Internal([b"/\x00b"], [1, 8]))])         # 9: empty leaf below root
    log.append([encode_block(Internal([b"/\x00a"], [1, 8]))])         # 10: /a is not below /a
    shared = 10
    for _ in range(30):  # a DAG 30 levels deep, each level pointing twice at the one below
        log.append([encode_block(Internal([b"/\x00b"], [shared, shared]))])
        shared = len(log.blocks) - 1
    for root in (3, 4, 5, 6, 0, 7, 9, 10, shared):
        with pytest.raises(VerificationError):
            list(Index(log, root).walk())
        with pytest.raises(VerificationError):
            Index(log, root).lookup(b"/b")


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_mutated_logs_raise_only_verification_error_or_missing_block(data):
    log, root, _ = small_drive()
    victim = data.draw(st.integers(1, len(log.blocks) - 1))
    raw = bytearray(log.blocks[victim])
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    log.blocks[victim] = bytes(raw)
    index = Index(log, root)
    writer = IndexWriter(log, root)
    for call in (lambda: list(index.walk()), lambda: index.lookup(b"/d0001/f00003"),
                 lambda: list(index.listdir(b"/d0002")), lambda: index.path_blocks(b"/d0000"),
                 lambda: writer.move(b"/d0001", b"/d0003/x"), lambda: writer.finish(len(log.blocks), 512)):
        try:
            call()
        except (VerificationError, MissingBlock, NotFoundError):
            pass


_small = None


def small_drive():
    global _small
    if _small is None:
        _small = big_drive(4, 30, 512)
    log, root, model = _small
    copy = Log()
    copy.blocks = list(log.blocks)
    return copy, root, model


def test_cache_is_bounded_and_saves_reads():
    log, root, _ = big_drive(50, 50, 1024)
    cache = NodeCache(max_nodes=4)
    index = Index(log, root, cache)
    for d in range(50):
        index.lookup(b"/d%04d/f00001" % d)
    assert len(cache) == 4
    log.reads = 0
    index.lookup(b"/d0049/f00001")
    assert log.reads == 0


def test_many_puts_in_one_batch():
    log, root, model = big_drive(100, 100)
    writer = IndexWriter(log, root)
    for i in range(10_000):
        p = b"/d%04d/new%05d" % (i % 100, i)
        writer.put(p, f(i))
        model[p] = f(i)
    blocks, root = writer.finish(len(log.blocks), 65536)
    log.append(blocks)
    check_version(log, root, model)


@pytest.mark.slow
def test_lookup_in_a_million_entries_reads_at_most_four_blocks():
    log, root, model = big_drive(1000, 1000)
    for probe in (b"/", b"/d0000", b"/d0999/f00999", b"/d0500/f00500", b"/zzz"):
        log.reads = 0
        assert Index(log, root, NodeCache()).lookup(probe) == model.get(probe)
        assert log.reads <= 4


def test_index_imports_only_the_pure_core():
    code = ("import sys, p2pfs.index; bad = {'trio', 'lmdb', 'pyfuse3', 'socket', 'nacl'} & set(sys.modules);"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_missing_block_leaves_move_and_delete_undone():
    log, root, model = big_drive(30, 30, 512)
    held = dict(enumerate(log.blocks))
    index = Index(log, root)

    class Partial:
        def read_block(self, i):
            if i not in held:
                raise MissingBlock(i)
            return held[i]

    # The destination's leaf is missing: the source's subtree reads fine first.
    target_leaf = index.path_blocks(b"/d0020/moved")[-1]
    assert target_leaf not in {index.path_blocks(b"/d0003/f%05d" % i)[-1] for i in range(30)}
    del held[target_leaf]
    writer = IndexWriter(Partial(), root)
    with pytest.raises(MissingBlock):
        writer.move(b"/d0003", b"/d0020/moved")
    held[target_leaf] = log.blocks[target_leaf]
    assert {p: e for p, e in writer.items()} == model  # nothing half-done
    doomed_leaf = index.path_blocks(b"/d0010/f00029")[-1]
    del held[doomed_leaf]
    with pytest.raises(MissingBlock):
        writer.delete(b"/d0010")
    held[doomed_leaf] = log.blocks[doomed_leaf]
    assert dict(writer.items()) == model
    writer.move(b"/d0003", b"/d0020/moved")
    writer.delete(b"/d0010")
    for p in [p for p in model if p == b"/d0003" or p.startswith(b"/d0003/")]:
        model[b"/d0020/moved" + p[len(b"/d0003"):]] = model.pop(p)
    model_delete(model, b"/d0010")
    blocks, new_root = writer.finish(len(log.blocks), 512)
    log.append(blocks)
    check_version(log, new_root, model)


@given(st.lists(st.sampled_from([b"", b".", b"..", b"a", b"..a", b".b", b"\x00", b"x" * 200, b"y" * 256]), max_size=6),
       st.booleans(), st.booleans())
def test_normalize_path_agrees_with_a_slow_reference(parts, lead, trail):
    raw = (b"/" if lead else b"") + b"/".join(parts) + (b"/" if trail else b"")
    kept = [p for p in raw.split(b"/") if p and p != b"."]
    want = b"/" + b"/".join(kept)
    if b"\x00" in raw or b".." in kept or any(len(p) > 255 for p in kept) or len(want) > 4096:
        with pytest.raises(UsageError):
            normalize_path(raw)
    else:
        assert normalize_path(raw) == want
        assert normalize_path(want) == want


# ---------------------------------------------------------------- diff of two versions


def slow_diff(log: Log, old_root: int, new_root: int) -> list:
    """The reference: walk both versions whole and compare."""
    old = {path_key(p): e for p, e in Index(log, old_root).walk()}
    new = {path_key(p): e for p, e in Index(log, new_root).walk()}
    return [(key_path(k), old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


@pytest.mark.parametrize("block_size", [512, 1024, 65536])
@pytest.mark.parametrize("base", [{b"/": DIR}, BASE], ids=["empty", "deep"])
def test_diff_matches_a_slow_reference(block_size, base):
    @given(st.lists(ops, max_size=30), st.booleans())
    @settings(max_examples=40 if len(base) == 1 else 20, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    def prop(sequence, bulk):
        log = Log()
        blocks, root = build(base.items(), 1, block_size)
        log.append(blocks)
        roots = [root]
        writer = IndexWriter(log, root, NodeCache(8))
        model = dict(base)
        for op in sequence + [("commit",)]:
            if op[0] == "put":
                writer.put(op[1], op[2])
                model[op[1]] = op[2]
            elif op[0] == "delete":
                writer.delete(op[1])
                model_delete(model, op[1])
            elif op[0] == "fill":
                for i in range(op[2]):
                    writer.put(op[1] + b"/f%03d" % i, f(i + 1000))
                    model[op[1] + b"/f%03d" % i] = f(i + 1000)
            elif op[0] == "move":
                if op[1] in model and not op[2].startswith(op[1] + b"/"):
                    writer.move(op[1], op[2])
                    model = dict(writer.items())
            else:
                blocks, root = writer.finish(len(log.blocks), block_size)
                log.append(blocks)
                roots.append(root)
        if bulk:  # an unrelated layout of the same content: nothing shared
            blocks, root = build(model.items(), len(log.blocks), block_size)
            log.append(blocks)
            roots.append(root)
        for old in roots:
            for new in roots:
                assert list(ix.diff(log, old, new)) == slow_diff(log, old, new)

    prop()


def test_diff_reads_only_the_changed_paths():
    log, root, model = big_drive(200, 500, 4096)  # 100,200 entries, ~1,500 leaves
    depth = len(Index(log, root).path_blocks(b"/d0100/f00100"))
    writer = IndexWriter(log, root)
    writer.put(b"/d0100/f00100", f(7))
    writer.delete(b"/d0150/f00003")
    writer.put(b"/d0199/new", f(8))
    blocks, new_root = writer.finish(len(log.blocks), 4096)
    log.append(blocks)
    log.reads = 0
    got = list(ix.diff(log, root, new_root))
    assert [(p, n) for p, _, n in got] == [(b"/d0100/f00100", f(7)), (b"/d0150/f00003", None),
                                           (b"/d0199/new", f(8))]
    # each change costs its leaf and the nodes above it, on both sides (a
    # neighbouring leaf now and then): nowhere near the ~1,500 leaves of the index
    assert log.reads <= 4 * 3 * depth, log.reads
    log.reads = 0
    assert list(ix.diff(log, new_root, new_root)) == [] and log.reads == 0


def test_diff_of_hostile_nodes_raises_verification_error():
    log = Log()
    good, root = build([(b"/", DIR), (b"/a", f(1)), (b"/b", f(2))], 1, 512)
    log.append(good)
    leaf = len(log.blocks)
    log.append([encode_block(Leaf([path_key(b"/z")], [f(3)]))])  # keys outside the range below
    log.append([encode_block(Internal([path_key(b"/m")], [leaf, leaf]))])
    with pytest.raises(VerificationError):
        list(ix.diff(log, root, len(log.blocks) - 1))
    log.append([encode_block(Internal([], [len(log.blocks) + 5]))])  # points forward
    with pytest.raises(VerificationError):
        list(ix.diff(log, root, len(log.blocks) - 1))


def test_diff_keys_gives_the_raw_keys_and_from_nothing_every_key():
    """diff_keys is diff without taking keys for paths: a hostile key whose
    name holds '/' or NUL comes out as stored (diff would show it as another,
    innocent-looking path), and from an empty index (None) every key."""
    log = Log()
    hostile = [b"", b"/\x00a/../../x", b"/\x00n\x00ul", b"/\x00ok"]
    root = len(log.blocks)
    log.append([encode_block(Leaf(hostile, [DIR, f(1), f(2), f(3)]))])
    got = list(ix.diff_keys(log, None, root))
    assert [k for k, _old, _new in got] == hostile
    assert all(old is None for _k, old, _new in got)
    assert [p for p, _o, _n in ix.diff(log, None, root)] == [b"/", b"/a/../../x", b"/n\x00ul",
                                                             b"/ok"]
    assert list(ix.diff_keys(log, root, root)) == []
