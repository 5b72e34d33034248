"""Fetching: the drive's BlockSource — wants, scheduling, verification, storing.

Theory of operation
-------------------
`fetch` turns missing blocks into wants, queued in request order.
`schedule` hands queued wants to peers that announced the block and have a
free pipeline slot (`PIPELINE` requests per peer), least-loaded first,
skipping peers that already failed that want.  A long sequential fetch
also queues the blocks after it (read-ahead), and a read of held blocks
inside that window moves it on (`reading`), so the pipelines do not drain
between reads.  Each Request asks for the proof nodes we do not
hold (a per-drive cache of verified nodes, `NodeCaches`) against
`Drive.proof_length(block)` (the length of the head the drive's view was
opened from: its newest, unless no peer can serve that); the reply is verified against the signed head of exactly
that length, so adopting a newer head meanwhile cannot make an honest reply
look bad.  Verified blocks are written by a worker thread, many per
transaction, with the cache's touches of what was read meanwhile
(`Cache.riding`).  A read (`fetch_verified`) wakes as soon as its blocks
are verified and takes the ones not yet stored from memory, so the store's
commits are never in its way; `fetch` (a mirror's download) wakes once
they are stored.  While a stream
goes on (a write ended under `STREAMING` s ago and replies are still in
flight) the writer lets a batch grow to `GATHER_BYTES` for up to
`GATHER_WAIT` s before it commits; a lone read is written at once.

Progress is judged by completed replies, never by bytes: a peer with
requests out that completes none for `STALL_TIMEOUT` is stalled — its wants
go to the others and it gets nothing new until it answers; a peer stalled
`MAX_STALLS` times in a row is dropped.  A single request unanswered for
`REQUEST_TIMEOUT` while the peer answers requests sent after it is
cancelled and asked of another peer.  A NoData moves the want to another
peer; a peer that disconnects has its wants queued again for the others.
Anything failing verification drops the peer (its ban follows).  A fetch
fails with BlockUnavailableError when no block of it arrived for
`timeout` seconds, or at once when no peer is left to ask (every static
peer banned, none discovered).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import trio

from .. import tree
from ..drive import Drive
from ..errors import BlockUnavailableError, VerificationError
from ..store import Store
from ..types import Node
from ..wire import messages as m
from .peer import Inflight, Peer, PeerDropped

PIPELINE = 128             # requests in flight per peer
READAHEAD_MIN = 8          # a fetch of this many contiguous blocks ...
READAHEAD_BYTES = 16 << 20  # ... also queues twice as many following blocks, at most this many
READAHEAD_PEERS = 4        # bytes per peer able to send the drive, counting this many at most
MAX_CACHED_NODES = 1 << 18   # tree nodes kept in memory per drive (an 8 GiB drive; ~40 MiB)
MAX_UNWRITTEN = 64 << 20     # verified block bytes waiting for the store before reads pause
STALL_TIMEOUT = 3.0        # a peer with requests out that completes none this long is stalled
MAX_STALLS = 3             # ... and dropped after this many stall periods in a row
REQUEST_TIMEOUT = 10.0     # one request skipped this long while later ones are answered
DEFAULT_TIMEOUT = 30.0
RIDE_IDLE = 0.25           # s the writer waits idle before it stops taking a drive's touches
GATHER_BYTES = 8 << 20     # while streaming, the writer lets a batch grow to this ...
GATHER_WAIT = 0.01         # ... for at most this many s, while more replies are on their way
STREAMING = 0.05           # s after its last write ended the writer counts as streaming
DRAIN_TIMEOUT = 30.0       # s a closing swarm waits for the writer to store what was verified


class _Want:
    __slots__ = ("block", "done", "tried", "error", "waiters")

    def __init__(self, block: int):
        self.block = block
        self.done = trio.Event()
        self.tried: set[Peer] = set()
        self.error: str | None = None
        self.waiters = 0


class _Fetches:
    """Per-drive fetch state."""

    __slots__ = ("wants", "queue", "queued", "last_progress", "ahead_start", "ahead_end", "window")

    def __init__(self):
        self.wants: dict[int, _Want] = {}
        self.queue: deque[int] = deque()   # blocks to ask for, in order (may hold stale entries)
        self.queued: set[int] = set()      # ... the live ones: a run takes blocks from the middle
        self.last_progress = 0.0
        self.ahead_start = self.ahead_end = self.window = 0  # the read-ahead window

    def push(self, block: int, front: bool = False) -> None:
        if block not in self.queued:
            self.queued.add(block)
            if front:
                self.queue.appendleft(block)
            else:
                self.queue.append(block)

    def pop(self) -> int | None:
        while self.queue:
            block = self.queue.popleft()
            if block in self.queued:
                self.queued.discard(block)
                return block
        return None

    def take(self, block: int) -> bool:
        """Take a queued block out of the middle (for a run); True if it was queued."""
        if block in self.queued:
            self.queued.discard(block)
            return True
        return False

    def clear(self) -> None:
        self.queue.clear()
        self.queued.clear()


class NodeCaches:
    """Verified tree nodes per drive, in memory: filled from the store by one
    cursor scan on first use (up to MAX_CACHED_NODES), then by what we verify."""

    def __init__(self, store: Store):
        self.store = store
        self._nodes: dict[bytes, dict[int, object]] = {}
        self.complete: dict[bytes, bool] = {}   # ... and whether that is all we hold

    def cache(self, key: bytes) -> dict:
        cache = self._nodes.get(key)
        if cache is None:
            cache = self._nodes[key] = {}
            complete = True
            for node in self.store.iter_nodes(key):
                if len(cache) >= MAX_CACHED_NODES:
                    complete = False
                    break
                cache[node.index] = node
            self.complete[key] = complete
        return cache

    def remember(self, key: bytes, nodes) -> None:
        cache = self.cache(key)
        for n in nodes:
            if len(cache) >= MAX_CACHED_NODES:
                self.complete[key] = False
                return
            cache[n.index] = n

    def trusted(self, key: bytes):
        """get(n) -> verified Node or None.  A dict lookup while the cache
        holds every node we have; else the store answers what it lacks."""
        cache = self.cache(key)
        if self.complete[key]:
            return cache.get
        store = self.store

        def get(n: int):
            node = cache.get(n)
            return node if node is not None else store.get_node(key, n)
        return get

    def serving(self, key: bytes):
        """Stored nodes for proofs: the cache, then the store (an owner's
        import in another process adds nodes the cache has not seen)."""
        cache = self.cache(key)
        store = self.store

        def get(n: int):
            node = cache.get(n)
            if node is None:
                node = store.get_node(key, n)
                if node is not None and len(cache) < MAX_CACHED_NODES:
                    cache[n] = node
            return node
        return get


class Fetcher:
    """Block fetching for a swarm.  `peers()` lists the connected peers,
    `drive(key)` the registered Drive, `drop(peer, reason)` drops a peer at
    fault, `more_peers_coming()` says whether a peer may still appear."""

    def __init__(self, store: Store, nodes: NodeCaches, *, timeout: float,
                 peers: Callable[[], list[Peer]], drive: Callable[[bytes], Drive | None],
                 more_peers_coming: Callable[[], bool], describe: Callable[[], str]):
        self.store = store
        self.nodes = nodes
        self.timeout = timeout
        self._peers = peers
        self._drive = drive
        self._more_peers_coming = more_peers_coming
        self._describe = describe
        self._fetches: dict[bytes, _Fetches] = {}
        self._batch: dict[bytes, tuple[list, list]] = {}   # verified, not yet stored
        self._unstored: dict[bytes, dict[int, bytes]] = {}  # ... by drive and block, until stored
        self._handed: dict[bytes, set[int]] = {}  # ... of those, what reads took from memory
        self._stored_event = trio.Event()   # set at the end of each round of the writer
        self._batch_bytes = 0
        self._writing: dict[bytes, tuple[list, list]] = {}  # the batch the writer is storing
        self._writing_bytes = 0
        self._batch_event = trio.Event()
        self._room_event = trio.Event()
        self._writer_ended = False

    # --- replies ----------------------------------------------------------------------------

    def on_reply(self, peer: Peer, inf: Inflight, msg, leaves: list[Node] | None = None) -> None:
        """A reply to `inf`; `leaves`: a Data's blocks hashed already (in the
        peer's worker thread), else they are hashed here."""
        drive = self._drive(inf.key)
        if drive is None:
            return
        if isinstance(msg, m.Data):
            self._accept_run(peer, drive, inf, msg, leaves)
        elif isinstance(msg, m.IndexData):
            try:
                self._accept_index(peer, drive, msg)
            finally:
                inf.done.set()
        else:  # NoData
            self._requeue(peer, inf)
        self.schedule()

    def _accept_run(self, peer: Peer, drive: Drive, inf: Inflight, msg: m.Data,
                    leaves: list[Node] | None = None) -> None:
        """Verify a run with one climb; keep its good blocks, refetch the bad ones
        elsewhere and drop the peer that sent them."""
        key = drive.key
        root = drive.root_of(inf.length)
        if root is None:
            self._requeue(peer, inf)
            return  # we never held that version's head: cannot check, do not store
        try:
            result = tree.verify_range(inf.start, msg.blocks if leaves is None else leaves,
                                       msg.nodes, inf.length, root,
                                       self.nodes.trusted(key), msg.leaves)
        except VerificationError as exc:
            self._requeue(peer, inf)
            raise PeerDropped(f"sent blocks of drive {drive.key_text} that fail verification "
                              f"({exc})") from None
        bad = set(result.bad)
        self._keep(peer, key, [(b, d) for b, d in zip(inf.blocks, msg.blocks) if b not in bad],
                   result.nodes)
        if bad:
            self._requeue(peer, inf, only=bad)
            raise PeerDropped(f"sent block {min(bad)} of drive {drive.key_text} that fails "
                              f"verification ({len(bad)} of a run of {inf.count} blocks)")

    def _accept_index(self, peer: Peer, drive: Drive, msg: m.IndexData) -> None:
        key = drive.key
        root = drive.root_of(msg.length)
        if root is None:
            return  # a head we do not hold (it came before, and was older or refused)
        runs = [(r.start, r.blocks, r.leaves, r.nodes) for r in msg.runs]
        try:
            result = tree.verify_runs(runs, msg.length, root, self.nodes.trusted(key))
        except VerificationError as exc:
            raise PeerDropped(f"sent index blocks of drive {drive.key_text} that fail "
                              f"verification ({exc})") from None
        if result.bad:
            raise PeerDropped(f"sent block {min(result.bad)} of drive {drive.key_text} "
                              "that fails verification")
        self._keep(peer, key, [(r.start + i, d) for r in msg.runs for i, d in enumerate(r.blocks)],
                   result.nodes)

    def _keep(self, peer: Peer, key: bytes, items: list, nodes) -> None:
        """Verified blocks and nodes: to the store (by the writer), and known
        now; the reads waiting for the blocks wake (`fetch_verified`)."""
        self.nodes.remember(key, nodes)
        batch_items, batch_nodes = self._batch.setdefault(key, ([], []))
        batch_items.extend(items)
        batch_nodes.extend(nodes)
        self._batch_bytes += sum(len(d) for _b, d in items)
        peer.blocks_received += len(items)
        unstored = self._unstored.setdefault(key, {})
        unstored.update(items)
        f = self._fetches.get(key)
        if f is not None:
            wants = f.wants
            for block, _data in items:
                want = wants.get(block)
                if want is not None:  # stays a want (not asked again) until stored
                    want.done.set()
            f.last_progress = trio.current_time()

    def after_input(self) -> None:
        if self._batch:
            self._batch_event.set()

    async def input_room(self) -> None:
        """Wait while too many verified blocks wait to be written."""
        while self._batch_bytes + self._writing_bytes > MAX_UNWRITTEN:
            # every peer's reader may wait here: share one event
            if self._room_event.is_set():
                self._room_event = trio.Event()
            await self._room_event.wait()

    async def writer(self) -> None:
        """Store verified blocks in a worker thread (LMDB releases the GIL), a
        transaction per drive per round, then wake their waiters.  Blocks
        that arrive meanwhile gather into the next, larger, round."""
        riding: set = set()  # the caches whose touches our transactions take (Cache.riding)
        last_end = -1e9  # when the last write ended
        try:
            while True:
                if not self._batch:
                    self._batch_event = trio.Event()
                    if riding:  # a fetch pauses between batches: keep taking its touches
                        with trio.move_on_after(RIDE_IDLE):
                            await self._batch_event.wait()
                        if self._batch:
                            continue
                        for cache in riding:
                            cache.riding = False  # idle: its own flushes write them again
                        riding.clear()
                    await self._batch_event.wait()
                    continue
                if trio.current_time() - last_end < STREAMING:
                    await self._gather()
                batch, self._batch = self._batch, {}
                self._writing = batch
                self._writing_bytes, self._batch_bytes = self._batch_bytes, 0
                caches = {}
                for key in batch:
                    drive = self._drive(key)
                    if drive is not None and drive.cache is not None:
                        caches[key] = drive.cache
                        drive.cache.riding = True
                        riding.add(drive.cache)
                try:
                    await trio.to_thread.run_sync(self._write, batch, caches)
                finally:
                    self._writing = {}
                    self._writing_bytes = 0
                    self._room_event.set()
                    last_end = trio.current_time()
                self._wake_stored(batch)
        finally:
            self._writer_ended = True
            self._stored_event.set()  # nobody waits for it any more
            for cache in riding:
                cache.riding = False

    async def drain(self, key: bytes | None = None) -> None:
        """Wait (at most DRAIN_TIMEOUT) until the writer has stored every
        block verified so far (of drive `key`; None: of every drive): a
        swarm closing after a read that took its blocks from memory leaves
        them in the store, and what a file's `blocks_held` says counts them."""
        waiting = {k: list(v) for k, v in self._unstored.items() if key is None or k == key}
        with trio.move_on_after(DRAIN_TIMEOUT):
            await self._until_stored(waiting)

    async def _until_stored(self, waiting: dict[bytes, list[int]]) -> None:
        """Return once none of these blocks (by drive) waits for the writer
        (or the writer has ended)."""
        while not self._writer_ended and any(
                (u := self._unstored.get(k)) and any(b in u for b in blocks)
                for k, blocks in waiting.items()):
            await self._stored_event.wait()  # (a batch never waits for the writer unwoken)

    async def _gather(self) -> None:
        """A stream: let the batch grow towards GATHER_BYTES for up to
        GATHER_WAIT while replies are still on their way.  Each commit costs
        two flushes to disk whatever its size; measured on a cold 1 GiB
        fetch, the writer made 310-460 commits of about 3 MiB, and 100-165
        with this, for 0.5-1.3 s less writer time.  A read alone (nothing
        written just before, or nothing more in flight) is written at once."""
        deadline = trio.current_time() + GATHER_WAIT
        while self._batch_bytes < GATHER_BYTES and trio.current_time() < deadline \
                and any(peer.inflight for peer in self._peers()):
            self._batch_event = trio.Event()
            with trio.move_on_at(deadline):
                await self._batch_event.wait()

    def _wake_stored(self, batch: dict) -> None:
        """The batch is stored: its blocks are no longer wants, and the
        fetches waiting for the store wake."""
        for key, (items, _nodes) in batch.items():
            drive = self._drive(key)
            if drive is not None:  # verified by _accept, now stored
                drive.note_stored([block for block, _data in items])
            unstored = self._unstored.get(key)
            for block, data in items:
                if unstored is not None and unstored.get(block) is data:
                    del unstored[block]  # (not if a later reply's copy waits in the next batch)
                self._done(key, block)
            if not unstored:
                self._unstored.pop(key, None)
            handed = self._handed.get(key)
            if handed:
                read = [block for block, _data in items if block in handed]
                handed.difference_update(read)
                if not handed:
                    del self._handed[key]
                if read and drive is not None and drive.cache is not None:
                    drive.cache.touched(drive, read)  # held now: the touch counts
        self._stored_event.set()
        self._stored_event = trio.Event()
        self.schedule()

    def _write(self, batch: dict, caches: dict) -> None:
        for key, (items, nodes) in batch.items():
            cache = caches.get(key)
            if cache is None:
                self.store.put_block_items(key, items, nodes)
                continue
            # a capped cache: steps of cache.step() bytes, the cap kept after
            # each (the nodes go with the first, before the blocks they prove)
            for chunk in _steps(items, cache.step()):
                self.store.put_block_items(key, chunk, nodes, cache.take(key))
                nodes = ()
                cache.enforce()

    def peer_gone(self, peer: Peer) -> None:
        if self._batch:  # what it sent before it went is verified: keep it
            self._batch_event.set()
        for inf in peer.inflight.values():
            if inf.path is not None:
                inf.done.set()
            else:
                self._requeue(peer, inf)
        peer.inflight.clear()
        self.schedule()

    def channel_closed(self, peer: Peer, key: bytes) -> None:
        for rid, inf in list(peer.inflight.items()):
            if inf.key == key:
                del peer.inflight[rid]
                self._requeue(peer, inf)
        self.schedule()

    def _done(self, key: bytes, block: int) -> None:
        f = self._fetches.get(key)
        if f is None:
            return
        want = f.wants.pop(block, None)
        if want is not None:
            f.last_progress = trio.current_time()
            want.done.set()

    def _requeue(self, peer: Peer, inf: Inflight, only=None) -> None:
        """Ask for a request's blocks again, not of `peer` (`only`: just these)."""
        if inf.path is not None:
            inf.done.set()
            return
        f = self._fetches.get(inf.key)
        if f is None:
            return
        for block in reversed(inf.blocks):
            if only is not None and block not in only:
                continue
            want = f.wants.get(block)
            if want is not None and not want.done.is_set():
                want.tried.add(peer)
                f.push(block, front=True)

    # --- stalls and timeouts ------------------------------------------------------------------

    async def watch(self) -> None:
        """Judge peers by completed replies (see the module docstring)."""
        while True:
            await trio.sleep(0.25)
            now = trio.current_time()
            moved = False
            for peer in self._peers():
                if peer.closed or not peer.inflight:
                    continue
                if peer.paused:
                    # we are not reading its replies (our own back-pressure)
                    peer.stall_mark = now
                    continue
                if now - max(peer.last_reply, peer.stall_mark) > STALL_TIMEOUT:
                    peer.stall_mark = now  # the next period starts now
                    peer.stalls += 1
                    if not peer.stalled:
                        peer.stalled = True
                        for inf in peer.inflight.values():
                            self._requeue(peer, inf)
                        moved = True
                    if peer.stalls >= MAX_STALLS:
                        peer.drop(f"answered none of our requests for "
                                  f"{STALL_TIMEOUT * MAX_STALLS:g} s", fault=False)
                    continue
                # requests skipped while later ones were answered
                for rid, inf in list(peer.inflight.items()):
                    if inf.path is None and now - inf.sent > REQUEST_TIMEOUT \
                            and peer.last_reply > inf.sent:
                        peer.cancel(rid)
                        self._requeue(peer, inf)
                        moved = True
            if moved:
                self.schedule()

    # --- scheduling --------------------------------------------------------------------

    def schedule(self) -> None:
        """Hand queued wants to peers with free pipeline slots, as runs of
        consecutive blocks the chosen peer has (up to what one reply holds)."""
        all_peers = self._peers()
        for key, f in self._fetches.items():
            if not f.queued:
                continue
            drive = self._drive(key)
            if drive is None or drive.head is None:
                continue
            peers = [p for p in all_peers if p.can_request(key) and not p.stalled]
            if not peers:
                if not all_peers and not self._more_peers_coming():
                    self._fail_all(f, "no peer is left to ask")
                continue
            deferred = []
            length = drive.head.length
            trusted = self.nodes.trusted(key)
            max_run = max(1, min(m.MAX_RUN_BLOCKS, m.MAX_RUN_DATA // max(drive.block_size, 1)))
            while f.queued:
                free = [p for p in peers if len(p.inflight) < PIPELINE]
                if not free:
                    break
                block = f.pop()
                if block is None:
                    break
                want = f.wants.get(block)
                if want is None or want.done.is_set():
                    continue
                if block >= length:
                    deferred.append(block)
                    continue
                if drive.has_block(block):
                    self._done(key, block)
                    continue
                cands = [p for p in free if p not in want.tried and p.has(key, block)]
                if not cands:
                    deferred.append(block)
                    continue
                peer = min(cands, key=lambda p: len(p.inflight))
                # a run is proven against one signed length: the version the
                # view was opened from, if the block lies in it (Drive.proof_length)
                plen = drive.proof_length(block)
                end = block + 1
                while end - block < max_run and end < plen and end in f.queued:
                    nxt = f.wants.get(end)
                    if nxt is None or nxt.done.is_set() or peer in nxt.tried or not peer.has(key, end):
                        break
                    f.take(end)
                    end += 1
                nodes = tree.range_proof_request(block, end, plen, lambda n: trusted(n) is not None)
                peer.request_run(key, block, end - block, plen, nodes)
            for block in reversed(deferred):
                f.push(block, front=True)

    def _fail_all(self, f: _Fetches, why: str) -> None:
        for want in list(f.wants.values()):
            if want.done.is_set():
                continue  # verified already (waiting for the store): not failed
            want.error = why
            want.done.set()
        f.wants.clear()
        f.clear()
        f.ahead_start = f.ahead_end = f.window = 0  # nothing of the window is queued now

    # --- BlockSource -------------------------------------------------------------------

    async def fetch(self, drive: Drive, blocks: list[int]) -> None:
        """Return once every listed block is stored (verified); else BlockUnavailableError."""
        await self._verified(drive, blocks)
        await self._until_stored({drive.key: blocks})

    async def fetch_verified(self, drive: Drive, blocks: list[int]) -> dict[int, bytes]:
        """Return once every listed block is stored or verified, with the
        bytes of those verified and not yet stored; else BlockUnavailableError."""
        await self._verified(drive, blocks)
        unstored = self._unstored.get(drive.key)
        if not unstored:
            return {}
        given = {b: unstored[b] for b in blocks if b in unstored}
        if given and drive.cache is not None:
            # the read's touch of them finds nothing stored yet: touched again once stored
            self._handed.setdefault(drive.key, set()).update(given)
        return given

    async def _verified(self, drive: Drive, blocks: list[int]) -> None:
        f = self._fetches.setdefault(drive.key, _Fetches())
        wants = []
        unstored = self._unstored.get(drive.key, {})
        for b in dict.fromkeys(blocks):
            if b in unstored or drive.has_block(b):
                continue
            want = f.wants.get(b)
            if want is None:
                want = f.wants[b] = _Want(b)
                f.push(b)
            want.waiters += 1
            wants.append(want)
        self._readahead(drive, f, blocks)
        if not wants:
            return
        f.last_progress = trio.current_time()
        self.schedule()
        try:
            for want in wants:
                while not want.done.is_set():
                    deadline = f.last_progress + self.timeout
                    if trio.current_time() >= deadline:
                        raise BlockUnavailableError(
                            f"block {want.block} of drive {drive.key_text} did not arrive within "
                            f"{self.timeout:g} s ({self._describe()})")
                    with trio.move_on_at(deadline):
                        await want.done.wait()
                if want.error:
                    raise BlockUnavailableError(
                        f"block {want.block} of drive {drive.key_text} is not available: "
                        f"{want.error} ({self._describe()})")
        finally:
            for want in wants:
                want.waiters -= 1
                if want.waiters == 0 and not want.done.is_set():
                    f.wants.pop(want.block, None)
                    f.take(want.block)

    def reading(self, drive: Drive, blocks: list[int]) -> None:
        """A read of held blocks inside the read-ahead window moves the
        window past it, as a fetch there does (the kernel's asynchronous
        read-ahead): a reader slower than the network then never drains
        the pipelines and waits a whole round trip at the window's end.
        Only the newly exposed blocks are looked at."""
        f = self._fetches.get(drive.key)
        if f is not None and blocks and f.ahead_start <= blocks[0] < f.ahead_end \
                and self._readahead(drive, f, blocks):
            self.schedule()

    def _readahead(self, drive: Drive, f: _Fetches, blocks: list[int]) -> int:
        """Sequential reads get read-ahead, so that the pipelines (several
        peers') do not drain between reads: a contiguous fetch of at least
        READAHEAD_MIN blocks queues twice as many after it, unwaited; a fetch
        inside the last read-ahead window doubles the window and moves it
        past this fetch.  The window is at most READAHEAD_BYTES per peer
        that can send the drive (up to READAHEAD_PEERS of them): each peer
        needs its own replies in flight (a 480 MiB read from four seeders
        behind 200 Mbit/s links, 4 alternating pairs: 61-76 MB/s, median
        67.6, with 16 MiB in all; 71-79, median 73.8, with 64 MiB), and a
        drive's block size, 4 KiB or 16 MiB, does not change what the
        window costs.  Returns how many blocks it queued."""
        n = len(blocks)
        if not n or blocks[-1] - blocks[0] != n - 1 or drive.head is None:
            return 0
        inside = f.ahead_start <= blocks[0] < f.ahead_end
        if not inside and n < READAHEAD_MIN:
            return 0
        senders = sum(1 for p in self._peers() if p.can_request(drive.key))
        limit = max(1, READAHEAD_BYTES * min(max(senders, 1), READAHEAD_PEERS) // max(drive.block_size, 1))
        window = min(limit, max(f.window * 2, 2 * n) if inside else 2 * n)
        start = blocks[-1] + 1
        end = min(start + window, drive.head.length)
        if inside:
            start = max(start, f.ahead_end)  # the rest of the old window is queued already
        f.ahead_start, f.ahead_end, f.window = blocks[0], end, window
        queued = 0
        unstored = self._unstored.get(drive.key, {})
        for b in range(start, end):
            if b not in f.wants and b not in unstored and not drive.has_block(b):
                f.wants[b] = _Want(b)
                f.push(b)
                queued += 1
        return queued

    async def fetch_path(self, drive: Drive, path: bytes) -> None:
        """Best effort: every index block on `path` from one peer, one round trip."""
        head = drive.target or drive.head  # the version being opened or shown
        if head is None:
            return
        peers = [p for p in self._peers() if p.can_request(drive.key) and not p.stalled
                 and p.has(drive.key, head.length - 1)]
        if not peers:
            return
        peer = min(peers, key=lambda p: len(p.inflight))
        inf = peer.request_path(drive.key, path, head.length)
        with trio.move_on_after(min(self.timeout, STALL_TIMEOUT)):
            await inf.done.wait()


def _steps(items: list, limit: int | None):
    """`items` ((block, data) pairs) in runs of at most `limit` data bytes
    (at least one item each); all of them at once if `limit` is None."""
    if limit is None:
        yield items
        return
    start = size = 0
    for i, (_block, data) in enumerate(items):
        if size and size + len(data) > limit:
            yield items[start:i]
            start, size = i, 0
        size += len(data)
    if start < len(items) or not items:
        yield items[start:]
