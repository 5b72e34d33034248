"""The write path: a directory, or a set of changes under one, becomes a signed version.

Theory of operation
-------------------
Only the owner (who holds the secret seed) writes.  A version is appended
in batches of unsigned blocks (content, then index nodes, then the Commit),
and then the tree nodes and the signed head are written in one final
transaction (`Store.commit_version`).  Until then the new blocks are
garbage past the signed length: a crash leaves the previous version intact,
and the next write first deletes the garbage.  One writer per drive at a
time: every write holds `Store.writer_lock` for the drive (`Publisher`'s
caller takes it, so that `share` can hold it for its whole run).

`create_drive` bulk-loads version 1 (`index.build`).  Every later version
goes through a `Publisher`: "these paths changed under this root" plus
"rescan these subtrees" (`Changes`) become one version, re-reading only
the files that changed:

* moves (paired renames from the watcher) are applied to the index first:
  a renamed file or directory keeps its entries and blocks, whatever its size;
* each changed path is looked at once (lstat): gone -> deleted with its
  subtree; a new directory -> scanned whole; a file whose size, mtime and
  mode are unchanged keeps its entry; a changed file is read again and every
  block whose hash equals the old block at the same position is reused (one
  changed byte in a 1 GiB file appends one block); a new file of the size of
  one deleted in the same version is compared with it (renames the watcher
  did not pair, and `import`, reuse blocks);
* a subtree rescan compares the directory on disk with the index below it
  (what `import` does for "/").

A file is read through one descriptor, with `fstat` before and after: if
its size, mtime or ctime moved meanwhile, the blocks appended for it are
rolled back and the file is left for a later version (`WriteResult.retry`),
so a version never holds a torn copy.  Paths the `Rules` ignore are never
read, and are deleted from the index if they were there.  A `stop` event
set by another thread abandons the version before it is signed
(`Abandoned`); nothing of it is then visible.
"""

from __future__ import annotations

import os
import stat as stat_mod
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from . import crypto, flat, index, tree
from .drive import DEFAULT_BLOCK_SIZE, MAX_CREATE_BLOCK_SIZE, MIN_BLOCK_SIZE, MODE_BITS, Drive, \
    valid_block_size
from .errors import DiskFullError, NotFoundError, P2pfsError, StoreError, UsageError
from .ignore import Rules
from .index import Commit, Entry, Header, KIND_DIR, KIND_FILE, KIND_SYMLINK
from .store import WRITE_BATCH_BYTES, DriveRecord, Store

PROGRESS_BYTES = 8 << 20  # a progress report at least every this many bytes of a file
from .types import Head, Node

READ_ATTEMPTS = 3  # a file that changes while read this often stops `import`


class Progress(Protocol):
    """What a long write reports (the CLI draws it)."""

    def start(self, nbytes: int, files: int) -> None:
        """`nbytes` in `files` files are about to be read."""

    def advance(self, nbytes: int, files: int = 0) -> None:
        """That many more bytes read (and files finished)."""


class Abandoned(P2pfsError):
    """The version in progress was abandoned before it was signed (a stop request)."""


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
    published: bool = True  # False: nothing had changed, no version was written
    added: int = 0      # entries (files, directories, links) new in this version
    changed: int = 0    # entries whose content or metadata changed
    deleted: int = 0    # entries gone
    moved: int = 0      # renames applied (a directory counts once)
    retry: set[bytes] = field(default_factory=set)  # paths left for a later version

    def summary(self) -> str:
        return _summary(self.added, self.changed, self.deleted, self.moved)


def _summary(added: int, changed: int, deleted: int, moved: int) -> str:
    parts = [f"{n} {what}" for n, what in ((added, "added"), (changed, "changed"),
                                           (deleted, "deleted"), (moved, "moved")) if n]
    return ", ".join(parts) or "no change"


@dataclass
class Changes:
    """What changed under a root since the last version.

    `moves` are applied first, in order; then each subtree in `subtrees` is
    rescanned whole and each path in `paths` looked at once.  Files in `busy`
    (still being written) keep the entry they have, wherever they are met.
    Paths are normalised drive paths (`b"/a/b"`)."""

    moves: list[tuple[bytes, bytes]] = field(default_factory=list)
    paths: set[bytes] = field(default_factory=set)
    subtrees: set[bytes] = field(default_factory=set)
    busy: set[bytes] = field(default_factory=set)

    @classmethod
    def everything(cls) -> "Changes":
        return cls(subtrees={b"/"})

    def __bool__(self) -> bool:
        return bool(self.moves or self.paths or self.subtrees)


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


def _local(root: bytes, path: bytes) -> bytes:
    return root if path == b"/" else root + path


def _item(path: bytes, local: bytes, st: os.stat_result) -> _Item | None:
    """The item for an lstat result; None for sockets, fifos and devices.

    Only permission bits are kept: readers never see setuid, setgid or
    sticky bits (drive.sanitized), so storing them would only make every
    import think such a file changed."""
    mode = stat_mod.S_IMODE(st.st_mode) & MODE_BITS
    if stat_mod.S_ISDIR(st.st_mode):
        return _Item(path, KIND_DIR, mode, st.st_mtime_ns, 0, local)
    if stat_mod.S_ISREG(st.st_mode):
        return _Item(path, KIND_FILE, mode, st.st_mtime_ns, st.st_size, local,
                     inode=(st.st_dev, st.st_ino) if st.st_nlink > 1 else None)
    if stat_mod.S_ISLNK(st.st_mode):
        target = os.readlink(local)  # OSError: the caller decides
        return _Item(path, KIND_SYMLINK, mode, st.st_mtime_ns, len(target), local, target)
    return None


def scan_directory(root: str | os.PathLike, warn: Callable[[str], None] | None = None,
                   rules: Rules | None = None, under: bytes = b"/",
                   strict: bool = True) -> list[_Item]:
    """Every file, directory and symlink at and below drive path `under` of
    the local directory `root` (not following links), sorted by index key.

    Sockets, fifos and devices are skipped with a warning; so are paths the
    `rules` ignore (an ignored directory is not entered).  The root must be a
    directory (NotFoundError/UsageError otherwise).  Strict (create, import):
    anything unreadable raises UsageError.  Not strict (share): a path that
    vanishes during the scan is left out, one that cannot be read is warned
    about and left out ([] if `under` itself is gone)."""
    root_b = os.fsencode(os.path.abspath(root))
    rules = rules or Rules()
    try:
        st = os.stat(root_b)
    except FileNotFoundError:
        raise NotFoundError(f"{os.fsdecode(root_b)}: no such directory") from None
    except OSError as exc:
        raise UsageError(f"{os.fsdecode(root_b)}: {exc.strerror}") from None
    if not stat_mod.S_ISDIR(st.st_mode):
        raise UsageError(f"{os.fsdecode(root_b)}: not a directory")

    def trouble(local: bytes, exc: OSError, what: str = "") -> None:
        if strict:
            raise UsageError(f"{os.fsdecode(local)}: {what}{exc.strerror}") from None
        if not isinstance(exc, (FileNotFoundError, NotADirectoryError)) and warn is not None:
            warn(f"skipping {os.fsdecode(local)}: {what}{exc.strerror}")

    items: list[_Item] = []
    top_local = _local(root_b, under)
    try:
        top = _item(under, top_local, os.lstat(top_local) if under != b"/" else st)
    except OSError as exc:
        trouble(top_local, exc)
        return []
    if top is None or rules.ignored(under, top.kind == KIND_DIR):
        return []
    items.append(top)
    stack = [(top_local, under)] if top.kind == KIND_DIR else []
    while stack:
        local, rel = stack.pop()
        try:
            with os.scandir(local) as it:
                children = list(it)
        except OSError as exc:
            trouble(local, exc, "cannot read directory: ")
            continue
        base = b"" if rel == b"/" else rel
        for de in children:
            path = base + b"/" + de.name
            try:
                st = de.stat(follow_symlinks=False)
                if rules.ignored_here(path, stat_mod.S_ISDIR(st.st_mode)):
                    continue
                item = _item(path, de.path, st)
            except OSError as exc:
                trouble(de.path, exc)
                continue
            if item is None:
                if warn is not None:
                    warn(f"skipping {os.fsdecode(de.path)}: not a regular file, directory "
                         "or symlink")
                continue
            if item.kind == KIND_FILE and strict and not os.access(de.path, os.R_OK):
                raise UsageError(f"{os.fsdecode(de.path)}: permission denied")
            items.append(item)
            if item.kind == KIND_DIR:
                stack.append((de.path, path))
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
    """Appends unsigned blocks in batches and grows the tree as it goes.

    `mark`/`rollback` drop what was appended since the mark (a file that
    changed while it was read); blocks already flushed past the final
    length are garbage like any interrupted write's.

    A full batch is written by a worker thread while the caller reads and
    hashes the next one (LMDB and BLAKE3 release the GIL, so both cores
    work); at most one batch is in flight, batches land in order, and
    `sign_and_commit` waits for the last.  Whoever makes an appender calls
    `close()` when done with it, on every path: it waits for the batch in
    flight, so nothing is written after the writer lock is released."""

    def __init__(self, store: Store, key: bytes, length: int, peaks: list[Node],
                 progress: Progress | None, stop: threading.Event | None = None):
        self.store = store
        self.key = key
        self.builder = tree.TreeBuilder(length, peaks)
        self.nodes: list[Node] = []
        self.batch: list[tuple[int, bytes]] = []
        self.batch_bytes = 0
        self.progress = progress
        self.stop = stop
        self.content_blocks = 0
        self.reused = 0
        self.expected = 0  # bytes the callers said they will append (file contents)
        self.flushed = 0  # bytes written so far
        self._writing: tuple[threading.Thread, dict, int] | None = None  # the batch in flight

    @property
    def length(self) -> int:
        return self.builder.length

    def append(self, data: bytes) -> int:
        if self.stop is not None and self.stop.is_set():
            raise Abandoned("stopped before the version in progress was signed")
        i = self.builder.length
        self.nodes.extend(self.builder.append(data))
        self.batch.append((i, data))
        self.batch_bytes += len(data)
        if self.batch_bytes >= WRITE_BATCH_BYTES:
            self.flush()
        return i

    def mark(self) -> tuple[int, list[Node], int, int]:
        return self.builder.length, list(self.builder.peaks), len(self.nodes), self.content_blocks

    def rollback(self, mark: tuple[int, list[Node], int, int]) -> None:
        length, peaks, nodes, content = mark
        self.builder = tree.TreeBuilder(length, peaks)
        del self.nodes[nodes:]
        self.batch = [(i, d) for i, d in self.batch if i < length]
        self.batch_bytes = sum(len(d) for _, d in self.batch)
        self.content_blocks = content

    def flush(self) -> None:
        """Start writing the batch (in a worker thread), once the one before is written."""
        if not self.batch:
            return
        self._wait()
        batch, nbytes = self.batch, self.batch_bytes
        self.batch, self.batch_bytes = [], 0
        outcome: dict = {}

        def write() -> None:
            try:
                self.store.put_block_items(self.key, batch)
            except BaseException as exc:  # raised by _wait, in the caller's thread
                outcome["error"] = exc

        worker = threading.Thread(target=write, name="p2pfs-append", daemon=True)
        worker.start()
        self._writing = (worker, outcome, nbytes)

    def _wait(self) -> None:
        """Wait for the batch in flight; raise what writing it raised."""
        if self._writing is None:
            return
        worker, outcome, nbytes = self._writing
        worker.join()
        self._writing = None
        exc = outcome.get("error")
        if isinstance(exc, DiskFullError):  # say how much more the version needed
            raise exc.needing(max(self.expected - self.flushed, nbytes)) from None
        if exc is not None:
            raise exc
        self.flushed += nbytes

    def close(self) -> None:
        """Wait for the batch in flight (its error, if any, is moot now)."""
        try:
            self._wait()
        except Exception:
            pass

    def sign_and_commit(self, seed: bytes, record: DriveRecord | None) -> Head:
        if self.stop is not None and self.stop.is_set():
            raise Abandoned("stopped before the version in progress was signed")
        self._wait()  # every earlier batch is in the store before the head that covers it
        length = self.builder.length
        root = self.builder.root()
        head = Head(length, root, crypto.sign_head(seed, self.key, length, root))
        # and the DHT's copy of it (BEP 44, under the blinded key), so that
        # any node holding this head can put it in the DHT unchanged
        dht_signature = crypto.sign_dht_head(seed, length, root, head.signature)
        try:
            self.store.commit_version(self.key, head, self.nodes, record, self.batch, dht_signature)
        except DiskFullError as exc:  # say how much more the version needed
            raise exc.needing(max(self.expected - self.flushed, self.batch_bytes)) from None
        self.batch = []
        return head


def _entry(item: _Item, size: int = 0, extents=()) -> Entry:
    if item.kind == KIND_FILE:
        return Entry(KIND_FILE, item.mode, item.mtime_ns, size, tuple(extents))
    if item.kind == KIND_SYMLINK:
        return Entry(KIND_SYMLINK, item.mode, item.mtime_ns, len(item.target), (), item.target)
    return Entry(KIND_DIR, item.mode, item.mtime_ns)


def _read_blocks(fd: int, block_size: int) -> Iterator[bytes]:
    while True:
        data = os.read(fd, block_size)
        if not data:
            return
        while len(data) < block_size:  # a short read that is not the end: fill the block
            more = os.read(fd, block_size - len(data))
            if not more:
                break
            data += more
        yield data


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == \
        (b.st_size, b.st_mtime_ns, b.st_ctime_ns, b.st_ino)


class _Torn(Exception):
    """The file changed while it was read (or could not be read for now)."""


def create_drive(store: Store, directory: str | os.PathLike, *, message: str = "",
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 warn: Callable[[str], None] | None = None,
                 progress: Progress | None = None,
                 rules: Rules | None = None,
                 stop: threading.Event | None = None) -> WriteResult:
    """Create a new drive equal to `directory` as version 1 and keep its secret key.

    `rules` default to the directory's .p2pfsignore.  The key file is written
    first; the drive exists only once its signed head is committed, so an
    interrupted create leaves no drive."""
    if not valid_block_size(block_size):
        raise UsageError(f"block size must be a power of two between {MIN_BLOCK_SIZE} "
                         f"and {MAX_CREATE_BLOCK_SIZE}")
    if rules is None:
        rules = Rules.load(directory)
    items = scan_directory(directory, warn, rules)
    if progress is not None:
        files = [it for it in items if it.kind == KIND_FILE]
        progress.start(sum(it.size for it in files), len(files))
    _discard_orphans(store)
    key, seed = crypto.generate_keypair()
    key_text = crypto.encode_key(key)
    with store.writer_lock(key, f"drive {key_text}"):
        store.save_secret(key_text, seed)
        return _create(store, key, seed, items, message, block_size, progress, stop)


def _discard_orphans(store: Store) -> None:
    """Delete the unsigned blocks of creates that were killed (not running ones)."""
    for orphan in store.orphan_keys():
        try:
            with store.writer_lock(orphan):
                store.discard_blocks_from(orphan, 0)
        except StoreError:
            pass  # a create in progress in another process


def _create(store: Store, key: bytes, seed: bytes, items: list[_Item], message: str,
            block_size: int, progress: Progress | None, stop) -> WriteResult:
    now = time.time_ns()
    app = _Appender(store, key, 0, [], progress, stop)
    try:
        return _create_with(app, key, seed, items, message, block_size, now)
    finally:
        app.close()


def _create_with(app: _Appender, key: bytes, seed: bytes, items: list[_Item], message: str,
                 block_size: int, now: int) -> WriteResult:
    app.expected = sum(it.size for it in items if it.kind == KIND_FILE)
    app.append(index.encode_block(Header(1, block_size, now)))
    entries: list[tuple[bytes, Entry]] = []
    files = nbytes = 0
    linked: dict[tuple[int, int], Entry] = {}  # hard links share their blocks
    for item in items:
        if item.kind == KIND_FILE and item.inode in linked:
            e = linked[item.inode]
            entries.append((item.path, _entry(item, e.size, e.extents)))
        elif item.kind == KIND_FILE:
            entry = _read_file(app, item, None, None, block_size, strict=True)
            entries.append((item.path, entry))
            if item.inode is not None:
                linked[item.inode] = entry
        else:
            entries.append((item.path, _entry(item)))
            continue
        files += 1
        nbytes += entries[-1][1].size
    idx_blocks, root = index.build(entries, app.length, block_size)
    for b in idx_blocks:
        app.append(b)
    app.append(index.encode_block(Commit(1, root, -1, now, message, files, nbytes,
                                         len(items))))
    head = app.sign_and_commit(seed, DriveRecord(created_ns=now, owned=True, pinned=True))
    return WriteResult(key, 1, head.length, app.content_blocks, 0, len(idx_blocks), files, nbytes,
                       added=len(entries))


def _read_file(app: _Appender, item: _Item, ref: Entry | None, drive: Drive | None,
               bs: int, strict: bool) -> Entry:
    """Append a file's blocks, reusing `ref`'s where the hash at the same
    position matches; the entry takes its metadata from the descriptor read.

    Raises _Torn (after rolling the appends back) when the file changed while
    read or cannot be read now, FileNotFoundError when it is gone; strict:
    UsageError instead of _Torn after READ_ATTEMPTS."""
    ref_blocks: list[int] = []
    if ref is not None:
        for start, count in ref.extents:
            ref_blocks.extend(range(start, start + count))
    ref_nodes = (drive.store.get_nodes(drive.key, [2 * b for b in ref_blocks])
                 if ref_blocks and drive is not None else [])
    name = os.fsdecode(item.source)
    for _attempt in range(READ_ATTEMPTS if strict else 1):
        mark = app.mark()
        try:
            fd = os.open(item.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if strict:
                raise UsageError(f"{name}: cannot read: {exc.strerror}") from None
            raise _Torn(f"{name}: cannot read: {exc.strerror}") from None
        blocks: list[int] = []
        size = reused = unreported = 0
        try:
            before = os.fstat(fd)
            if not stat_mod.S_ISREG(before.st_mode):
                raise _Torn(f"{name}: no longer a regular file")
            for j, data in enumerate(_read_blocks(fd, bs)):
                size += len(data)
                unreported += len(data)
                if unreported >= PROGRESS_BYTES and app.progress is not None:
                    app.progress.advance(unreported)
                    unreported = 0
                if j < len(ref_nodes) and ref_nodes[j] is not None:
                    old = ref_nodes[j]
                    leaf = tree.leaf_node(ref_blocks[j], data)
                    if leaf.hash == old.hash and leaf.size == old.size:
                        blocks.append(ref_blocks[j])
                        reused += 1
                        continue
                blocks.append(app.append(data))
                app.content_blocks += 1
            after = os.fstat(fd)
        except OSError as exc:
            app.rollback(mark)
            if strict:
                raise UsageError(f"{name}: read error: {exc.strerror}") from None
            raise _Torn(f"{name}: read error: {exc.strerror}") from None
        finally:
            os.close(fd)
        if _same_file(before, after) and size == before.st_size:
            app.reused += reused
            if app.progress is not None:
                app.progress.advance(unreported, 1)
            return Entry(KIND_FILE, stat_mod.S_IMODE(before.st_mode) & MODE_BITS, before.st_mtime_ns, size,
                         _extents(blocks))
        app.rollback(mark)
    if strict:
        raise UsageError(f"{name} kept changing while it was read; publish it when it is quiet")
    raise _Torn(f"{name} changed while it was read")


def import_directory(drive: Drive, directory: str | os.PathLike, *, message: str = "",
                     checksum: bool = False,
                     warn: Callable[[str], None] | None = None,
                     progress: Progress | None = None,
                     rules: Rules | None = None) -> WriteResult:
    """Write a new version of an owned drive equal to `directory` (a rescan
    of "/" by a `Publisher`; `rules` default to the directory's .p2pfsignore).

    Unchanged files (same size, mtime and mode, unless `checksum`) keep their
    entries; a changed file reuses every old block whose hash is unchanged at
    the same position; a file that appears where one of the same size
    vanished is compared with it block by block (renames reuse blocks).
    Writes a version even if nothing changed."""
    drive.seed()  # ReadOnlyError before anything is scanned
    if rules is None:
        rules = Rules.load(directory)
    publisher = Publisher(drive, directory, rules, checksum=checksum, warn=warn,
                          progress=progress, strict=True)
    with drive.store.writer_lock(drive.key, f"drive {drive.key_text}"):
        return publisher.publish(Changes.everything(), message, always=True)


def begin_version(drive: Drive, warn: Callable[[str], None] | None = None,
                  progress: Progress | None = None,
                  stop: threading.Event | None = None) -> tuple[_Appender, int]:
    """`prepare_version`, then an appender positioned after that version
    (close it on every path) and the length the new commit must pass."""
    pad_to = prepare_version(drive, warn)
    return appender_at(drive, progress, stop), pad_to


def prepare_version(drive: Drive, warn: Callable[[str], None] | None = None) -> int:
    """Make ready the next version of an owned drive (the caller holds its
    writer lock): move `drive` to the newest version this home can read,
    delete the garbage past it, and return the length the new commit must
    pass (`_past_unreadable`)."""
    store, key = drive.store, drive.key
    latest = store.latest_head(key)  # another process may have written since
    if latest is None:
        raise NotFoundError(f"unknown drive {drive.key_text}")
    if drive.head is None or latest.length > drive.head.length:
        drive.check_signature(latest)
        drive.head = latest
    drive.open_local()  # the newest version this home can read, verified
    # Blocks past it are an interrupted write's garbage, or pieces of a
    # newer signed version this home cannot read (its commit is not here).
    length = drive.length
    store.discard_blocks_from(key, length)
    return _past_unreadable(drive, warn)


def appender_at(drive: Drive, progress: Progress | None = None,
                stop: threading.Event | None = None) -> _Appender:
    """An appender after the version `drive` shows (nothing past it is read)."""
    length = drive.length
    peaks = [drive.trusted_node(p) for p in flat.full_roots(length)]
    return _Appender(drive.store, drive.key, length, peaks, progress, stop)


def seal_version(drive: Drive, seed: bytes, app: _Appender, writer: index.IndexWriter, *,
                 message: str, files: int, nbytes: int, entries: int,
                 pad_to: int = 0) -> tuple[Head, int]:
    """Finish the version `app` has the content of: append the index nodes
    `writer` changed (it then builds on the new version), empty blocks up to
    `pad_to`, and the Commit with these totals; sign it, commit it to the
    store (durably) and move `drive` to it.  Returns (head, index blocks)."""
    idx_blocks, root = writer.finish(app.length, drive.block_size)
    for b in idx_blocks:
        app.append(b)
    while app.length < pad_to:
        app.append(b"")  # empty blocks no entry names: the commit lands past pad_to
    app.append(index.encode_block(Commit(drive.version + 1, root, drive.length - 1,
                                         time.time_ns(), message, files, nbytes, entries)))
    head = app.sign_and_commit(seed, None)
    drive.adopt_own_head(head)
    drive.open_local()
    return head, len(idx_blocks)


class Publisher:
    """Turns changes under a local `root` into signed versions of an owned drive.

    The caller holds `drive.store.writer_lock(drive.key)` around every
    `publish`.  Not thread-safe: one publish at a time, and `drive` is this
    publisher's own view (the writer's), not one a server or mount reads
    through.  Strict (import): an unreadable path or a file that keeps
    changing raises UsageError; otherwise (share) it is warned about or left
    for later (`WriteResult.retry`)."""

    def __init__(self, drive: Drive, root: str | os.PathLike, rules: Rules | None = None, *,
                 checksum: bool = False, warn: Callable[[str], None] | None = None,
                 progress: Progress | None = None, strict: bool = False,
                 stop: threading.Event | None = None):
        self.drive = drive
        self.root = os.fsencode(os.path.abspath(root))
        self.rules = rules or Rules()
        self.checksum = checksum
        self.warn = warn
        self.progress = progress
        self.strict = strict
        self.stop = stop

    def publish(self, changes: Changes, message: str | Callable[[str], str] = "", *,
                always: bool = False) -> WriteResult:
        """One new signed version holding `changes` (none if nothing changed,
        unless `always`).  `message` may be a function of the summary of what
        changed ("2 added, 1 deleted").  Raises Abandoned if `stop` is set
        before signing."""
        drive = self.drive
        seed = drive.seed()
        app, pad_to = begin_version(drive, self.warn, self.progress, self.stop)
        length = drive.length
        try:
            return self._publish_with(app, changes, message, always, seed, length, pad_to)
        finally:
            app.close()

    def _publish_with(self, app: _Appender, changes: Changes, message, always: bool, seed: bytes,
                      length: int, pad_to: int) -> WriteResult:
        drive, key = self.drive, self.drive.key
        job = _Job(self, app, index.IndexWriter(drive.reader, drive.commit.root, drive.node_cache))
        job.run(changes)
        commit = drive.commit
        files, nbytes = commit.files + job.files, commit.bytes + job.bytes
        if not job.dirty and not always:
            return WriteResult(key, drive.version, length, files=files, bytes=nbytes,
                               published=False, retry=job.retry)
        if callable(message):
            message = message(_summary(job.added, job.changed, job.deleted, job.moved))
        # entries: counted once for a version written before commits counted them
        entries = (commit.entries or sum(1 for _ in drive.walk_local())) + job.entries
        head, idx_blocks = seal_version(drive, seed, app, job.writer, message=message,
                                        files=files, nbytes=nbytes, entries=entries,
                                        pad_to=pad_to)
        return WriteResult(key, drive.version, head.length, app.content_blocks,
                           app.reused, idx_blocks, files, nbytes,
                           added=job.added, changed=job.changed, deleted=job.deleted,
                           moved=job.moved, retry=job.retry)


class _Job:
    """The state of one publish: the index writer and what it changed."""

    def __init__(self, pub: Publisher, app: _Appender, writer: index.IndexWriter):
        self.pub = pub
        self.app = app
        self.writer = writer
        self.bs = pub.drive.block_size
        self.files = self.bytes = self.entries = 0  # deltas of the commit's totals
        self.added = self.changed = self.deleted = self.moved = 0
        self.dirty = False
        self.retry: set[bytes] = set()
        # deleted files, the candidates for renames nobody reported: by size, and
        # by (size, name); a list is searched for the same mtime only while small
        self.vanished: dict[int, list[Entry]] = {}
        self.vanished_named: dict[tuple[int, bytes], list[Entry]] = {}
        self.done: set[bytes] = set()  # subtrees rescanned in this job
        self.busy: set[bytes] = set()  # files being written: left as they are

    # --- index edits that keep the totals ----------------------------------------

    def _count(self, entry: Entry | None, sign: int) -> None:
        if entry is not None and entry.kind == KIND_FILE:
            self.files += sign
            self.bytes += sign * entry.size

    def delete(self, path: bytes) -> None:
        gone = list(self.writer.items(path))
        if not gone:
            return
        for p, e in gone:
            self._count(e, -1)
            if e.kind == KIND_FILE and e.size > 0:
                self.vanished.setdefault(e.size, []).append(e)
                self.vanished_named.setdefault((e.size, index.split_path(p)[1]), []).append(e)
        self.writer.delete(path)
        self.deleted += len(gone)
        self.entries -= len(gone)
        self.dirty = True

    def put(self, path: bytes, entry: Entry, prev: Entry | None) -> None:
        if prev == entry:
            return
        if prev is not None and prev.kind != entry.kind:
            self.delete(path)  # e.g. a directory (and its subtree) replaced by a file
            prev = None
        self._count(prev, -1)
        self._count(entry, 1)
        self.writer.put(path, entry)
        if prev is None:
            self.added += 1
            self.entries += 1
        else:
            self.changed += 1
        self.dirty = True

    def move(self, old: bytes, new: bytes) -> bool:
        """Apply a rename to the index; False if `old` is not there (the new
        path is then scanned instead)."""
        if old == new or self.writer.get(old) is None or new.startswith(old + b"/") \
                or old == b"/" or new == b"/":
            return False
        for _p, e in self.writer.items(new):  # whatever the rename replaced
            self._count(e, -1)
            self.deleted += 1
            self.entries -= 1
        self.writer.move(old, new)
        self.moved += 1
        self.dirty = True
        return True

    # --- looking at the disk ----------------------------------------------------------

    def run(self, changes: Changes) -> None:
        self.busy = changes.busy
        subtrees = set(changes.subtrees)
        paths = set(changes.paths)
        for old, new in changes.moves:
            if not self.move(old, new):
                subtrees.add(new)
            paths.add(old)
            paths.add(new)
        for s in sorted(subtrees, key=lambda p: (p.count(b"/"), index.path_key(p))):
            if not self._covered(s):
                self.sync_subtree(s)
        for p in sorted(paths, key=lambda p: (p.count(b"/"), index.path_key(p))):
            if not self._covered(p):
                self.sync_path(p)

    def _covered(self, path: bytes) -> bool:
        """Whether a subtree rescanned in this job holds `path`."""
        while path:
            if path in self.done:
                return True
            path = index.split_path(path)[0]
        return False

    def _ignored(self, path: bytes, item: _Item | None) -> bool:
        return self.pub.rules.ignored(path, item is not None and item.kind == KIND_DIR)

    def _missing_ancestor(self, path: bytes) -> bytes | None:
        """The topmost ancestor of `path` the index does not hold, if any."""
        top = None
        parent = index.split_path(path)[0]
        while parent and parent != b"/" and self.writer.get(parent) is None:
            top = parent
            parent = index.split_path(parent)[0]
        return top

    def sync_path(self, path: bytes) -> None:
        """Make the index agree with the disk at `path` (a new directory: its subtree)."""
        if path in self.busy:
            return
        local = _local(self.pub.root, path)
        try:
            st = os.lstat(local)
            item = _item(path, local, st)
        except (FileNotFoundError, NotADirectoryError):
            item = None
        except OSError as exc:
            if self.pub.strict:
                raise UsageError(f"{os.fsdecode(local)}: {exc.strerror}") from None
            self._warn(f"skipping {os.fsdecode(local)}: {exc.strerror}")
            return
        if item is None or self._ignored(path, item):
            if path != b"/":
                self.delete(path)
            return
        missing = self._missing_ancestor(path)
        if missing is not None:
            self.sync_subtree(missing)
            return
        prev = self.writer.get(path)
        if item.kind == KIND_DIR and (prev is None or prev.kind != KIND_DIR):
            self.sync_subtree(path)
            return
        self.sync_item(item, prev, {})
        if item.kind == KIND_DIR:
            self._sync_children(path, local)

    def _sync_children(self, path: bytes, local: bytes) -> None:
        """A reported directory is looked at whole, one level deep: a name that
        appeared (a tree moved in under a name just deleted, say) is synced, a
        name that went is deleted.  O(its children), never its subtree."""
        try:
            with os.scandir(local) as it:
                on_disk = {os.fsencode(de.name) for de in it}
        except OSError:
            return  # gone or unreadable meanwhile: its own event says so
        held = {name for name, _e in self.writer.children(path)}
        for name in sorted(on_disk ^ held):
            try:
                child = index.normalize_path((b"" if path == b"/" else path) + b"/" + name)
            except UsageError as exc:  # a name no drive can hold: as a full scan does
                self._warn(f"skipping {os.fsdecode(local)}/{os.fsdecode(name)}: {exc}")
                continue
            if not self._covered(child):
                self.sync_path(child)

    def sync_subtree(self, top: bytes) -> None:
        """Make the index below `top` agree with the disk (what import does for "/")."""
        self.done.add(top)
        missing = self._missing_ancestor(top) if top != b"/" else None
        if missing is not None:
            top = missing
            self.done.add(top)
        items = scan_directory(self.pub.root, self.pub.warn, self.pub.rules, top,
                               strict=self.pub.strict)
        seen = {it.path for it in items}
        old = dict(self.writer.items(top))
        for path in sorted(old, key=index.path_key):
            if path not in seen and path != b"/" and path not in self.busy:
                self.delete(path)
        todo = [it for it in items if it.kind == KIND_FILE
                and (self.pub.checksum or not _unchanged(old.get(it.path), it))]
        self.app.expected += sum(it.size for it in todo)
        if self.pub.progress is not None:
            self.pub.progress.start(sum(it.size for it in todo), len(todo))
        linked: dict[tuple[int, int], Entry] = {}
        for item in items:
            self.sync_item(item, old.get(item.path), linked)

    def sync_item(self, item: _Item, prev: Entry | None, linked: dict) -> None:
        if item.path in self.busy:
            return
        if item.kind != KIND_FILE:
            self.put(item.path, _entry(item), prev)
            return
        if not self.pub.checksum and _unchanged(prev, item):
            return
        if item.inode in linked:
            e = linked[item.inode]
            self.put(item.path, _entry(item, e.size, e.extents), prev)
            return
        ref = prev if prev is not None and prev.kind == KIND_FILE else None
        if ref is None:
            ref = self._rename_source(item)
        try:
            entry = _read_file(self.app, item, ref, self.pub.drive, self.bs, self.pub.strict)
        except FileNotFoundError:
            self.delete(item.path)
            return
        except _Torn as exc:
            self._warn(f"{exc}; trying again later")
            self.retry.add(item.path)
            return
        if item.inode is not None:
            linked[item.inode] = entry
        self.put(item.path, entry, prev)

    def _rename_source(self, item: _Item) -> Entry | None:
        """The deleted file most likely to be `item` under its old name: of the
        same size, best also of the same name and mtime (what a move keeps)."""
        name = index.split_path(item.path)[1]
        for candidates in (self.vanished_named.get((item.size, name)),
                           self.vanished.get(item.size)):
            if candidates:
                for e in candidates[:16]:
                    if e.mtime_ns == item.mtime_ns:
                        return e
                return candidates[0]
        return None

    def _warn(self, text: str) -> None:
        if self.pub.warn is not None:
            self.pub.warn(text)


def _past_unreadable(drive: Drive, warn) -> int:
    """The length the new version's commit must reach (0: none) so that it is
    longer than a newer signed head this home cannot read.

    Heads only move forward: a reader that adopted that head would ignore a
    shorter new version and take one of the same length for a fork.  So the
    new version, built on the newest readable one, pads its log past it;
    readers that hold pieces of the other version will report the fork."""
    newest = drive.head.length
    if newest <= drive.length:
        return 0
    if warn is not None:
        warn(f"drive {drive.key_text}: a newer signed version (length {newest}) is known but "
             f"its blocks are not in this home; the new version is built on version "
             f"{drive.version} and its log is padded past length {newest}, so that every "
             "reader moves to it (if you did not sign that version elsewhere, the drive's "
             "secret key is stolen: make a new drive)")
    return newest


def _unchanged(prev: Entry | None, item: _Item) -> bool:
    return (prev is not None and prev.kind == KIND_FILE and prev.size == item.size
            and prev.mtime_ns == item.mtime_ns and prev.mode == item.mode)
