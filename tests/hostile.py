"""Signed drives built from raw parts, the way an attacker builds them.

A valid signature proves who wrote a drive, not that it is sane.  `Forge`
appends any bytes to a drive's log through the real write path
(`publish._Appender`: blocks, tree nodes, `Store.commit_version`) and signs
the result with a fresh key, so readers verify every block as they would for
any stranger's drive.  Nothing here goes through `normalize_path`, `build`
or `IndexWriter`: keys, entries, nodes, commits and the header are whatever
the caller writes (`index.encode_block` on raw structs, or raw bytes).

The drive lands in the given store as a read-only drive (no secret key
file), as if fetched from a peer; `forge.seed` is the stolen secret for
tests that sign more.
"""

from __future__ import annotations

from collections.abc import Iterable

from p2pfs import crypto, index
from p2pfs.index import KIND_DIR, KIND_FILE, KIND_SYMLINK, Commit, Entry, Header, Internal, Leaf
from p2pfs.publish import _Appender
from p2pfs.store import DriveRecord, Store
from p2pfs.tree import TreeBuilder
from p2pfs.types import Head

ROOT = b""  # the root directory's key


def key(parent: bytes, name: bytes) -> bytes:
    """A raw index key: parent path, NUL, name (no checks at all)."""
    return parent + b"\x00" + name


def d(mode: int = 0o755, mtime_ns: int = 1_700_000_000_000_000_000, **fields) -> Entry:
    return Entry(KIND_DIR, mode, mtime_ns, **fields)


def link(target: bytes, mode: int = 0o777, mtime_ns: int = 1_700_000_000_000_000_000,
         **fields) -> Entry:
    fields.setdefault("size", len(target))
    return Entry(KIND_SYMLINK, mode, mtime_ns, target=target, **fields)


class Forge:
    """One hostile drive in `store`: block 0 is `header` (default a sane one)."""

    def __init__(self, store: Store, *, block_size: int = 4096, header: bytes | None = None):
        self.store = store
        self.key, self.seed = crypto.generate_keypair()
        self.key_text = crypto.encode_key(self.key)
        self.block_size = block_size
        self.app = _Appender(store, self.key, 0, [], None)
        self.raw(header if header is not None
                 else index.encode_block(Header(1, block_size, 1_700_000_000_000_000_000)))
        self.version = 0
        self.last_commit = -1
        self.heads: list[Head] = []

    @property
    def length(self) -> int:
        return self.app.length

    def raw(self, data: bytes) -> int:
        """Append any bytes as the next block; its index."""
        return self.app.append(bytes(data))

    def blocks(self, data: bytes, block_size: int | None = None) -> tuple[tuple[int, int], ...]:
        """Append `data` cut into blocks of `block_size` (default the drive's); one extent."""
        bs = block_size or self.block_size
        pieces = [data[i:i + bs] for i in range(0, len(data), bs)]
        first = self.length
        for p in pieces:
            self.raw(p)
        return ((first, len(pieces)),) if pieces else ()

    def file(self, data: bytes, mode: int = 0o644, mtime_ns: int = 1_700_000_000_000_000_000,
             **fields) -> Entry:
        """A file entry over freshly appended blocks of `data` (fields override)."""
        fields.setdefault("size", len(data))
        fields.setdefault("extents", self.blocks(data))
        return Entry(KIND_FILE, mode, mtime_ns, **fields)

    def node(self, obj: Leaf | Internal | Commit | Header) -> int:
        return self.raw(index.encode_block(obj))

    def leaf(self, items: dict[bytes, Entry] | Iterable[tuple[bytes, Entry]], *,
             sort: bool = True) -> int:
        """One Leaf of raw (key, entry) pairs; its block index."""
        pairs = list(items.items() if isinstance(items, dict) else items)
        if sort:
            pairs.sort(key=lambda kv: kv[0])
        return self.node(Leaf([k for k, _ in pairs], [e for _, e in pairs]))

    def internal(self, separators: list[bytes], children: list[int]) -> int:
        return self.node(Internal(list(separators), list(children)))

    def commit(self, root: int, *, version: int | None = None, prev: int | None = None,
               message: str = "", files: int = 0, nbytes: int = 0) -> Head:
        """Append a Commit naming `root` and sign the log as it now is."""
        self.version = self.version + 1 if version is None else version
        self.last_commit = self.raw(index.encode_block(Commit(
            self.version, root, self.last_commit if prev is None else prev,
            1_700_000_000_000_000_000 + self.version, message, files, nbytes)))
        return self.sign()

    def sign(self) -> Head:
        """Sign the log's current length (whatever its last block is)."""
        head = self.app.sign_and_commit(self.seed, DriveRecord(owned=False, pinned=True))
        self.heads.append(head)
        return head

    def unbacked_head(self, extra: Iterable[bytes]) -> Head:
        """A head signed over `extra` blocks appended to this log but never stored."""
        return unbacked_head(self.key, self.seed, self.length, self.app.builder.peaks, extra)


def unbacked_head(drive_key: bytes, seed: bytes, length: int, peaks, extra: Iterable[bytes]) -> Head:
    """A head signed over `extra` blocks appended to a log of `length` blocks
    (whose tree `peaks` are given) that are never stored anywhere: an owner's
    mistake, or a stolen key.  Nobody can read the version it names."""
    builder = TreeBuilder(length, list(peaks))
    for data in extra:
        builder.append(data)
    root = builder.root()
    return Head(builder.length, root, crypto.sign_head(seed, drive_key, builder.length, root))


def simple(store: Store, items=None, *, block_size: int = 4096,
           root: Entry | None = d()) -> Forge:
    """A drive of one leaf: `root` (None: no root entry at all) plus `items`,
    signed as version 1.  `items` is a dict of raw keys to entries, or a
    callable taking the Forge (to append content first) and returning one."""
    forge = Forge(store, block_size=block_size)
    entries = dict(items(forge) if callable(items) else items or {})
    if root is not None:
        entries.setdefault(ROOT, root)
    forge.commit(forge.leaf(entries))
    return forge
