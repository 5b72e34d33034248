"""The write path: a directory (or, later, a set of changes) becomes a signed version.

Theory of operation
-------------------
Only the owner (who holds the secret seed) writes.  A version is appended
in batches of unsigned blocks (content, then index nodes, then the Commit),
and then the tree nodes and the signed head are written in one final
transaction (`Store.commit_version`).  Until then the new blocks are
garbage past the signed length: a crash leaves the previous version intact,
and the next write first deletes the garbage.  One writer per drive at a
time: every write holds `Store.writer_lock` for the drive.

`create_drive`, `import_directory` (and `share`, and the writable mount)
all go through `_Appender` (blocks and tree growth) and `index.IndexWriter`
/ `index.build` (the copy-on-write index).  `drive.Drive` is the read and
verify view these writers start from.
"""

from __future__ import annotations

import os
import stat as stat_mod
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from . import crypto, flat, index, tree
from .drive import DEFAULT_BLOCK_SIZE, MAX_CREATE_BLOCK_SIZE, Drive
from .errors import NotFoundError, StoreError, UsageError
from .index import Commit, Entry, Header, KIND_DIR, KIND_FILE, KIND_SYMLINK
from .store import WRITE_BATCH_BYTES, DriveRecord, Store
from .types import Head, Node

@dataclass
class WriteResult:
    key: bytes
    version: int
    length: int
    new_content_blocks: int = 0
    reused_blocks: int = 0
    index_blocks: int = 0
    files: int = 0
    bytes: int = 0


@dataclass
class _Item:
    path: bytes
    kind: int
    mode: int
    mtime_ns: int
    size: int
    source: bytes  # absolute local path
    target: bytes = b""
    inode: tuple[int, int] | None = None  # (dev, ino) of a file with hard links


def scan_directory(root: str | os.PathLike, warn: Callable[[str], None] | None = None,
                   ) -> list[_Item]:
    """Every file, directory and symlink under `root` (not following links).

    Sockets, fifos and devices are skipped with a warning.  Raises
    NotFoundError/UsageError for a missing or unreadable directory."""
    root_b = os.fsencode(os.path.abspath(root))
    try:
        st = os.stat(root_b)
    except FileNotFoundError:
        raise NotFoundError(f"{os.fsdecode(root_b)}: no such directory") from None
    except OSError as exc:
        raise UsageError(f"{os.fsdecode(root_b)}: {exc.strerror}") from None
    if not stat_mod.S_ISDIR(st.st_mode):
        raise UsageError(f"{os.fsdecode(root_b)}: not a directory")
    items = [_Item(b"/", KIND_DIR, stat_mod.S_IMODE(st.st_mode), st.st_mtime_ns, 0, root_b)]
    stack = [(root_b, b"")]
    while stack:
        local, rel = stack.pop()
        try:
            with os.scandir(local) as it:
                children = list(it)
        except OSError as exc:
            raise UsageError(f"{os.fsdecode(local)}: cannot read directory: {exc.strerror}") from None
        for de in children:
            path = rel + b"/" + de.name
            try:
                st = de.stat(follow_symlinks=False)
            except OSError as exc:
                raise UsageError(f"{os.fsdecode(de.path)}: {exc.strerror}") from None
            mode = stat_mod.S_IMODE(st.st_mode)
            if stat_mod.S_ISDIR(st.st_mode):
                items.append(_Item(path, KIND_DIR, mode, st.st_mtime_ns, 0, de.path))
                stack.append((de.path, path))
            elif stat_mod.S_ISREG(st.st_mode):
                if not os.access(de.path, os.R_OK):
                    raise UsageError(f"{os.fsdecode(de.path)}: permission denied")
                items.append(_Item(path, KIND_FILE, mode, st.st_mtime_ns, st.st_size, de.path,
                                   inode=(st.st_dev, st.st_ino) if st.st_nlink > 1 else None))
            elif stat_mod.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(de.path)
                except OSError as exc:
                    raise UsageError(f"{os.fsdecode(de.path)}: {exc.strerror}") from None
                items.append(_Item(path, KIND_SYMLINK, mode, st.st_mtime_ns, len(target),
                                   de.path, target))
            elif warn is not None:
                warn(f"skipping {os.fsdecode(de.path)}: not a regular file, directory or symlink")
    for it in items:
        index.normalize_path(it.path)  # over-long names -> UsageError before writing
    items.sort(key=lambda it: index.path_key(it.path))
    return items


def _extents(blocks: list[int]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return tuple((a, n) for a, n in out)


class _Appender:
    """Appends unsigned blocks in batches and grows the tree as it goes."""

    def __init__(self, store: Store, key: bytes, length: int, peaks: list[Node],
                 progress: Callable[[int], None] | None):
        self.store = store
        self.key = key
        self.builder = tree.TreeBuilder(length, peaks)
        self.nodes: list[Node] = []
        self.batch: list[tuple[int, bytes]] = []
        self.batch_bytes = 0
        self.progress = progress
        self.content_blocks = 0

    @property
    def length(self) -> int:
        return self.builder.length

    def append(self, data: bytes) -> int:
        i = self.builder.length
        self.nodes.extend(self.builder.append(data))
        self.batch.append((i, data))
        self.batch_bytes += len(data)
        if self.batch_bytes >= WRITE_BATCH_BYTES:
            self.flush()
        return i

    def flush(self) -> None:
        if self.batch:
            self.store.put_block_items(self.key, self.batch)
            if self.progress is not None:
                self.progress(self.batch_bytes)
            self.batch = []
            self.batch_bytes = 0

    def sign_and_commit(self, seed: bytes, record: DriveRecord | None) -> Head:
        length = self.builder.length
        root = self.builder.root()
        head = Head(length, root, crypto.sign_head(seed, self.key, length, root))
        self.store.commit_version(self.key, head, self.nodes, record, self.batch)
        if self.progress is not None:
            self.progress(self.batch_bytes)
        self.batch = []
        return head


def _read_file(item: _Item, block_size: int) -> Iterator[bytes]:
    try:
        f = open(item.source, "rb", buffering=0)
    except OSError as exc:
        raise UsageError(f"{os.fsdecode(item.source)}: cannot read: {exc.strerror}") from None
    with f:
        while True:
            try:
                data = f.read(block_size)
            except OSError as exc:
                raise UsageError(f"{os.fsdecode(item.source)}: read error: {exc.strerror}") from None
            if not data:
                return
            # a short read that is not the end: fill the block
            while len(data) < block_size:
                more = f.read(block_size - len(data))
                if not more:
                    break
                data += more
            yield data


def _entry(item: _Item, size: int = 0, extents=()) -> Entry:
    if item.kind == KIND_FILE:
        return Entry(KIND_FILE, item.mode, item.mtime_ns, size, tuple(extents))
    if item.kind == KIND_SYMLINK:
        return Entry(KIND_SYMLINK, item.mode, item.mtime_ns, len(item.target), (), item.target)
    return Entry(KIND_DIR, item.mode, item.mtime_ns)


def create_drive(store: Store, directory: str | os.PathLike, *, message: str = "",
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 warn: Callable[[str], None] | None = None,
                 progress: Callable[[int], None] | None = None,
                 on_scan: Callable[[int], None] | None = None) -> WriteResult:
    """Create a new drive equal to `directory` as version 1 and keep its secret key.

    The key file is written first; the drive exists only once its signed head
    is committed, so an interrupted create leaves no drive."""
    if not 4096 <= block_size <= MAX_CREATE_BLOCK_SIZE or block_size & (block_size - 1):
        raise UsageError(
            f"block size must be a power of two between 4096 and {MAX_CREATE_BLOCK_SIZE}")
    items = scan_directory(directory, warn)
    total = sum(it.size for it in items if it.kind == KIND_FILE)
    if on_scan is not None:
        on_scan(total)
    _discard_orphans(store)
    key, seed = crypto.generate_keypair()
    key_text = crypto.encode_key(key)
    with store.writer_lock(key, f"drive {key_text}"):
        store.save_secret(key_text, seed)
        return _create(store, key, seed, items, message, block_size, progress)


def _discard_orphans(store: Store) -> None:
    """Delete the unsigned blocks of creates that were killed (not running ones)."""
    for orphan in store.orphan_keys():
        try:
            with store.writer_lock(orphan):
                store.discard_blocks_from(orphan, 0)
        except StoreError:
            pass  # a create in progress in another process


def _create(store: Store, key: bytes, seed: bytes, items: list[_Item], message: str,
            block_size: int, progress) -> WriteResult:
    now = time.time_ns()
    app = _Appender(store, key, 0, [], progress)
    app.append(index.encode_block(Header(1, block_size, now)))
    entries: list[tuple[bytes, Entry]] = []
    files = nbytes = 0
    linked: dict[tuple[int, int], Entry] = {}  # hard links share their blocks
    for item in items:
        if item.kind == KIND_FILE and item.inode in linked:
            e = linked[item.inode]
            entries.append((item.path, _entry(item, e.size, e.extents)))
            files += 1
            nbytes += e.size
        elif item.kind == KIND_FILE:
            blocks = []
            size = 0
            for data in _read_file(item, block_size):
                blocks.append(app.append(data))
                size += len(data)
            app.content_blocks += len(blocks)
            entries.append((item.path, _entry(item, size, _extents(blocks))))
            if item.inode is not None:
                linked[item.inode] = entries[-1][1]
            files += 1
            nbytes += size
        else:
            entries.append((item.path, _entry(item)))
    idx_blocks, root = index.build(entries, app.length, block_size)
    for b in idx_blocks:
        app.append(b)
    app.append(index.encode_block(Commit(1, root, -1, now, message, files, nbytes,
                                         len(items))))
    head = app.sign_and_commit(seed, DriveRecord(created_ns=now, owned=True, pinned=True))
    return WriteResult(key, 1, head.length, app.content_blocks, 0, len(idx_blocks), files, nbytes)


def import_directory(drive: Drive, directory: str | os.PathLike, *, message: str = "",
                     checksum: bool = False,
                     warn: Callable[[str], None] | None = None,
                     progress: Callable[[int], None] | None = None,
                     on_scan: Callable[[int], None] | None = None) -> WriteResult:
    """Write a new version of an owned drive equal to `directory`.

    Unchanged files (same size, mtime and mode, unless `checksum`) keep their
    entries; a changed file reuses every old block whose hash is unchanged at
    the same position; a file that appears where one of the same size
    vanished is compared with it block by block (renames reuse blocks)."""
    seed = drive.seed()
    items = scan_directory(directory, warn)
    with drive.store.writer_lock(drive.key, f"drive {drive.key_text}"):
        return _import(drive, seed, items, message, checksum, progress, on_scan)


def _import(drive: Drive, seed: bytes, items: list[_Item], message: str, checksum: bool,
            progress, on_scan) -> WriteResult:
    store, key = drive.store, drive.key
    latest = store.latest_head(key)  # another process may have written since
    if latest is None:
        raise NotFoundError(f"unknown drive {drive.key_text}")
    if drive.head is None or latest.length > drive.head.length:
        drive.check_signature(latest)
        drive.head = latest
    drive.open_local()  # the newest version, verified
    store.discard_blocks_from(key, drive.head.length)  # an interrupted write's garbage
    old = dict(drive.walk_local())
    bs = drive.block_size
    new_paths = {it.path for it in items}
    total = sum(it.size for it in items if it.kind == KIND_FILE
                if checksum or not _unchanged(old.get(it.path), it))
    if on_scan is not None:
        on_scan(total)

    length = drive.head.length
    peaks = [drive.trusted_node(p) for p in flat.full_roots(length)]
    app = _Appender(store, key, length, peaks, progress)
    writer = index.IndexWriter(drive.reader, drive.commit.root, drive.node_cache)

    # files that vanished, by size: candidates for renames
    vanished: dict[int, list[bytes]] = {}
    for path, e in old.items():
        if e.kind == KIND_FILE and path not in new_paths and e.size > 0:
            vanished.setdefault(e.size, []).append(path)

    for path in sorted(old):
        if path not in new_paths:
            writer.delete(path)  # False when a deleted directory took it already

    reused = 0
    files = nbytes = 0
    linked: dict[tuple[int, int], Entry] = {}  # hard links share their blocks
    for item in items:
        prev = old.get(item.path)
        if item.kind != KIND_FILE:
            entry = _entry(item)
            if prev != entry:
                if prev is not None and prev.kind != item.kind:
                    writer.delete(item.path)
                writer.put(item.path, entry)
            continue
        files += 1
        if not checksum and _unchanged(prev, item):
            nbytes += prev.size
            continue
        if item.inode in linked:
            e = linked[item.inode]
            entry = _entry(item, e.size, e.extents)
            nbytes += entry.size
            if prev != entry:
                if prev is not None and prev.kind != KIND_FILE:
                    writer.delete(item.path)
                writer.put(item.path, entry)
            continue
        ref = prev if prev is not None and prev.kind == KIND_FILE else None
        if ref is None:
            for cand in vanished.get(item.size, []):
                ref = old[cand]
                break
        entry, n_new, n_reused = _write_file(drive, app, item, ref, bs)
        if item.inode is not None:
            linked[item.inode] = entry
        reused += n_reused
        nbytes += entry.size
        if prev != entry:
            if prev is not None and prev.kind != KIND_FILE:
                writer.delete(item.path)
            writer.put(item.path, entry)

    idx_blocks, root = writer.finish(app.length, bs)
    for b in idx_blocks:
        app.append(b)
    version = drive.version + 1
    app.append(index.encode_block(Commit(version, root, length - 1, time.time_ns(),
                                         message, files, nbytes, len(items))))
    head = app.sign_and_commit(seed, None)
    drive.adopt_own_head(head)
    return WriteResult(key, version, head.length, app.content_blocks, reused,
                       len(idx_blocks), files, nbytes)


def _unchanged(prev: Entry | None, item: _Item) -> bool:
    return (prev is not None and prev.kind == KIND_FILE and prev.size == item.size
            and prev.mtime_ns == item.mtime_ns and prev.mode == item.mode)


def _write_file(drive: Drive, app: _Appender, item: _Item, ref: Entry | None,
                bs: int) -> tuple[Entry, int, int]:
    """Append a file's changed blocks; reuse `ref`'s blocks where the hash matches."""
    ref_blocks: list[int] = []
    if ref is not None:
        for start, count in ref.extents:
            ref_blocks.extend(range(start, start + count))
    ref_nodes = drive.store.get_nodes(drive.key, [2 * b for b in ref_blocks]) if ref_blocks else []
    blocks: list[int] = []
    size = new = reused = 0
    for j, data in enumerate(_read_file(item, bs)):
        size += len(data)
        if j < len(ref_nodes) and ref_nodes[j] is not None:
            leaf = tree.leaf_node(ref_blocks[j], data)
            old = ref_nodes[j]
            if leaf.hash == old.hash and leaf.size == old.size:
                blocks.append(ref_blocks[j])
                reused += 1
                if app.progress is not None:
                    app.progress(len(data))
                continue
        blocks.append(app.append(data))
        new += 1
    app.content_blocks += new
    return _entry(item, size, _extents(blocks)), new, reused
