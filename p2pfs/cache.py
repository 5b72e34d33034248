"""The cache: drives this home neither owns, seeds nor pins, kept under a size cap.

Theory of operation
-------------------
*What is cache.*  A drive whose record is owned or pinned (`p2pfs seed KEY`,
`p2pfs pin KEY`), or whose secret key file is in the home, is *kept*: none
of its blocks is ever evicted.  A drive with pinned folders (`p2pfs pin KEY
PATH`) keeps the content blocks those folders reference in its newest
version held.  Everything else is cache.

*Bookkeeping.*  A reader reports the content blocks it reads
(`Cache.touched`, from `Drive.read` and `Drive.prefetch`); touches gather in
memory and go to the store in one transaction per drive (`flush`), from a
worker thread the wiring runs (`node.open_drive`) every `FLUSH_INTERVAL`
seconds, or as soon as `FLUSH_BYTES` were touched (the `wake` callback), so
the read path never waits for a disk flush.  While a fetch stores the
drive's blocks, its writer takes the touches into its own transactions
(`riding`, `take`; `Store.put_block_items`) and `flush` leaves them to it
(unless `SYNC_FLUSH_BYTES` gathered): a cold `cat` of 1 GiB then commits,
and flushes to disk, 136 times instead of 250 (counted here).  Index blocks and tree nodes
are never touched, so never evicted: a drive's structure stays readable and
only content comes and goes.

*The cap.*  After each flush, if the cache drives together hold more than
`HIGH_WATER` of the cap (every held byte counts, touched or not), the
least recently read blocks are evicted until they hold `LOW_WATER` of it
(`Store.evict`).  A fetch's writer stores a capped drive's blocks in steps
of at most `STEP_SHARE` of the cap (`step`) and keeps the cap after each,
so what is held overshoots by one step, not by a whole batch of the fetch
(32 MiB or more).  LMDB reuses the pages a commit freed only from the
commit after the next one, so an eviction ends with one more, small,
commit (`Store.settle`); else the write after it grows the store file by
its own size.  Measured: the home of a 1 GiB cat under a 100M cap peaked
at 108-124 MB of disk before (7 runs), at 99-103 MB with both (5 runs).  A reader whose block was evicted finds it missing and
fetches it again (`Drive.read` refetches; it never sees a half file);
without peers the read fails as for any block not held.  The blocks a read
is waiting for (`Cache.reading`, from `Drive.read`) are spared by this
process's evictions until the read has them: a fetch's writer keeps the cap
after each step, and a read-ahead may have touched those very blocks, so
without this a block could go between its fetch and the read it was
fetched for.  (They leave the bookkeeping, as pinned blocks do, and come
back with the read's touch.)  Another process sharing the home does not
know them; `Drive.read` fetches again a bounded number of times for that.

*Sharing the home.*  Several processes may read cache drives at once;
each enforces the cap after its own flushes, against the store's totals.
Whether a drive is kept is read from its record at most every
`KEPT_RECHECK` seconds (`pin` in another process takes effect then).

Errors: `flush` raises StoreError (disk full, ...) like every store write.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable, Iterable

from . import crypto
from .errors import P2pfsError, UsageError
from .store import Store

FLUSH_INTERVAL = 0.5       # s between flushes of the touches
FLUSH_BYTES = 4 << 20      # ... or as soon as this many bytes were touched
SYNC_FLUSH_BYTES = 64 << 20  # touched and still not flushed: flush on the reader's thread
HIGH_WATER = 0.7           # evict when the cache holds more than this share of the cap ...
LOW_WATER = 0.5            # ... down to this share (room for what is in flight)
KEPT_RECHECK = 2.0         # s a drive's kept/pinned state is trusted before reading it again
STEP_SHARE = 0.125         # a fetch stores at most this share of the cap per transaction ...
MIN_STEP = 1 << 20         # ... (but at least this many bytes), and keeps the cap after each

def kept(store: Store, key: bytes) -> bool:
    """Whether none of a drive's blocks may be evicted (owned, seeded, pinned)."""
    record = store.get_drive(key)
    if record is not None and record.kept:
        return True
    return store.key_path(crypto.encode_key(key)).exists()


def cache_drives(store: Store) -> list[bytes]:
    """Keys of the drives that are cache (not kept)."""
    return [key for key, _record in store.list_drives() if not kept(store, key)]


def cache_held(store: Store) -> int:
    """Bytes held by cache drives (everything they hold, touched or not)."""
    return sum(store.held(key)[1] for key in cache_drives(store))


def pinned_blocks(store: Store, key: bytes, paths: Iterable[bytes]) -> list[tuple[int, int]]:
    """Sorted (start, end) block ranges of the content below `paths` in the
    newest version held of a drive.  Raises P2pfsError if that version's
    index is not all held (the caller then keeps the whole drive)."""
    from .drive import Drive
    from .index import KIND_FILE
    drive = Drive(store, key).open_local()
    tops = [p.rstrip(b"/") or b"/" for p in paths]
    ranges = []
    for path, entry in drive.walk_local():
        if entry.kind != KIND_FILE:
            continue
        if any(t == b"/" or path == t or path.startswith(t + b"/") for t in tops):
            ranges.extend((s, s + n) for s, n in entry.extents)
    ranges.sort()
    merged: list[list[int]] = []
    for a, b in ranges:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _in_ranges(ranges: list[tuple[int, int]], block: int) -> bool:
    from bisect import bisect_right
    i = bisect_right(ranges, (block, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= block < ranges[i][1]


class Keep:
    """The eviction filter `Store.evict` asks: is this block kept?  Loaded
    up front for every drive (so that no read transaction opens inside the
    eviction's write transaction): kept whole, or its pinned folders' ranges."""

    def __init__(self, store: Store, spare: dict[bytes, frozenset[int]] | None = None):
        self._spare = spare or {}
        self._drives: dict[bytes, object] = {}
        for key, record in store.list_drives():
            if kept(store, key):
                self._drives[key] = True
            elif record.paths:
                try:
                    self._drives[key] = pinned_blocks(store, key, record.paths)
                except P2pfsError:
                    self._drives[key] = True  # its pinned folders cannot be told apart: keep it all

    def __call__(self, key: bytes, block: int) -> bool:
        if block in self._spare.get(key, ()):
            return True
        got = self._drives.get(key, ())
        return got is True or _in_ranges(got, block)


def evict(store: Store, target: int,
          spare: dict[bytes, frozenset[int]] | None = None) -> tuple[int, int]:
    """Evict least recently read cache blocks until cache drives hold at most
    `target` bytes, or nothing evictable is left; never the blocks in
    `spare` (drive key -> blocks: what reads are waiting for).  Returns
    (blocks, bytes) freed."""
    keep = Keep(store, spare)
    blocks = freed = 0
    used = cache_held(store)
    while used > target:
        n, b = store.evict(used - target, keep)
        blocks += n
        freed += b
        if n == 0 and store.cache_usage()[0] == 0:
            break  # the bookkeeping is empty: what is left is not evictable
        used = cache_held(store)
    if blocks:
        store.settle()  # so that the next write reuses the pages just freed
    return blocks, freed


class Cache:
    """Touch bookkeeping and the cap for the drives one process reads.

    `touched(drive, blocks)` is cheap (memory); `flush()` writes and enforces
    the cap (call it from a worker thread); `wake` is called (on the
    reader's thread) when enough was touched that a flush should run now."""

    def __init__(self, store: Store, cap: int | None, *, clock: Callable[[], float] = time.time):
        if cap is not None and cap < 0:
            raise UsageError("--cache-size must be 0 or more")
        self.store = store
        self.cap = cap
        self.clock = clock
        self.wake: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._enforce_lock = threading.Lock()
        self._pending: dict[bytes, set[int]] = {}
        self._pending_bytes = 0
        self._pending_bytes_of: dict[bytes, int] = {}
        # True while a fetch's writer stores this drive's blocks: it takes
        # the touches into its own transactions (`take`), and `flush` leaves
        # them to it
        self.riding = False
        self._kept: dict[bytes, tuple[bool, float]] = {}
        # drive key -> {block: how many reads wait for it}: never evicted here
        self._reading: dict[bytes, dict[int, int]] = {}
        self.evicted_blocks = 0
        self.evicted_bytes = 0

    def is_kept(self, key: bytes) -> bool:
        now = time.monotonic()
        got = self._kept.get(key)
        if got is None or now - got[1] > KEPT_RECHECK:
            got = (kept(self.store, key), now)
            self._kept[key] = got
        return got[0]

    def touched(self, drive, blocks: Iterable[int]) -> None:
        """`drive` (a Drive) read these content blocks just now."""
        if self.is_kept(drive.key):
            return
        blocks = list(blocks)
        with self._lock:
            pending_blocks = self._pending.setdefault(drive.key, set())
            before = len(pending_blocks)
            pending_blocks.update(blocks)
            # only what is new counts (small reads touch one block many times)
            n = (len(pending_blocks) - before) * drive.block_size
            self._pending_bytes += n
            self._pending_bytes_of[drive.key] = self._pending_bytes_of.get(drive.key, 0) + n
            pending = self._pending_bytes
        if pending >= SYNC_FLUSH_BYTES:
            self.flush()  # nobody flushed for a long time: back-pressure on the reader
        elif pending >= FLUSH_BYTES and self.wake is not None:
            self.wake()

    @contextlib.contextmanager
    def reading(self, key: bytes, blocks: Iterable[int]):
        """While inside, this process evicts none of drive `key`'s `blocks`
        (a read is fetching them, to read them as soon as they are stored)."""
        blocks = list(blocks)
        with self._lock:
            waiting = self._reading.setdefault(key, {})
            for b in blocks:
                waiting[b] = waiting.get(b, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for b in blocks:
                    n = waiting[b] - 1
                    if n:
                        waiting[b] = n
                    else:
                        del waiting[b]
                if not waiting:
                    self._reading.pop(key, None)

    def take(self, key: bytes) -> tuple[list[int], int] | None:
        """The touches of drive `key` gathered so far, taken out to be written
        by the caller in a transaction of its own: (blocks, tick), or None."""
        with self._lock:
            blocks = self._pending.pop(key, None)
            self._pending_bytes -= self._pending_bytes_of.pop(key, 0)
            if not blocks:
                return None
        return sorted(blocks), int(self.clock() * 1000)

    def flush(self) -> None:
        """Write the touches gathered so far (unless a writer is taking them,
        and there are not many), then keep the cap."""
        with self._flush_lock:
            with self._lock:
                if self.riding and self._pending_bytes < SYNC_FLUSH_BYTES:
                    pending = {}
                else:
                    pending, self._pending = self._pending, {}
                    self._pending_bytes = 0
                    self._pending_bytes_of = {}
            tick = int(self.clock() * 1000)
            for key, blocks in pending.items():
                self.store.touch_blocks(key, sorted(blocks), tick)
            self.enforce()

    def step(self) -> int | None:
        """Most block bytes a fetch should store in one transaction before
        `enforce` runs again; None: no cap, no limit."""
        return None if self.cap is None else max(MIN_STEP, int(self.cap * STEP_SHARE))

    def enforce(self) -> None:
        """Evict down to LOW_WATER of the cap if the cache holds more than
        HIGH_WATER (one thread at a time: the flush's or a fetch's writer)."""
        if self.cap is None:
            return
        with self._enforce_lock:
            if cache_held(self.store) > self.cap * HIGH_WATER:
                with self._lock:
                    spare = {k: frozenset(v) for k, v in self._reading.items()}
                n, b = evict(self.store, int(self.cap * LOW_WATER), spare)
                self.evicted_blocks += n
                self.evicted_bytes += b


def usage(store: Store, key: bytes) -> dict:
    """What `info` and `drives` show of a drive's place in the cache:
    state ("owned", "pinned", "folders" or "cache"), pinned folders, and
    bytes held, pinned (never evicted) and cached (evictable)."""
    record = store.get_drive(key)
    held = store.held(key)[1]
    cached = store.cached(key)[1]
    owned = store.key_path(crypto.encode_key(key)).exists() or (record is not None and record.owned)
    paths = list(record.paths) if record is not None else []
    shown = [os.fsdecode(p) for p in paths]
    if owned or (record is not None and record.pinned):
        state, pinned = ("owned" if owned else "pinned"), held
    elif paths:
        state = "folders"
        try:
            ranges = pinned_blocks(store, key, paths)
        except P2pfsError:
            ranges = [(0, 1 << 63)]
        pinned = sum(len(data) for a, b in ranges for _i, data in store.iter_blocks(key, a, b))
    else:
        state, pinned = "cache", 0
    return {"state": state, "pinned_paths": shown, "bytes_pinned": pinned,
            "bytes_cached": 0 if state in ("owned", "pinned") else cached}
