"""The local store: one LMDB environment per node home.  The only lmdb importer.

Theory of operation
-------------------
A home directory holds::

    store/data.mdb, store/lock.mdb   the LMDB environment (sparse, map 1 TiB)
    keys/<zbase32 key>.key           a drive's secret seed, mode 0600

Sub-databases (all keys begin with the 32-byte drive key, integers are u64
big-endian so that one drive's records are one sorted range):

    blocks   key || block        -> block bytes
    nodes    key || node         -> hash (32) || u64le size     tree nodes
    heads    key || length       -> root (32) || signature (64) signed heads
    forks    key || length || root -> signature                 fork evidence
    drives   key                 -> DriveRecord (msgpack)
    held     key                 -> u64le blocks || u64le bytes accounting
    lastread key || block        -> u64be tick || u32le size    cache bookkeeping
    lru      tick || key || block -> b""                        ... ordered by tick
    cached   key                 -> u64le blocks || u64le bytes  evictable, counted

Every public method is one transaction.  Several processes may share the
environment (LMDB's lock file); write transactions are kept short by
callers writing content in batches of at most `WRITE_BATCH_BYTES`.

The crash-safety rule: blocks may be written before they are signed (a
version in progress), but tree nodes, the signed head and the drive record
of a version are written together in one final transaction
(`commit_version`).  A reader only believes blocks below a signed head's
length, so a process killed at any moment leaves either no drive (create)
or the last complete version (import); blocks at or past the signed length
are garbage that the next write deletes (`discard_blocks_from`).

The environment runs with MDB_NOMETASYNC: each commit flushes its data
pages, the meta page is flushed lazily, so an operating-system crash can
lose the last transactions but cannot damage the store.  `commit_version`
flushes everything before returning, so a version reported as written is
durable.

The `held` counters are updated in the same transaction as the blocks they
count, so `blocks_held`/`bytes_held` are exact and cost one read.

*The cache.*  Content blocks of drives this home neither owns nor pins are
a cache (the policy is `p2pfs.cache`'s).  A block enters the bookkeeping
when a reader reports it read (`touch_blocks`, batched by the caller): its
last-read tick goes to `lastread` and `(tick, key, block)` to `lru`, so the
least recently read block is the first key of `lru`.  Blocks never touched
(index blocks, tree nodes, heads) are not in it and are never evicted.
`evict` deletes blocks from the front of `lru`, in one transaction,
updating `held` and `cached`; `cached` counts what is in the bookkeeping,
so the size of the cache costs one scan of a small sub-database.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import lmdb
import msgspec

from .errors import KeyFileError, StoreError
from .types import Head, Node

# MDB_NOMETASYNC: data pages are flushed at every commit, the meta page
# lazily, so an OS crash may drop the last transactions but never damages
# the store (full MDB_NOSYNC could).  Measured here: the disk, not the
# flush, bounds writing a version.
SYNC_EACH_COMMIT = True
MAP_SIZE = 1 << 40  # 1 TiB; the file is sparse and grows as it is used
MAX_READERS = 512
WRITE_BATCH_BYTES = 8 << 20  # callers keep write transactions below this
KEY_BYTES = 32
HASH_BYTES = 32
SIGNATURE_BYTES = 64

_U64 = struct.Struct(">Q")
_NODE = struct.Struct("<Q")
_HELD = struct.Struct("<QQ")
_LAST = struct.Struct(">QI")  # lastread value: tick, block size
_TICK = struct.Struct(">Q")
EVICT_BATCH = 4096  # blocks evicted (or forgotten) per transaction at most


class DriveRecord(msgspec.Struct, array_like=True, frozen=True):
    """What the store remembers about a drive besides its log."""

    created_ns: int = 0
    owned: bool = False  # created on this node (a secret key file is expected)
    pinned: bool = True  # never evicted (owned, seeded or pinned)
    paths: tuple[bytes, ...] = ()  # pinned folders of a drive that is not pinned whole

    @property
    def kept(self) -> bool:
        """Whether none of this drive's blocks may be evicted."""
        return self.owned or self.pinned


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(DriveRecord)


def default_home() -> Path:
    """$P2PFS_HOME, else $XDG_DATA_HOME/p2pfs, else ~/.local/share/p2pfs."""
    env = os.environ.get("P2PFS_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "p2pfs"


def _bk(key: bytes, n: int) -> bytes:
    return key + _U64.pack(n)


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError("drive key must be 32 bytes")


# LMDB allows one open environment per file per process: Store handles of
# one home in one process share it (reference counted).
_envs: dict[str, list] = {}
_envs_lock = threading.Lock()
_DB_NAMES = (b"blocks", b"nodes", b"heads", b"forks", b"drives", b"held",
             b"lastread", b"lru", b"cached")


def _acquire_env(path: str):
    with _envs_lock:
        got = _envs.get(path)
        if got is not None:
            got[2] += 1
            return got[0], got[1]
        try:
            os.makedirs(path, exist_ok=True)
            env = lmdb.open(
                path,
                map_size=MAP_SIZE,
                max_dbs=16,
                max_readers=MAX_READERS,
                lock=True,
                sync=SYNC_EACH_COMMIT,  # see the module docstring
                metasync=False,
                readahead=True,  # without it a cold 64 KiB block faults in as 16 single-page reads: 10x slower
                subdir=True,
            )
        except OSError as exc:
            raise StoreError(f"cannot open the store in {path}: {exc.strerror}") from None
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the store in {path}: {exc}") from None
        try:
            dbs = tuple(env.open_db(name) for name in _DB_NAMES)
        except lmdb.Error as exc:
            env.close()
            raise StoreError(f"cannot open the store in {path}: {exc}") from None
        _envs[path] = [env, dbs, 1]
        return env, dbs


def _release_env(path: str) -> None:
    with _envs_lock:
        got = _envs[path]
        got[2] -= 1
        if got[2] == 0:
            del _envs[path]
            got[0].close()


class Store:
    """A node's LMDB environment plus its key directory.

    Several Store objects for one home in one process share one environment.

    Raises StoreError when the home cannot be opened or written.
    """

    def __init__(self, home: str | os.PathLike):
        self.home = Path(home)
        self.keys_dir = self.home / "keys"
        self._path = os.path.realpath(self.home / "store")
        self._closed = False
        self.env, dbs = _acquire_env(self._path)
        (self._blocks, self._nodes, self._heads, self._forks, self._drives,
         self._held, self._lastread, self._lru, self._cached) = dbs

    def close(self) -> None:
        """Release this handle; the environment closes with its last handle."""
        if not self._closed:
            self._closed = True
            _release_env(self._path)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self):
        try:
            return self.env.begin(write=True, buffers=True)
        except lmdb.Error as exc:
            raise StoreError(f"cannot write the store in {self.home}: {exc}") from None

    def sync(self) -> None:
        """Flush every committed transaction to disk."""
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise StoreError(f"cannot flush the store in {self.home}: {exc}") from None

    # --- drives -------------------------------------------------------------

    def get_drive(self, key: bytes) -> DriveRecord | None:
        with self.env.begin(db=self._drives) as txn:
            raw = txn.get(key)
        return None if raw is None else _record_decoder.decode(raw)

    def list_drives(self) -> list[tuple[bytes, DriveRecord]]:
        with self.env.begin(db=self._drives) as txn:
            return [(bytes(k), _record_decoder.decode(v)) for k, v in txn.cursor()]

    def set_pins(self, key: bytes, *, pinned: bool | None = None,
                 paths: Iterable[bytes] | None = None) -> DriveRecord:
        """Change whether a drive is pinned whole and which of its folders are
        pinned (the drive must be known: LookupError if not).  Returns the new record.
        Blocks of a drive pinned whole leave the cache bookkeeping at once."""
        with self._write() as txn:
            raw = txn.get(key, db=self._drives)
            if raw is None:
                raise LookupError("unknown drive")
            record = _record_decoder.decode(raw)
            record = msgspec.structs.replace(
                record, pinned=record.pinned if pinned is None else pinned,
                paths=record.paths if paths is None else tuple(sorted(set(paths))))
            txn.put(key, _record_encoder.encode(record), db=self._drives)
        if record.kept:
            while self.untrack_blocks(key, None):
                pass
        return record

    # --- blocks -------------------------------------------------------------

    def get_block(self, key: bytes, index: int) -> bytes | None:
        with self.env.begin(db=self._blocks) as txn:
            return txn.get(_bk(key, index))

    def get_blocks(self, key: bytes, indices: Iterable[int]) -> list[bytes | None]:
        """Several blocks in one read transaction (None where not held)."""
        with self.env.begin(db=self._blocks) as txn:
            get = txn.get
            return [get(key + _U64.pack(i)) for i in indices]

    def with_blocks(self, key: bytes, indices: Iterable[int], fn):
        """Call fn(list of zero-copy buffers or None) inside one read transaction
        and return its result; the buffers are valid only during the call."""
        with self.env.begin(db=self._blocks, buffers=True) as txn:
            get = txn.get
            return fn([get(key + _U64.pack(i)) for i in indices])

    def has_block(self, key: bytes, index: int) -> bool:
        with self.env.begin(db=self._blocks, buffers=True) as txn:
            return txn.get(_bk(key, index)) is not None

    def put_blocks(self, key: bytes, first: int, blocks: Iterable[bytes]) -> None:
        """Store blocks first, first+1, ... (unsigned until commit_version)."""
        _check_key(key)
        with self._write() as txn:
            self._put_blocks(txn, key, enumerate(blocks, first))

    def put_block_items(self, key: bytes, items: Iterable[tuple[int, bytes]],
                        nodes: Iterable[Node] = ()) -> None:
        """Store (index, data) blocks and verified tree nodes in one transaction."""
        _check_key(key)
        with self._write() as txn:
            self._put_blocks(txn, key, items)
            self._put_nodes(txn, key, nodes)

    def _put_blocks(self, txn, key: bytes, items: Iterable[tuple[int, bytes]]) -> None:
        # existence is checked with zero-copy gets, then one putmulti: several
        # times faster than txn.replace for 64 KiB values
        pairs = [(key + _U64.pack(index), data) for index, data in items]
        if not pairs:
            return
        get = txn.get
        count = len(pairs)
        nbytes = 0
        for k, data in pairs:
            old = get(k, db=self._blocks)
            if old is None:
                nbytes += len(data)
            else:
                count -= 1
                nbytes += len(data) - len(old)
        txn.cursor(db=self._blocks).putmulti(pairs, overwrite=True)
        if count or nbytes:
            self._add_held(txn, key, count, nbytes)

    def _add_held(self, txn, key: bytes, count: int, nbytes: int) -> None:
        self._add_counter(txn, self._held, key, count, nbytes)

    def held(self, key: bytes) -> tuple[int, int]:
        """(blocks held, bytes held) for a drive: one read."""
        with self.env.begin(db=self._held) as txn:
            raw = txn.get(key)
        return _HELD.unpack(raw) if raw is not None else (0, 0)

    def block_indices(self, key: bytes, start: int = 0) -> Iterator[int]:
        """Indices of held blocks >= start, ascending (one read transaction)."""
        with self.env.begin(db=self._blocks, buffers=True) as txn:
            cur = txn.cursor()
            if not cur.set_range(_bk(key, start)):
                return
            for k in cur.iternext(keys=True, values=False):
                k = bytes(k)
                if k[:KEY_BYTES] != key:
                    return
                yield _U64.unpack_from(k, KEY_BYTES)[0]

    def held_ranges(self, key: bytes) -> list[tuple[int, int]]:
        """Held blocks as sorted (start, end) ranges, end exclusive."""
        ranges: list[list[int]] = []
        for i in self.block_indices(key):
            if ranges and ranges[-1][1] == i:
                ranges[-1][1] = i + 1
            else:
                ranges.append([i, i + 1])
        return [(a, b) for a, b in ranges]

    def iter_blocks(self, key: bytes, start: int = 0, end: int | None = None,
                    ) -> Iterator[tuple[int, memoryview]]:
        """(index, data) for held blocks in [start, end); zero-copy buffers
        valid until the next iteration step.  One read transaction."""
        with self.env.begin(db=self._blocks, buffers=True) as txn:
            cur = txn.cursor()
            if not cur.set_range(_bk(key, start)):
                return
            for k, v in cur:
                if bytes(k[:KEY_BYTES]) != key:
                    return
                i = _U64.unpack_from(k, KEY_BYTES)[0]
                if end is not None and i >= end:
                    return
                yield i, v

    @contextmanager
    def writer_lock(self, key: bytes, what: str = "a drive"):
        """Hold the exclusive right to append to a drive's log (a flock on
        locks/<key hex>.lock, released when the process dies).

        Raises StoreError at once if another process holds it."""
        path = self.home / "locks" / f"{key.hex()}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create lock file {path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"another p2pfs process is writing {what}; "
                                 "try again when it has finished") from None
            yield
        finally:
            os.close(fd)

    def orphan_keys(self) -> list[bytes]:
        """Keys with blocks but no signed head: creates that were interrupted
        (or are running now; callers check `writer_lock`)."""
        out = []
        with self.env.begin(buffers=True) as txn:
            cur = txn.cursor(db=self._blocks)
            heads = txn.cursor(db=self._heads)
            ok = cur.first()
            while ok:
                key = bytes(cur.key()[:KEY_BYTES])
                if not (heads.set_range(key) and bytes(heads.key()[:KEY_BYTES]) == key):
                    out.append(key)
                ok = cur.set_range(key + b"\xff" * 8) and (
                    bytes(cur.key()[:KEY_BYTES]) != key or cur.next())
        return out

    def discard_blocks_from(self, key: bytes, length: int) -> int:
        """Delete blocks >= length (an interrupted write's garbage).  Returns how many."""
        doomed = list(self.block_indices(key, length))
        if not doomed:
            return 0
        with self._write() as txn:
            count = nbytes = 0
            for i in doomed:
                old = txn.pop(_bk(key, i), db=self._blocks)
                if old is not None:
                    count += 1
                    nbytes += len(old)
            self._add_held(txn, key, -count, -nbytes)
        return count

    # --- the cache's bookkeeping (see the module docstring) ------------------

    def touch_blocks(self, key: bytes, blocks: Iterable[int], tick: int) -> None:
        """Record that held `blocks` were read at `tick` (any increasing
        number, the same clock for every process of the home; the caller's
        time in ms).  Blocks not held are skipped.  One transaction."""
        _check_key(key)
        with self._write() as txn:
            get, put, delete = txn.get, txn.put, txn.delete
            count = nbytes = 0
            new = _TICK.pack(tick)
            for b in blocks:
                k = key + _U64.pack(b)
                data = get(k, db=self._blocks)
                if data is None:
                    continue
                old = get(k, db=self._lastread)
                if old is not None:
                    old_tick, _size = _LAST.unpack(old)
                    if old_tick >= tick:
                        continue
                    delete(bytes(old[:8]) + k, db=self._lru)
                else:
                    count += 1
                    nbytes += len(data)
                put(k, _LAST.pack(tick, len(data)), db=self._lastread)
                put(new + k, b"", db=self._lru)
            if count:
                self._add_counter(txn, self._cached, key, count, nbytes)

    def untrack_blocks(self, key: bytes, blocks: Iterable[int] | None) -> int:
        """Take blocks out of the cache's bookkeeping (they are kept: pinned);
        None: up to EVICT_BATCH of the drive's.  Returns how many were taken
        out (call again while it returns EVICT_BATCH with None)."""
        with self._write() as txn:
            if blocks is None:
                cur = txn.cursor(db=self._lastread)
                ks = []
                if cur.set_range(key):
                    for k in cur.iternext(keys=True, values=False):
                        if k[:KEY_BYTES] != key or len(ks) >= EVICT_BATCH:
                            break
                        ks.append(bytes(k))
            else:
                ks = [key + _U64.pack(b) for b in blocks]
            count = nbytes = 0
            for k in ks:
                old = txn.pop(k, db=self._lastread)
                if old is None:
                    continue
                tick, size = _LAST.unpack(old)
                txn.delete(_TICK.pack(tick) + k, db=self._lru)
                count += 1
                nbytes += size
            if count:
                self._add_counter(txn, self._cached, key, -count, -nbytes)
        return count

    def cached(self, key: bytes) -> tuple[int, int]:
        """(blocks, bytes) of a drive in the cache's bookkeeping (evictable)."""
        with self.env.begin(db=self._cached) as txn:
            raw = txn.get(key)
        return _HELD.unpack(raw) if raw is not None else (0, 0)

    def cache_usage(self) -> tuple[int, int]:
        """(blocks, bytes) in the cache's bookkeeping, every drive together."""
        blocks = nbytes = 0
        with self.env.begin(db=self._cached) as txn:
            for _k, v in txn.cursor():
                b, n = _HELD.unpack(v)
                blocks += b
                nbytes += n
        return blocks, nbytes

    def evict(self, nbytes: int, keep=None) -> tuple[int, int]:
        """Delete the least recently read blocks until `nbytes` are freed (at
        most EVICT_BATCH blocks: call again for more).  `keep(key, block)`
        -> True spares a block and takes it out of the bookkeeping (pinned
        meanwhile).  Returns (blocks, bytes) freed.  One transaction."""
        freed = freed_bytes = 0
        seen = 0
        with self._write() as txn:
            cur = txn.cursor(db=self._lru)
            counts: dict[bytes, list[int]] = {}
            held: dict[bytes, list[int]] = {}
            if not cur.first():
                return 0, 0
            while freed_bytes < nbytes and seen < EVICT_BATCH:
                lk = bytes(cur.key())
                k = lk[8:]
                key, block = k[:KEY_BYTES], _U64.unpack_from(k, KEY_BYTES)[0]
                seen += 1
                old = txn.pop(k, db=self._lastread)
                size = _LAST.unpack(old)[1] if old is not None else 0
                c = counts.setdefault(key, [0, 0])
                c[0] -= 1
                c[1] -= size
                if keep is None or not keep(key, block):
                    data = txn.pop(k, db=self._blocks)
                    if data is not None:
                        h = held.setdefault(key, [0, 0])
                        h[0] -= 1
                        h[1] -= len(data)
                        freed += 1
                        freed_bytes += len(data)
                if not cur.delete() or not cur.key():  # delete moves to the next record
                    break
            for key, (b, n) in counts.items():
                self._add_counter(txn, self._cached, key, b, n)
            for key, (b, n) in held.items():
                self._add_counter(txn, self._held, key, b, n)
        return freed, freed_bytes

    def _add_counter(self, txn, db, key: bytes, count: int, nbytes: int) -> None:
        raw = txn.get(key, db=db)
        blocks, size = _HELD.unpack(raw) if raw is not None else (0, 0)
        blocks, size = max(0, blocks + count), max(0, size + nbytes)
        if blocks or size:
            txn.put(key, _HELD.pack(blocks, size), db=db)
        elif raw is not None:
            txn.delete(key, db=db)

    def forget_some(self, key: bytes) -> int:
        """Delete up to EVICT_BATCH of a drive's blocks and tree nodes (with
        their accounting): the first steps of forgetting it.  Returns how many
        records went; 0 when none are left (then call `forget_drive`)."""
        _check_key(key)
        gone = 0
        held = [0, 0]
        cached = [0, 0]
        with self._write() as txn:
            for db in (self._blocks, self._nodes):
                cur = txn.cursor(db=db)
                if not cur.set_range(key):
                    continue
                while gone < EVICT_BATCH and cur.key() and bytes(cur.key()[:KEY_BYTES]) == key:
                    k = bytes(cur.key())
                    if db is self._blocks:
                        held[0] -= 1
                        held[1] -= len(cur.value())
                        old = txn.pop(k, db=self._lastread)
                        if old is not None:
                            txn.delete(bytes(old[:8]) + k, db=self._lru)
                            cached[0] -= 1
                            cached[1] -= _LAST.unpack(old)[1]
                    gone += 1
                    if not cur.delete():
                        break
            self._add_counter(txn, self._held, key, *held)
            self._add_counter(txn, self._cached, key, *cached)
        return gone

    def forget_drive(self, key: bytes) -> None:
        """The last step of forgetting a drive (after `forget_some` returned
        0): its heads, fork evidence, record and counters.  One transaction."""
        _check_key(key)
        with self._write() as txn:
            for db in (self._heads, self._forks):
                cur = txn.cursor(db=db)
                if cur.set_range(key):
                    while cur.key() and bytes(cur.key()[:KEY_BYTES]) == key:
                        if not cur.delete():
                            break
            for db in (self._drives, self._held, self._cached):
                txn.delete(key, db=db)

    # --- tree nodes ---------------------------------------------------------

    def get_node(self, key: bytes, index: int) -> Node | None:
        with self.env.begin(db=self._nodes) as txn:
            raw = txn.get(_bk(key, index))
        if raw is None:
            return None
        return Node(index, raw[:HASH_BYTES], _NODE.unpack_from(raw, HASH_BYTES)[0])

    def get_nodes(self, key: bytes, indices: Iterable[int]) -> list[Node | None]:
        out: list[Node | None] = []
        with self.env.begin(db=self._nodes) as txn:
            get = txn.get
            for i in indices:
                raw = get(key + _U64.pack(i))
                out.append(None if raw is None else
                           Node(i, raw[:HASH_BYTES], _NODE.unpack_from(raw, HASH_BYTES)[0]))
        return out

    def node_range(self, key: bytes, lo: int, hi: int) -> dict[int, Node]:
        """Stored nodes with lo <= index < hi (one cursor scan)."""
        out: dict[int, Node] = {}
        end = key + _U64.pack(hi)
        with self.env.begin(db=self._nodes) as txn:
            cur = txn.cursor()
            if not cur.set_range(key + _U64.pack(lo)):
                return out
            for k, raw in cur:
                if k >= end:
                    break
                i = _U64.unpack_from(k, KEY_BYTES)[0]
                out[i] = Node(i, raw[:HASH_BYTES], _NODE.unpack_from(raw, HASH_BYTES)[0])
        return out

    def iter_nodes(self, key: bytes) -> Iterator[Node]:
        with self.env.begin(db=self._nodes) as txn:
            cur = txn.cursor()
            if not cur.set_range(key):
                return
            for k, raw in cur:
                if k[:KEY_BYTES] != key:
                    return
                yield Node(_U64.unpack_from(k, KEY_BYTES)[0], raw[:HASH_BYTES],
                           _NODE.unpack_from(raw, HASH_BYTES)[0])

    def put_nodes(self, key: bytes, nodes: Iterable[Node]) -> None:
        with self._write() as txn:
            self._put_nodes(txn, key, nodes)

    def _put_nodes(self, txn, key: bytes, nodes: Iterable[Node]) -> None:
        db = self._nodes
        for n in nodes:
            txn.put(key + _U64.pack(n.index), n.hash + _NODE.pack(n.size), db=db)

    # --- heads and forks ----------------------------------------------------

    def latest_head(self, key: bytes) -> Head | None:
        with self.env.begin(db=self._heads) as txn:
            cur = txn.cursor()
            # the last record with this prefix: position after it, step back
            if cur.set_range(key + b"\xff" * 8):
                if cur.key()[:KEY_BYTES] == key:
                    return self._head(cur.key(), cur.value())
                if not cur.prev():
                    return None
            elif not cur.last():
                return None
            if cur.key()[:KEY_BYTES] != key:
                return None
            return self._head(cur.key(), cur.value())

    @staticmethod
    def _head(k: bytes, v: bytes) -> Head:
        return Head(_U64.unpack_from(k, KEY_BYTES)[0], v[:HASH_BYTES], v[HASH_BYTES:])

    def get_head(self, key: bytes, length: int) -> Head | None:
        with self.env.begin(db=self._heads) as txn:
            raw = txn.get(_bk(key, length))
        return None if raw is None else Head(length, raw[:HASH_BYTES], raw[HASH_BYTES:])

    def heads(self, key: bytes) -> list[Head]:
        """Every signed head held, by length ascending."""
        out = []
        with self.env.begin(db=self._heads) as txn:
            cur = txn.cursor()
            if cur.set_range(key):
                for k, v in cur:
                    if k[:KEY_BYTES] != key:
                        break
                    out.append(self._head(k, v))
        return out

    def put_head(self, key: bytes, head: Head, nodes: Iterable[Node] = ()) -> None:
        """Store a verified signed head (and nodes it makes trusted) in one transaction."""
        _check_key(key)
        with self._write() as txn:
            self._put_nodes(txn, key, nodes)
            txn.put(_bk(key, head.length), head.root + head.signature, db=self._heads)
            if txn.get(key, db=self._drives) is None:
                txn.put(key, _record_encoder.encode(DriveRecord(pinned=False)), db=self._drives)

    def put_fork(self, key: bytes, head: Head) -> None:
        """Keep a conflicting signed head as evidence."""
        with self._write() as txn:
            txn.put(_bk(key, head.length) + head.root, head.signature, db=self._forks)

    def forks(self, key: bytes) -> list[Head]:
        out = []
        with self.env.begin(db=self._forks) as txn:
            cur = txn.cursor()
            if cur.set_range(key):
                for k, v in cur:
                    if k[:KEY_BYTES] != key:
                        break
                    out.append(Head(_U64.unpack_from(k, KEY_BYTES)[0], k[KEY_BYTES + 8:], v))
        return out

    # --- the final transaction of a version ----------------------------------

    def commit_version(self, key: bytes, head: Head, nodes: Iterable[Node],
                       record: DriveRecord | None = None,
                       blocks: Iterable[tuple[int, bytes]] = ()) -> None:
        """Write the last blocks, tree nodes, signed head and drive record of a
        version in one transaction, then flush to disk.  Before this returns
        the version does not exist; after, it is durable."""
        _check_key(key)
        with self._write() as txn:
            self._put_blocks(txn, key, blocks)
            self._put_nodes(txn, key, nodes)
            txn.put(_bk(key, head.length), head.root + head.signature, db=self._heads)
            if record is not None or txn.get(key, db=self._drives) is None:
                txn.put(key, _record_encoder.encode(record or DriveRecord()), db=self._drives)
        self.sync()

    # --- secret keys ----------------------------------------------------------

    def key_path(self, key_text: str) -> Path:
        return self.keys_dir / f"{key_text}.key"

    def save_secret(self, key_text: str, seed: bytes) -> Path:
        """Write a drive's secret seed to keys/<key>.key, mode 0600, durably."""
        if len(seed) != 32:
            raise ValueError("secret seed must be 32 bytes")
        path = self.key_path(key_text)
        try:
            self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_key_file(path, seed)
        except OSError as exc:
            raise StoreError(f"cannot write the secret key file in {self.keys_dir}: "
                             f"{exc.strerror}") from None
        return path

    def load_secret(self, key_text: str) -> bytes | None:
        """The secret seed of a drive, or None if this node does not hold it.

        Raises KeyFileError if the file is readable by group or others, or malformed.
        """
        return read_key_file(self.key_path(key_text), "secret key file")


# --- key files -------------------------------------------------------------------

def write_key_file(path: Path, secret: bytes, *, keep_existing: bool = False) -> None:
    """Write `secret` as hex to `path`, mode 0600, fsynced, atomically.

    With keep_existing, a file another process wrote first wins.  Raises OSError."""
    write_private_file(path, secret.hex().encode() + b"\n", keep_existing=keep_existing)


def write_private_file(path: Path, data: bytes, *, keep_existing: bool = False) -> None:
    """Write `data` to `path`, mode 0600, fsynced, atomically (a reader sees the old
    file or the new one, whole).  With keep_existing, a file another process wrote
    first wins.  Raises OSError."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes never share one
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if not keep_existing:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    os.unlink(tmp)


def read_key_file(path: Path, what: str, size: int = 32) -> bytes | None:
    """The secret in a key file (64 hex digits), or None if there is none.

    Raises KeyFileError, naming `what` and `path`, if the file is accessible
    by group or others (with the chmod that fixes it), unreadable or malformed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{what} {path} is accessible by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); fix it with: chmod 600 {path}"
            )
        raw = os.read(fd, 200)
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) != size:
        raise KeyFileError(f"{what} {path} is malformed (expected {2 * size} hex digits)")
    return secret
