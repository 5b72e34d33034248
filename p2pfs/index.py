"""Log block formats and the copy-on-write B-tree index of a drive.

Theory of operation
-------------------
Every block of a drive's log that is not file content is one msgpack-encoded,
tagged, array-like msgspec struct: `Header` (block 0), `Leaf` and `Internal`
(B-tree nodes) and `Commit` (the last block of every signed version).

The index of one version is a B+-tree whose nodes are log blocks.  Keys are
bytes: parent directory path ‖ 0x00 ‖ name, so the children of one directory
are one contiguous key range (`children_range`) sorted by name, and the root
directory's own entry has the key b"" (the smallest key).  All descendants of
a directory D other than the root are the two ranges [D‖0x00, D‖0x01) (its
children) and [D‖"/", D‖"0") (everything deeper) — see `subtree_ranges`.

Invariants (checked by the readers where a peer could break them):
* `Internal(keys, children)`: len(children) == len(keys) + 1, keys strictly
  ascending; child i holds exactly the keys k with keys[i-1] <= k < keys[i].
* `Leaf(keys, entries)`: same length, keys strictly ascending.
* A node's children have smaller block indices than the node itself (a commit
  appends children before parents), so every descent terminates even on a
  malicious drive; a node breaking this is a `VerificationError`.
* Readers check each stored node's keys against the range its parent gives
  it, and that leaves below the root are not empty; so no subtree can be
  reached twice and a scan costs at most what its keys cost.
* Encoded nodes never exceed the drive's block size (split by encoded size).
  Every separator key fits twice in a node, so each internal node holds at
  least two children and building the levels above always converges.

Copy-on-write: `IndexWriter` copies a node into memory the first time a change
touches it and keeps every dirty node in memory until `finish`, which encodes
only the dirty nodes (post-order: children before parents), repacking runs of
adjacent dirty leaves by encoded size.  Clean subtrees keep their block
indices, and old roots keep reading exactly as before because nothing is ever
overwritten.

This module is pure: it never does I/O.  A `BlockReader` supplies blocks and
may raise `MissingBlock`, which propagates unchanged to the async caller that
fetches the block and retries.
"""

from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Annotated, Protocol, Union

import msgspec

from p2pfs.errors import NotFoundError, UsageError, VerificationError

__all__ = [
    "KIND_FILE", "KIND_DIR", "KIND_SYMLINK", "MAX_BLOCK_SIZE", "MAX_PATH", "MAX_NAME",
    "Header", "Commit", "Leaf", "Internal", "Entry", "encode_block", "decode_block",
    "normalize_path", "split_path", "path_key", "key_path", "children_range", "valid_name", "name_problem",
    "valid_key", "shown",
    "subtree_ranges", "BlockReader", "NodeCache", "Index", "IndexWriter", "build", "diff",
    "diff_keys",
]

KIND_FILE = 0
KIND_DIR = 1
KIND_SYMLINK = 2

MAX_BLOCK_SIZE = 1 << 24  # 16 MiB: no block (content or index) may be larger
MAX_PATH = 4096  # bytes of a normalised path (Linux PATH_MAX)
MAX_NAME = 255  # bytes of one path component (Linux NAME_MAX)
MAX_KEY = MAX_PATH + 1
MAX_DEPTH = 64  # a B-tree of 64 KiB nodes is 3-4 levels deep; anything this deep is hostile

# Every number is bounded where it is decoded, so that nothing a drive's
# author signs can overflow a stat field (off_t, time_t ns, block counts):
# sizes, counts and block indices are 0..2^63-1, times signed 64-bit ns.
U63_MAX = (1 << 63) - 1
I64_MIN = -(1 << 63)
MAX_XATTRS = 256  # with names <= 255 bytes the NUL-separated list fits Linux's 64 KiB
MAX_XATTR_NAME = 255  # Linux XATTR_NAME_MAX
MAX_XATTR_VALUE = 1 << 16  # Linux XATTR_SIZE_MAX

_U = Annotated[int, msgspec.Meta(ge=0, le=U63_MAX)]
_Block = Annotated[int, msgspec.Meta(ge=0, le=U63_MAX)]
_Count = Annotated[int, msgspec.Meta(ge=1, le=U63_MAX)]
_Ns = Annotated[int, msgspec.Meta(ge=I64_MIN, le=U63_MAX)]
_Key = Annotated[bytes, msgspec.Meta(max_length=MAX_KEY)]
_Xattr = tuple[Annotated[bytes, msgspec.Meta(max_length=MAX_XATTR_NAME)],
               Annotated[bytes, msgspec.Meta(max_length=MAX_XATTR_VALUE)]]


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One path's metadata.  extents: ((first_block, block_count), ...) in file order.

    Decoding bounds every field; whether the fields make sense together
    (extents against size and the log, names, the xattr namespace) is the
    reader's check, `drive.Drive` (`check_entry`)."""

    kind: Annotated[int, msgspec.Meta(ge=0, le=2)]
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o7777)]
    mtime_ns: _Ns
    size: _U = 0
    extents: tuple[tuple[_Block, _Count], ...] = ()
    target: Annotated[bytes, msgspec.Meta(max_length=MAX_PATH)] = b""
    xattrs: Annotated[tuple[_Xattr, ...], msgspec.Meta(max_length=MAX_XATTRS)] = ()


class Header(msgspec.Struct, frozen=True, array_like=True, tag=1):
    """Block 0 of every drive."""

    format: Annotated[int, msgspec.Meta(ge=1, le=U63_MAX)] = 1
    block_size: Annotated[int, msgspec.Meta(ge=512, le=MAX_BLOCK_SIZE)] = 65536
    created_ns: _Ns = 0


class Commit(msgspec.Struct, frozen=True, array_like=True, tag=2):
    """The last block of every version: where its index root is, and totals."""

    version: Annotated[int, msgspec.Meta(ge=1, le=U63_MAX)]
    root: _Block
    prev: Annotated[int, msgspec.Meta(ge=-1, le=U63_MAX)]
    time_ns: _Ns
    message: str = ""
    files: _U = 0
    bytes: _U = 0
    entries: _U = 0  # every entry, the root included (0: written before this field)


class Leaf(msgspec.Struct, frozen=True, array_like=True, tag=3):
    keys: list[_Key]
    entries: list[Entry]


class Internal(msgspec.Struct, frozen=True, array_like=True, tag=4):
    keys: list[_Key]
    children: list[_Block]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Union[Header, Commit, Leaf, Internal])


def encode_block(obj: Header | Commit | Leaf | Internal) -> bytes:
    """Encode one non-content log block."""
    return _encoder.encode(obj)


def _ascending(keys: list[bytes]) -> bool:
    return all(a < b for a, b in zip(keys, keys[1:]))


def decode_block(data: bytes, max_size: int = MAX_BLOCK_SIZE) -> Header | Commit | Leaf | Internal:
    """Decode one non-content block.

    Raises VerificationError (and nothing else) for anything malformed or larger
    than `max_size`: a verified block that does not decode means a bad drive.
    """
    if len(data) > max_size:
        raise VerificationError(f"index block of {len(data)} bytes exceeds the limit of {max_size}")
    try:
        obj = _decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise VerificationError(f"malformed index block: {exc}") from None
    if isinstance(obj, Leaf):
        if len(obj.keys) != len(obj.entries) or not _ascending(obj.keys):
            raise VerificationError("malformed index block: leaf keys unsorted or not matching entries")
    elif isinstance(obj, Internal):
        if len(obj.children) != len(obj.keys) + 1 or not _ascending(obj.keys):
            raise VerificationError("malformed index block: internal node keys unsorted or not matching children")
    return obj


# ---------------------------------------------------------------- paths and keys


def normalize_path(path: bytes | str) -> bytes:
    """Absolute, normalised bytes path: b"/" for the root, no trailing slash.

    Relative paths are taken from the root; empty and "." components are
    dropped.  Raises UsageError for "..", NUL bytes, or over-long names/paths.
    """
    if (type(path) is bytes and path[:1] == b"/" and len(path) <= MAX_NAME + 1
            and b"//" not in path and b"/./" not in path and b"/../" not in path
            and b"\x00" not in path and (path == b"/" or not path.endswith((b"/", b"/.", b"/..")))):
        return path  # already normal (the common case, kept cheap for bulk loads)
    if isinstance(path, str):
        path = os.fsencode(path)
    if not isinstance(path, bytes):
        raise TypeError(f"path must be bytes or str, not {type(path).__name__}")
    if b"\x00" in path:
        raise UsageError(f"path {path!r} contains a NUL byte")
    parts = [p for p in path.split(b"/") if p and p != b"."]
    for p in parts:
        if p == b"..":
            raise UsageError(f"path {path!r} contains '..'; give a path inside the drive")
        if len(p) > MAX_NAME:
            raise UsageError(f"path {path!r} has a name longer than {MAX_NAME} bytes")
    out = b"/" + b"/".join(parts)
    if len(out) > MAX_PATH:
        raise UsageError(f"path {path[:64]!r}... is longer than {MAX_PATH} bytes")
    return out


def valid_name(name: bytes) -> bool:
    """Whether a directory entry may have this name: 1 to MAX_NAME bytes, not
    "." or "..", no "/" and no NUL (what a Linux directory can hold)."""
    return (0 < len(name) <= MAX_NAME and name != b"." and name != b".."
            and b"/" not in name and b"\x00" not in name)


def name_problem(name: bytes) -> str | None:
    """Why `name` cannot be a directory entry (see `valid_name`), or None."""
    if valid_name(name):
        return None
    if not name:
        return "empty name"
    if name in (b".", b".."):
        return f"name is {name.decode()!r}"
    if b"/" in name:
        return "name contains '/'"
    if b"\x00" in name:
        return "name contains a NUL byte"
    return f"name is {len(name)} bytes long (at most {MAX_NAME})"


def valid_key(key: bytes) -> bool:
    """Whether an index key is the key of a normalised path (b"" is the root's)."""
    if not key:
        return True
    parent, _, name = key.partition(b"\x00")
    if not valid_name(name) or len(parent) + 1 + len(name) > MAX_PATH:
        return False
    try:
        return normalize_path(parent) == parent
    except UsageError:
        return False


def shown(path: bytes) -> str:
    """A path or name as one line of a message: bytes that are not UTF-8 and
    control characters (a name may hold a newline) are escaped."""
    text = path.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def split_path(path: bytes) -> tuple[bytes, bytes]:
    """(parent, name) of a normalised path; (b"", b"") for the root."""
    if path == b"/":
        return b"", b""
    i = path.rindex(b"/")
    return (path[:i] or b"/"), path[i + 1:]


def path_key(path: bytes) -> bytes:
    """Index key of a normalised path: parent ‖ 0x00 ‖ name; b"" for the root."""
    if path == b"/":
        return b""
    i = path.rindex(b"/")
    return (path[:i] or b"/") + b"\x00" + path[i + 1:]


def key_path(key: bytes) -> bytes:
    """Inverse of path_key."""
    if not key:
        return b"/"
    parent, _, name = key.partition(b"\x00")
    return (b"/" if parent == b"/" else parent + b"/") + name


def children_range(path: bytes) -> tuple[bytes, bytes]:
    """[lo, hi) key range of the children of directory `path` (normalised)."""
    return path + b"\x00", path + b"\x01"


def subtree_ranges(path: bytes) -> list[tuple[bytes, bytes | None]]:
    """[lo, hi) key ranges (hi None = unbounded) of every descendant of `path`."""
    if path == b"/":
        return [(b"/", None)]
    return [(path + b"\x00", path + b"\x01"), (path + b"/", path + b"0")]


# ---------------------------------------------------------------- reading


class BlockReader(Protocol):
    def read_block(self, index: int) -> bytes:
        """The bytes of log block `index`; raises MissingBlock(index) if not held."""
        ...


class NodeCache:
    """Bounded LRU of decoded nodes keyed by block index (blocks never change).

    Bounded by count and by the encoded bytes of the nodes it holds (a
    drive's nodes may each be as big as its block size).  One cache belongs
    to one drive: block indices of different drives collide.
    """

    def __init__(self, max_nodes: int = 256, max_bytes: int = 64 << 20):
        self.max_nodes = max_nodes
        self.max_bytes = max_bytes
        self._nodes: OrderedDict[int, tuple[Leaf | Internal, int]] = OrderedDict()
        self._bytes = 0

    def get(self, index: int) -> Leaf | Internal | None:
        hit = self._nodes.get(index)
        if hit is None:
            return None
        self._nodes.move_to_end(index)
        return hit[0]

    def put(self, index: int, node: Leaf | Internal, size: int = 0) -> None:
        """Keep `node` (`size`: the bytes it was decoded from)."""
        old = self._nodes.pop(index, None)
        if old is not None:
            self._bytes -= old[1]
        self._nodes[index] = (node, size)
        self._bytes += size
        while len(self._nodes) > self.max_nodes or (self._bytes > self.max_bytes
                                                    and len(self._nodes) > 1):
            self._bytes -= self._nodes.popitem(last=False)[1][1]

    def __len__(self) -> int:
        return len(self._nodes)

    def clear(self) -> None:
        self._nodes.clear()
        self._bytes = 0


def _load(reader: BlockReader, cache: NodeCache | None, index: int,
          max_size: int = MAX_BLOCK_SIZE) -> Leaf | Internal:
    if cache is not None:
        node = cache.get(index)
        if node is not None:
            return node
    data = reader.read_block(index)  # may raise MissingBlock: let it propagate
    node = decode_block(data, max_size)
    if isinstance(node, Internal):
        if node.children and max(node.children) >= index:
            raise VerificationError(f"index block {index} points at a later block")
    elif not isinstance(node, Leaf):
        raise VerificationError(f"block {index} is a {type(node).__name__}, not an index node")
    if cache is not None:
        cache.put(index, node, len(data))
    return node


class _Tree:
    """Search and range scans over nodes that are either stored (int refs) or in memory."""

    def __init__(self, reader: BlockReader, cache: NodeCache | None,
                 max_node: int = MAX_BLOCK_SIZE):
        self._reader = reader
        self._cache = cache
        self._max_node = max_node

    def _node(self, ref):
        return _load(self._reader, self._cache, ref, self._max_node) if isinstance(ref, int) else ref

    def _child(self, node, i: int, lo: bytes, hi: bytes | None):
        """Child i of `node` (whose keys lie in [lo, hi)), with the child's own bounds.

        A stored child must keep its keys inside its bounds, and a stored leaf
        below the root must not be empty: with children before parents this
        bounds every scan by the number of keys, even on a hostile drive.
        """
        keys = node.keys
        clo = keys[i - 1] if i else lo
        chi = keys[i] if i < len(keys) else hi
        return self._bounded(node.children[i], clo, chi), clo, chi

    def _bounded(self, ref, lo: bytes, hi: bytes | None):
        """The node `ref` below the root, checked to hold only keys in [lo, hi)."""
        child = self._node(ref)
        if isinstance(child, (Leaf, Internal)):
            ck = child.keys
            if ck:
                if ck[0] < lo or (hi is not None and ck[-1] >= hi):
                    raise VerificationError("index node holds keys outside its parent's range")
            elif isinstance(child, Leaf):
                raise VerificationError("empty index leaf below the root")
        return child

    def _get(self, root, key: bytes):
        if root is None:
            return None
        node = self._node(root)
        lo, hi = b"", None
        depth = 0
        while not isinstance(node, (Leaf, _MLeaf)):
            depth += 1
            if depth > MAX_DEPTH:
                raise VerificationError("index deeper than any valid drive")
            node, lo, hi = self._child(node, bisect_right(node.keys, key), lo, hi)
        i = bisect_left(node.keys, key)
        if i < len(node.keys) and node.keys[i] == key:
            return node.entries[i]
        return None

    def _scan(self, ref, lo: bytes, hi: bytes | None) -> Iterator[tuple[bytes, Entry]]:
        """(key, entry) for lo <= key < hi (hi None: no upper bound), in key order."""
        yield from self._scan_node(self._node(ref), lo, hi, b"", None, 0)

    def _scan_node(self, node, lo, hi, nlo, nhi, depth) -> Iterator[tuple[bytes, Entry]]:
        if depth > MAX_DEPTH:
            raise VerificationError("index deeper than any valid drive")
        keys = node.keys
        if isinstance(node, (Leaf, _MLeaf)):
            i = bisect_left(keys, lo)
            j = len(keys) if hi is None else bisect_left(keys, hi)
            entries = node.entries
            for n in range(i, j):
                yield keys[n], entries[n]
            return
        i = bisect_right(keys, lo)
        j = len(keys) if hi is None else bisect_left(keys, hi)
        for n in range(i, j + 1):
            child, clo, chi = self._child(node, n, nlo, nhi)
            yield from self._scan_node(child, lo, hi, clo, chi, depth + 1)


class Index(_Tree):
    """One version of a drive's index, read-only.

    Every method may raise MissingBlock (from the reader) or VerificationError
    (a block that is not a valid index node, or one larger than `max_node`:
    the drive's block size bounds its nodes).
    """

    def __init__(self, reader: BlockReader, root: int, cache: NodeCache | None = None,
                 max_node: int = MAX_BLOCK_SIZE):
        super().__init__(reader, cache, max_node)
        self.root = root

    def lookup(self, path: bytes) -> Entry | None:
        return self._get(self.root, path_key(normalize_path(path)))

    def listdir(self, path: bytes) -> Iterator[tuple[bytes, Entry]]:
        """(name, entry) of each child of directory `path`, sorted by name."""
        lo, hi = children_range(normalize_path(path))
        cut = len(lo)
        for key, entry in self._scan(self.root, lo, hi):
            yield key[cut:], entry

    def walk(self) -> Iterator[tuple[bytes, Entry]]:
        """(path, entry) of every entry, in key order (a directory's children together)."""
        for key, entry in self._scan(self.root, b"", None):
            yield key_path(key), entry

    def scan(self) -> Iterator[tuple[bytes, Entry]]:
        """(key, entry) of every entry, in key order: the raw keys, for readers
        that check them (`valid_key`) before taking them for paths."""
        return self._scan(self.root, b"", None)

    def scan_unseen(self, seen: set[int]) -> Iterator[tuple[bytes, Entry]]:
        """(key, entry) of the leaves below the root whose subtrees are not in
        `seen` (block indices of nodes scanned before, say in another version,
        which shares every subtree it did not change); adds what it scans.
        Every node edge on the way is checked as in a full scan."""
        if self.root not in seen:
            yield from self._unseen(self.root, self._node(self.root), b"", None, seen, 0)

    def _unseen(self, ref, node, lo, hi, seen, depth) -> Iterator[tuple[bytes, Entry]]:
        if depth > MAX_DEPTH:
            raise VerificationError("index deeper than any valid drive")
        seen.add(ref)
        if isinstance(node, Leaf):
            yield from zip(node.keys, node.entries)
            return
        for i, child_ref in enumerate(node.children):
            child, clo, chi = self._child(node, i, lo, hi)
            if child_ref not in seen:
                yield from self._unseen(child_ref, child, clo, chi, seen, depth + 1)

    def path_blocks(self, path: bytes) -> list[int]:
        """Block indices of the nodes root -> leaf that lookup(path) reads."""
        key = path_key(normalize_path(path))
        out = [self.root]
        node = self._node(self.root)
        lo, hi = b"", None
        while isinstance(node, Internal):
            if len(out) > MAX_DEPTH:
                raise VerificationError("index deeper than any valid drive")
            i = bisect_right(node.keys, key)
            out.append(node.children[i])
            node, lo, hi = self._child(node, i, lo, hi)
        return out


# ---------------------------------------------------------------- writing


class _MLeaf:
    __slots__ = ("keys", "entries")

    def __init__(self, keys: list[bytes], entries: list[Entry]):
        self.keys = keys
        self.entries = entries


class _MInternal:
    __slots__ = ("keys", "children")

    def __init__(self, keys: list[bytes], children: list):
        self.keys = keys
        self.children = children  # each an int (stored block) or an _MLeaf/_MInternal


_SPLIT_COUNT = 2048  # in-memory split threshold: keeps list inserts cheap before finish
_NODE_OVERHEAD = 16  # fixarray + tag + two array headers, rounded up


def _bin_size(n: int) -> int:
    return n + (2 if n < 256 else 3 if n < 65536 else 5)


def _int_size(v: int) -> int:
    return 1 if v < 128 else 2 if v < 256 else 3 if v < 65536 else 5 if v < 1 << 32 else 9


def _cuts(sizes: list[int], limit: int, even: bool) -> list[int]:
    """End indices of consecutive chunks of `sizes`, each summing to <= limit.

    even: chunks of about equal size (room to grow on both sides of a split);
    else greedy, as few chunks as possible (bulk loads).
    """
    total = sum(sizes)
    if total <= limit:
        return [len(sizes)]
    target = total / -(-total // limit) if even else limit
    ends = []
    acc = 0
    start = 0
    for i, s in enumerate(sizes):
        if i > start and (acc + s > limit or acc + s / 2 > target):
            ends.append(i)
            start = i
            acc = 0
        acc += s
    ends.append(len(sizes))
    return ends


class _Emitter:
    """Collects encoded blocks of one finish/build, assigning block indices."""

    def __init__(self, first_block: int, block_size: int, even: bool):
        if block_size < 512 or block_size > MAX_BLOCK_SIZE:
            raise ValueError(f"block_size {block_size} out of range")
        self.first_block = first_block
        self.block_size = block_size
        self.limit = block_size - _NODE_OVERHEAD
        self.even = even
        self.blocks: list[bytes] = []

    def emit(self, node: Leaf | Internal) -> int:
        data = _encoder.encode(node)
        assert len(data) <= self.block_size, (len(data), self.block_size)
        self.blocks.append(data)
        return self.first_block + len(self.blocks) - 1

    def leaves(self, keys: list[bytes], entries: list[Entry], lo: bytes) -> list[tuple[bytes, int]]:
        """Pack sorted items into leaves; return (lower bound key, block) per leaf."""
        if not keys:
            return []
        data = _encoder.encode(Leaf(keys, entries))
        if len(data) <= self.block_size:
            self.blocks.append(data)
            return [(lo, self.first_block + len(self.blocks) - 1)]
        sizes = [_bin_size(len(k)) + len(_encoder.encode(e)) for k, e in zip(keys, entries)]
        for k, s in zip(keys, sizes):
            if s > self.limit:
                raise UsageError(
                    f"{key_path(k)!r}: its index entry needs {s} bytes, more than an index "
                    f"block of {self.block_size} bytes holds; remove some extended attributes")
        out = []
        start = 0
        for end in _cuts(sizes, self.limit, self.even):
            out.append((lo if start == 0 else keys[start], self.emit(Leaf(keys[start:end], entries[start:end]))))
            start = end
        return out

    def internals(self, pieces: list[tuple[bytes, int]], lo: bytes) -> list[tuple[bytes, int]]:
        """Pack (lower bound, block) children into internal nodes; return their pieces."""
        sizes = [_bin_size(len(k)) + _int_size(c) for k, c in pieces]
        for (k, _), s in zip(pieces, sizes):
            if 2 * s + 9 > self.limit:
                raise UsageError(f"{key_path(k)!r}: path too long for index blocks of {self.block_size} bytes")
        out = []
        start = 0
        for end in _cuts(sizes, self.limit, self.even):
            chunk = pieces[start:end]
            node = Internal([k for k, _ in chunk[1:]], [c for _, c in chunk])
            out.append((lo if start == 0 else chunk[0][0], self.emit(node)))
            start = end
        return out

    def root(self, pieces: list[tuple[bytes, int]]) -> int:
        if not pieces:
            return self.emit(Leaf([], []))
        while len(pieces) > 1:
            pieces = self.internals(pieces, b"")
        return pieces[0][1]


def build(items: Iterable[tuple[bytes, Entry]], first_block: int, block_size: int = 65536) -> tuple[list[bytes], int]:
    """Bulk-load an index from (path, entry) pairs in any order.

    Returns (encoded blocks to append at first_block, first_block+1, ...; root
    block index).  Raises UsageError for a bad path, a duplicate path or an
    entry too large for a block.
    """
    pairs = [(path_key(normalize_path(p)), e) for p, e in items]
    pairs.sort(key=lambda kv: kv[0])
    keys = [k for k, _ in pairs]
    entries = [e for _, e in pairs]
    del pairs
    for a, b in zip(keys, keys[1:]):
        if a == b:
            raise UsageError(f"{key_path(a)!r} given twice")
    em = _Emitter(first_block, block_size, even=False)
    root = em.root(em.leaves(keys, entries, b""))
    return em.blocks, root


class IndexWriter(_Tree):
    """Builds the next version of an index on top of `root` (None: an empty index).

    Dirty nodes stay in memory until `finish`.  Methods may raise MissingBlock
    (from the reader; the writer stays consistent and the call can be retried),
    VerificationError (a bad stored node) and UsageError (bad paths).
    """

    def __init__(self, reader: BlockReader, root: int | None, cache: NodeCache | None = None):
        super().__init__(reader, cache)
        self._root = root
        self._base = root

    @property
    def dirty(self) -> bool:
        return self._root is not self._base

    def get(self, path: bytes) -> Entry | None:
        return self._get(self._root, path_key(normalize_path(path)))

    def children(self, path: bytes) -> list[tuple[bytes, Entry]]:
        """(name, entry) of each child of directory `path` as this writer has it."""
        lo, hi = children_range(normalize_path(path))
        cut = len(lo)
        return [(k[cut:], e) for k, e in self._range(lo, hi)]

    def items(self, path: bytes = b"/") -> Iterator[tuple[bytes, Entry]]:
        """(path, entry) of `path` and everything below it, in key order."""
        path = normalize_path(path)
        key = path_key(path)
        entry = self._get(self._root, key)
        if entry is not None:
            yield path, entry
        for lo, hi in subtree_ranges(path):
            for k, e in self._range(lo, hi):
                yield key_path(k), e

    def _mutable(self, ref):
        if not isinstance(ref, int):
            return ref
        node = _load(self._reader, self._cache, ref)
        if isinstance(node, Leaf):
            return _MLeaf(list(node.keys), list(node.entries))
        return _MInternal(list(node.keys), list(node.children))

    def _leaf_path(self, key: bytes) -> list:
        """Make the root->leaf path for `key` mutable; return [(node, child slot)...] ending in the leaf."""
        # Load first, then mutate, so a MissingBlock leaves the writer unchanged.
        if self._root is None:
            self._root = _MLeaf([], [])
        ref = self._root
        while True:
            node = self._node(ref)
            if isinstance(node, (Leaf, _MLeaf)):
                break
            ref = node.children[bisect_right(node.keys, key)]
        root = self._root = self._mutable(self._root)
        path = [root]
        node = root
        while isinstance(node, _MInternal):
            i = bisect_right(node.keys, key)
            child = node.children[i] = self._mutable(node.children[i])
            path.append(child)
            node = child
        return path

    def _put_key(self, key: bytes, entry: Entry) -> None:
        path = self._leaf_path(key)
        leaf = path[-1]
        i = bisect_left(leaf.keys, key)
        if i < len(leaf.keys) and leaf.keys[i] == key:
            leaf.entries[i] = entry
            return
        leaf.keys.insert(i, key)
        leaf.entries.insert(i, entry)
        # In-memory splits keep lists short; finish() repacks by encoded size.
        node = leaf
        for parent in reversed(path[:-1]):
            if len(node.keys) <= _SPLIT_COUNT:
                return
            sep, right = self._split(node)
            j = parent.children.index(node)
            parent.keys.insert(j, sep)
            parent.children.insert(j + 1, right)
            node = parent
        if len(node.keys) > _SPLIT_COUNT:
            sep, right = self._split(node)
            self._root = _MInternal([sep], [node, right])

    @staticmethod
    def _split(node):
        mid = len(node.keys) // 2
        if isinstance(node, _MLeaf):
            right = _MLeaf(node.keys[mid:], node.entries[mid:])
            sep = node.keys[mid]
            del node.keys[mid:], node.entries[mid:]
            return sep, right
        right = _MInternal(node.keys[mid + 1:], node.children[mid + 1:])
        sep = node.keys[mid]
        del node.keys[mid:], node.children[mid + 1:]
        return sep, right

    def _delete_key(self, key: bytes) -> bool:
        if self._get(self._root, key) is None:
            return False
        leaf = self._leaf_path(key)[-1]
        i = bisect_left(leaf.keys, key)
        del leaf.keys[i], leaf.entries[i]
        return True

    def put(self, path: bytes, entry: Entry) -> None:
        """Add or replace the entry at `path` (parents are not checked)."""
        if not isinstance(entry, Entry):
            raise TypeError(f"entry must be an Entry, not {type(entry).__name__}")
        self._put_key(path_key(normalize_path(path)), entry)

    def delete(self, path: bytes) -> bool:
        """Remove `path` and, if it is a directory, everything below it.  True if anything went.

        All-or-nothing: a MissingBlock leaves the writer as it was.
        """
        path = normalize_path(path)
        if path == b"/":
            raise UsageError("the root directory cannot be deleted")
        doomed = self._subtree_keys(path)
        self._prepare(doomed)
        for k in doomed:
            self._delete_key(k)
        return bool(doomed)

    def _range(self, lo: bytes, hi: bytes | None) -> list[tuple[bytes, Entry]]:
        return [] if self._root is None else list(self._scan(self._root, lo, hi))

    def _subtree_keys(self, path: bytes) -> list[bytes]:
        key = path_key(path)
        keys = [key] if self._get(self._root, key) is not None else []
        return keys + [k for lo, hi in subtree_ranges(path) for k, _ in self._range(lo, hi)]

    def _prepare(self, keys: Iterable[bytes]) -> None:
        """Copy into memory every node that changing `keys` touches.

        This changes no content, so a MissingBlock raised here leaves the
        writer's view intact; afterwards the change itself reads nothing.
        """
        for k in keys:
            self._leaf_path(k)

    def move(self, old: bytes, new: bytes) -> None:
        """Rename `old` (a file, symlink or a whole directory subtree) to `new`.

        Whatever was at `new` (and below it) is replaced; the caller enforces
        POSIX rules (e.g. no directory over a non-empty one).  Raises
        NotFoundError if `old` does not exist, UsageError for the root or a
        move into itself.  All-or-nothing: a MissingBlock leaves the writer as
        it was.
        """
        old = normalize_path(old)
        new = normalize_path(new)
        if old == b"/" or new == b"/":
            raise UsageError("the root directory cannot be moved or replaced")
        entry = self.get(old)
        if entry is None:
            raise NotFoundError(f"{old!r} does not exist in the drive")
        if new.startswith(old + b"/"):
            raise UsageError(f"cannot move {old!r} into itself ({new!r})")
        if new == old:
            return
        cut = len(old)
        moved = [(path_key(new), entry)] + [
            (path_key(new + key_path(k)[cut:]), e)
            for lo, hi in subtree_ranges(old) for k, e in self._range(lo, hi)]
        doomed = self._subtree_keys(old) + self._subtree_keys(new)
        self._prepare(doomed)
        self._prepare(k for k, _ in moved)
        for k in doomed:
            self._delete_key(k)
        for k, e in moved:
            self._put_key(k, e)

    def finish(self, first_block: int, block_size: int = 65536) -> tuple[list[bytes], int]:
        """Encode the dirty nodes.

        Returns (blocks to append at first_block, first_block+1, ... in that
        order, children before parents; the new root's block index).  With no
        change it returns ([], old root).  Once the caller has appended the
        blocks, the writer can go on building the next version on top.
        """
        if self._root is not None and isinstance(self._root, int):
            return [], self._root
        em = _Emitter(first_block, block_size, even=True)
        if self._root is None:
            root = em.root([])
        else:
            root = em.root(self._emit(em, self._root, b"", top=True))
        self._root = self._base = root
        return em.blocks, root

    def _emit(self, em: _Emitter, node, lo: bytes, top: bool = False) -> list[tuple[bytes, int]]:
        if isinstance(node, _MLeaf):
            return em.leaves(node.keys, node.entries, lo)
        pieces: list[tuple[bytes, int]] = []
        run_keys: list[bytes] = []
        run_entries: list[Entry] = []
        run_lo = None
        children = node.children
        for i, child in enumerate(children):
            child_lo = lo if i == 0 else node.keys[i - 1]
            if isinstance(child, _MLeaf):
                if run_lo is None:
                    run_lo = child_lo
                run_keys += child.keys
                run_entries += child.entries
                continue
            if run_lo is not None:
                pieces += em.leaves(run_keys, run_entries, run_lo)
                run_keys, run_entries, run_lo = [], [], None
            if isinstance(child, int):
                pieces.append((child_lo, child))
            else:
                pieces += self._emit(em, child, child_lo)
        if run_lo is not None:
            pieces += em.leaves(run_keys, run_entries, run_lo)
        if not pieces or (top and len(pieces) == 1):
            return pieces
        return em.internals(pieces, lo)


# ---------------------------------------------------------------- comparing two versions


def _height(tree: _Tree, root: int) -> int:
    """Levels below `root` (0: a leaf), along the leftmost path."""
    node = tree._node(root)
    height = 0
    while isinstance(node, Internal) and node.children:
        height += 1
        if height > MAX_DEPTH:
            raise VerificationError("index deeper than any valid drive")
        node = tree._node(node.children[0])
    return height


class _DiffSide:
    """One version as a stack of pending pieces in key order (the top is next):
    ("sub", block, lo, hi, height) for a stored subtree not read yet, whose
    keys all lie in [lo, hi), or ("item", key, entry)."""

    __slots__ = ("tree", "stack")

    def __init__(self, tree: _Tree, root: int | None):
        self.tree = tree
        self.stack = [] if root is None else [("sub", root, b"", None, _height(tree, root))]

    def expand(self) -> None:
        _, ref, lo, hi, height = self.stack.pop()
        node = self.tree._node(ref) if lo == b"" and hi is None else self.tree._bounded(ref, lo, hi)
        keys = node.keys
        if isinstance(node, Leaf):
            self.stack.extend(("item", k, e) for k, e in zip(reversed(keys), reversed(node.entries)))
            return
        children = node.children
        for i in range(len(children) - 1, -1, -1):
            self.stack.append(("sub", children[i], keys[i - 1] if i else lo,
                               keys[i] if i < len(keys) else hi, height - 1))


def diff(reader: BlockReader, old_root: int, new_root: int, cache: NodeCache | None = None,
         raw: bool = False) -> Iterator[tuple[bytes, Entry | None, Entry | None]]:
    """(path, old entry or None, new entry or None) for every path whose entry
    differs between two versions of one drive's index, in key order
    (`diff_keys`, with each key taken for a path; with `raw`, the raw key
    instead, for readers that check keys)."""
    for key, old, new in diff_keys(reader, old_root, new_root, cache):
        yield (key if raw else key_path(key)), old, new


def diff_keys(reader: BlockReader, old_root: int | None, new_root: int,
              cache: NodeCache | None = None) -> Iterator[tuple[bytes, Entry | None, Entry | None]]:
    """(key, old entry or None, new entry or None) for every index key whose
    entry differs between two versions of one drive's index, in key order;
    `old_root` None: an empty index (every key of the new one).  The keys
    are as stored: a reader that takes them for paths checks them first.

    Subtrees both versions share (the same block index: blocks never change)
    are skipped without being read, so the cost follows the number of changed
    keys (times the few nodes around each), not the size of the drive.  A
    shared subtree is taken as equal even where a hostile drive placed it
    out of its key range (it reads equally wrong in both versions).  May
    raise MissingBlock (fetch and call again) and VerificationError.
    """
    tree = _Tree(reader, cache)
    if old_root == new_root:
        return
    a, b = _DiffSide(tree, old_root), _DiffSide(tree, new_root)
    sa, sb = a.stack, b.stack
    while sa or sb:
        if not sb:
            top = sa[-1]
            if top[0] == "sub":
                a.expand()
            else:
                sa.pop()
                yield top[1], top[2], None
            continue
        if not sa:
            top = sb[-1]
            if top[0] == "sub":
                b.expand()
            else:
                sb.pop()
                yield top[1], None, top[2]
            continue
        x, y = sa[-1], sb[-1]
        if x[0] == "sub" and y[0] == "sub":
            if x[1] == y[1]:  # the same stored subtree: equal, skip both
                sa.pop()
                sb.pop()
            elif x[4] > y[4] or (x[4] == y[4] and x[2] <= y[2]):
                a.expand()
            else:
                b.expand()
        elif x[0] == "sub":  # y is an item: below x's range it is not in the old version
            if y[1] < x[2]:
                sb.pop()
                yield y[1], None, y[2]
            else:
                a.expand()
        elif y[0] == "sub":
            if x[1] < y[2]:
                sa.pop()
                yield x[1], x[2], None
            else:
                b.expand()
        elif x[1] == y[1]:
            sa.pop()
            sb.pop()
            if x[2] != y[2]:
                yield x[1], x[2], y[2]
        elif x[1] < y[1]:
            sa.pop()
            yield x[1], x[2], None
        else:
            sb.pop()
            yield y[1], None, y[2]
