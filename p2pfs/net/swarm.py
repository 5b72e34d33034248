"""The swarm: every peer connection of a node, the block fetcher and the server.

Theory of operation
-------------------
*Drives.*  The swarm knows the drives registered with `add_drive` (those
the node reads or seeds) and, with `serve_all`, every drive in the store.
`lookup_key` answers the wire layer's "do we know this discovery key"; a
drive we do not know is refused exactly like a wrong capability.  Only the
dialling side opens channels on its own; a listener opens a channel only
in reply to a valid Open, so it never shows its discovery keys to a peer
that cannot prove it knows the drive.

*Announcing.*  On a channel's opening each side sends its latest signed
Head (if any) and then a Have of the blocks it holds (possibly empty: the
Have marks "announcement done").  A task polls the store's latest head of
every known drive every `POLL_INTERVAL` seconds (an owner's `import` runs as
another process on the same LMDB home) and pushes a new Head and Have to
every peer with the channel open; heads adopted from peers are passed on
the same way.  Heads from peers go through `Drive.accept_head`: a bad
signature drops the peer, a fork is reported (the evidence is kept by the
drive) and the peer stays, an older head changes nothing.

*Fetching* (the drive's `BlockSource`).  `fetch` turns missing blocks into
wants, queued in request order.  `schedule` hands queued wants to peers
that announced the block and have a free pipeline slot (`PIPELINE`
requests per peer), least-loaded first, skipping peers that already failed
that want.  A long sequential fetch also queues the blocks after it
(read-ahead), so the pipelines do not drain between reads.  Each Request
asks for the proof nodes we do not hold (a per-drive cache of verified
nodes, filled from the store once) against our head's length; the reply is
verified against the signed head of exactly that length, so adopting a
newer head meanwhile cannot make an honest reply look bad.  Verified blocks
are written by a worker thread, many per transaction; their waiters wake
once they are stored.  A NoData moves the want
to another peer; a peer that disconnects or stalls (in-flight requests and
nothing received for `STALL_TIMEOUT`) has its wants queued again for the
others.  Anything failing verification (a block, a proof, a head
signature) drops the peer, reports it, and bans its address and node key
for the session.  A fetch fails with BlockUnavailableError when no block
of it arrived for `timeout` seconds, or at once when no peer is left to
ask (every static peer banned).
"""

from __future__ import annotations

import sys
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import trio

from .. import crypto, index, tree
from ..drive import Drive
from ..errors import (
    BlockUnavailableError, ForkError, MissingBlock, NotFoundError, P2pfsError, VerificationError,
)
from ..store import Store
from ..types import Head
from ..wire import messages as m
from . import transport
from .peer import Inflight, Peer, PeerDropped, raise_single

PIPELINE = 128             # requests in flight per peer
READAHEAD_MIN = 8          # a fetch of this many contiguous blocks ...
READAHEAD_MAX = 256        # ... also queues twice as many following blocks (at most this many)
MAX_CACHED_NODES = 1 << 18   # tree nodes kept in memory per drive (an 8 GiB drive; ~40 MiB)
MAX_UNWRITTEN = 64 << 20     # verified block bytes waiting for the store before reads pause
POLL_INTERVAL = 0.15       # seconds between polls of the store's latest heads
STALL_TIMEOUT = 3.0        # a peer with requests out and silent this long is stalled
DEFAULT_TIMEOUT = 30.0
INDEX_REPLY_BUDGET = m.MAX_REPLY_DATA - (64 << 10)


def _stderr(text: str) -> None:
    print(f"p2pfs: {text}", file=sys.stderr, flush=True)


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

    __slots__ = ("wants", "queue", "last_progress", "ahead_start", "ahead_end", "window")

    def __init__(self):
        self.wants: dict[int, _Want] = {}
        self.queue: deque[int] = deque()
        self.last_progress = 0.0
        self.ahead_start = self.ahead_end = self.window = 0  # the read-ahead window


class _StoreReader:
    """index.BlockReader over raw stored blocks (serving: the receiver verifies)."""

    def __init__(self, store: Store, key: bytes, length: int):
        self.store, self.key, self.length = store, key, length

    def read_block(self, i: int) -> bytes:
        data = self.store.get_block(self.key, i) if 0 <= i < self.length else None
        if data is None:
            raise MissingBlock(i)
        return data


class Swarm:
    """A node's peers.  Use `open_swarm`; then `add_drive`, `add_peer`, `listen`."""

    def __init__(self, store: Store, node_key: bytes, *, serve_all: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, report: Callable[[str], None] = _stderr):
        self.store = store
        self.node_key = node_key
        self.node_public = crypto.x25519_public(node_key)
        self.serve_all = serve_all
        self.timeout = timeout
        self.report = report
        self.drives: dict[bytes, Drive] = {}
        self._dk: dict[bytes, bytes] = {}
        self._store_keys_checked = -1e9
        self.peers: list[Peer] = []
        self.status: dict[str, str] = {}        # static address -> what happened last
        self.banned_addresses: set[str] = set()
        self.banned_keys: set[bytes] = set()
        self._fetches: dict[bytes, _Fetches] = {}
        self._nodes: dict[bytes, dict[int, object]] = {}   # verified tree nodes, per drive
        self._nodes_complete: dict[bytes, bool] = {}        # ... and whether that is all we hold
        self._batch: dict[bytes, tuple[list, list]] = {}   # verified, not yet stored
        self._batch_bytes = 0
        self._writing_bytes = 0
        self._batch_event = trio.Event()
        self._room_event = trio.Event()
        self._dialers = 0
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._unsubscribe: dict[bytes, Callable[[], None]] = {}

    # --- registry ------------------------------------------------------------------

    def add_drive(self, drive: Drive) -> Drive:
        """Fetch/serve this Drive object (the one the caller reads through)."""
        old = self.drives.get(drive.key)
        if old is drive:
            return drive
        if old is not None:
            self._unsubscribe.pop(drive.key)()
        self.drives[drive.key] = drive
        self._dk[crypto.discovery_key(drive.key)] = drive.key
        self._unsubscribe[drive.key] = drive.subscribe(lambda head, d=drive: self._announce(d))
        for peer in self.peers:
            if peer.initiator and not peer.closed and peer.conn.can_send:
                peer.write(peer.conn.open_channel(drive.key))
        return drive

    def _drive(self, key: bytes) -> Drive | None:
        drive = self.drives.get(key)
        if drive is None and self.serve_all and self.store.get_drive(key) is not None:
            drive = self.add_drive(Drive(self.store, key))
        return drive

    def lookup_key(self, discovery_key: bytes) -> bytes | None:
        key = self._dk.get(discovery_key)
        if key is None and self.serve_all:
            now = trio.current_time()
            if now - self._store_keys_checked > 1.0:  # a drive created since: look again
                self._store_keys_checked = now
                for k, _record in self.store.list_drives():
                    self._dk.setdefault(crypto.discovery_key(k), k)
                key = self._dk.get(discovery_key)
        return key

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- lifecycle ---------------------------------------------------------------------

    async def _run_peer(self, peer: Peer) -> str:
        self.peers.append(peer)
        try:
            reason = await peer.run()
        finally:
            if peer in self.peers:
                self.peers.remove(peer)
            self._peer_gone(peer)
        return reason

    def add_peer(self, address: str) -> None:
        """Keep a connection to a static peer (reconnecting) for the swarm's life."""
        transport.parse_address(address)
        self.status.setdefault(address, "connecting")
        self._dialers += 1
        self._nursery.start_soon(self._dial_loop, address)

    async def _dial_loop(self, address: str) -> None:
        backoff = 0.05
        try:
            while address not in self.banned_addresses:
                try:
                    stream = await transport.dial(address)
                except (OSError, trio.TooSlowError) as exc:
                    why = ("timed out" if isinstance(exc, trio.TooSlowError)
                           else exc.strerror or str(exc))
                    self.status[address] = f"unreachable ({why})"
                    self._changed_now()
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.05
                self.status[address] = "connected"
                reason = await self._run_peer(Peer(self, stream, True, address))
                if address in self.banned_addresses:
                    break
                self.status[address] = reason
                self._changed_now()
                await trio.sleep(backoff)
        finally:
            self._dialers -= 1
            self.schedule()
            self._changed_now()

    async def listen(self, address: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept peers on 'HOST:PORT'; task_status gets the bound addresses."""
        listeners = await transport.listen(address)
        task_status.started([transport.listener_address(lst) for lst in listeners])
        await trio.serve_listeners(self._accepted, listeners)

    async def _accepted(self, stream: trio.SocketStream) -> None:
        transport._tune(stream)
        address = transport.peer_address(stream)
        reason = await self._run_peer(Peer(self, stream, False, address))
        if reason not in ("closed the connection",) and not reason.startswith("connection lost"):
            self.report(f"peer {address}: {reason}; disconnected")

    async def _poll_heads(self) -> None:
        while True:
            await trio.sleep(POLL_INTERVAL)
            for drive in list(self.drives.values()):
                try:
                    drive.reload_head()  # subscribers (we) announce it
                except VerificationError as exc:
                    self.report(str(exc))

    async def _watch_stalls(self) -> None:
        while True:
            await trio.sleep(0.25)
            now = trio.current_time()
            for peer in list(self.peers):
                if peer.paused:
                    peer.last_progress = now
                elif peer.inflight and not peer.stalled and now - peer.last_progress > STALL_TIMEOUT:
                    peer.stalled = True
                    for inf in peer.inflight.values():
                        self._requeue(peer, inf)
                    self.schedule()

    # --- events from peers ---------------------------------------------------------------

    def on_connected(self, peer: Peer) -> None:
        if peer.remote_key in self.banned_keys:
            raise PeerDropped("its node key was dropped earlier in this session")
        if peer.remote_key == self.node_public:
            raise PeerDropped("it is this node itself")
        if peer.initiator:
            for key in self.drives:
                peer.write(peer.conn.open_channel(key))
        self._changed_now()

    def on_channel_opened(self, peer: Peer, key: bytes) -> None:
        drive = self._drive(key)
        if drive is None:
            return
        ch = peer.conn.local_channel(key)
        if drive.head is not None:
            h = drive.head
            peer.write(peer.conn.send(m.Head(ch, h.length, h.root, h.signature)))
        self._send_have(peer, drive)
        self._changed_now()

    def _send_have(self, peer: Peer, drive: Drive) -> None:
        ch = peer.conn.local_channel(drive.key)
        ranges = drive.held_ranges()
        for i in range(0, max(len(ranges), 1), m.MAX_HAVE_RANGES):
            peer.write(peer.conn.send(m.Have(ch, ranges[i:i + m.MAX_HAVE_RANGES])))

    def on_channel_closed(self, peer: Peer, key: bytes, rejected: bool) -> None:
        for rid, inf in list(peer.inflight.items()):
            if inf.key == key:
                del peer.inflight[rid]
                self._requeue(peer, inf)
        if peer.initiator and peer.address in self.status:
            self.status[peer.address] = "does not have the drive" if rejected else "closed the drive"
        self.schedule()
        self._changed_now()

    def on_head(self, peer: Peer, key: bytes, head: Head) -> None:
        drive = self.drives.get(key)
        if drive is None:
            return
        try:
            drive.accept_head(head)
        except ForkError as exc:
            self.report(f"{exc} (announced by peer {peer.address})")
        except VerificationError as exc:
            self._ban(peer, f"sent a signed head that does not verify ({exc})")
        old = peer.heads.get(key)
        if old is None or head.length > old.length:
            peer.heads[key] = head
        self.schedule()
        self._changed_now()

    def on_have(self, peer: Peer, key: bytes) -> None:
        self.schedule()
        self._changed_now()

    def on_reply(self, peer: Peer, inf: Inflight, msg) -> None:
        peer.last_progress = trio.current_time()
        peer.stalled = False
        drive = self.drives.get(inf.key)
        if drive is None:
            return
        if isinstance(msg, m.Data):
            try:
                self._accept(peer, drive, msg.block, msg.data, msg.nodes, inf.length)
            except PeerDropped:
                self._requeue(peer, inf)
                raise
        elif isinstance(msg, m.IndexData):
            try:
                for item in msg.blocks:
                    self._accept(peer, drive, item.block, item.data, item.nodes, inf.length)
            finally:
                inf.done.set()
        else:  # NoData
            if inf.path is not None:
                inf.done.set()
            else:
                self._requeue(peer, inf)
        self.schedule()

    def after_input(self, peer: Peer) -> None:
        """Called after each chunk a peer sent has been handled."""
        if self._batch:
            self._batch_event.set()

    async def input_room(self) -> None:
        """Wait while too many verified blocks wait to be written."""
        while self._batch_bytes + self._writing_bytes > MAX_UNWRITTEN:
            # every peer's reader may wait here: share one event
            if self._room_event.is_set():
                self._room_event = trio.Event()
            await self._room_event.wait()

    async def _writer(self) -> None:
        """Store verified blocks in a worker thread (LMDB releases the GIL), a
        transaction per drive per round, then wake their waiters.  Blocks
        that arrive meanwhile gather into the next, larger, round."""
        while True:
            if not self._batch:
                self._batch_event = trio.Event()
                await self._batch_event.wait()
                continue
            batch, self._batch = self._batch, {}
            self._writing_bytes, self._batch_bytes = self._batch_bytes, 0
            try:
                await trio.to_thread.run_sync(self._write, batch)
            finally:
                self._writing_bytes = 0
                self._room_event.set()
            for key, (items, _nodes) in batch.items():
                drive = self.drives.get(key)
                if drive is not None:  # verified by _accept, now stored
                    drive.note_stored([block for block, _data in items])
                for block, _data in items:
                    self._done(key, block)
            self.schedule()

    def _write(self, batch: dict) -> None:
        for key, (items, nodes) in batch.items():
            self.store.put_block_items(key, items, nodes)

    def _peer_gone(self, peer: Peer) -> None:
        if self._batch:  # what it sent before it went is verified: keep it
            self._batch_event.set()
        for inf in peer.inflight.values():
            if inf.path is not None:
                inf.done.set()
            else:
                self._requeue(peer, inf)
        peer.inflight.clear()
        self.schedule()
        self._changed_now()

    def _ban(self, peer: Peer, reason: str) -> None:
        if peer.initiator:
            self.banned_addresses.add(peer.address)
            self.status[peer.address] = f"dropped: {reason}"
        if peer.remote_key is not None:
            self.banned_keys.add(peer.remote_key)
        self.report(f"peer {peer.address} {reason}; dropped it and will not ask it again")
        raise PeerDropped(reason)

    # --- verifying what arrives ---------------------------------------------------------

    def _accept(self, peer: Peer, drive: Drive, block: int, data: bytes, proof, length: int) -> None:
        key = drive.key
        try:
            nodes = drive.verify_received(block, data, proof, length, self._trusted_getter(key))
        except VerificationError as exc:
            self._ban(peer, f"sent block {block} of drive {drive.key_text} that fails verification ({exc})")
        if nodes is None:
            return  # we never held that version's head: cannot check, do not store
        self._remember(key, nodes)
        items, batch_nodes = self._batch.setdefault(key, ([], []))
        items.append((block, data))
        batch_nodes.extend(nodes)
        self._batch_bytes += len(data)
        peer.blocks_received += 1

    def _serving_getter(self, key: bytes):
        """Stored nodes for proofs: the cache, then the store (an owner's
        import in another process adds nodes the cache has not seen)."""
        cache = self._node_cache(key)
        store = self.store

        def get(n: int):
            node = cache.get(n)
            if node is None:
                node = store.get_node(key, n)
                if node is not None and len(cache) < MAX_CACHED_NODES:
                    cache[n] = node
            return node
        return get

    def _node_cache(self, key: bytes) -> dict:
        """Verified tree nodes of a drive: filled from the store by one cursor
        scan on first use (up to MAX_CACHED_NODES), then by what we verify."""
        cache = self._nodes.get(key)
        if cache is None:
            cache = self._nodes[key] = {}
            complete = True
            for node in self.store.iter_nodes(key):
                if len(cache) >= MAX_CACHED_NODES:
                    complete = False
                    break
                cache[node.index] = node
            self._nodes_complete[key] = complete
        return cache

    def _remember(self, key: bytes, nodes) -> None:
        cache = self._node_cache(key)
        for n in nodes:
            if len(cache) >= MAX_CACHED_NODES:
                self._nodes_complete[key] = False
                return
            cache[n.index] = n

    def _trusted_getter(self, key: bytes):
        """get(n) -> verified Node or None.  A dict lookup while the cache
        holds every node we have; else the store answers what it lacks."""
        cache = self._node_cache(key)
        if self._nodes_complete[key]:
            return cache.get
        store = self.store

        def get(n: int):
            node = cache.get(n)
            return node if node is not None else store.get_node(key, n)
        return get

    def _done(self, key: bytes, block: int) -> None:
        f = self._fetches.get(key)
        if f is None:
            return
        want = f.wants.pop(block, None)
        if want is not None:
            f.last_progress = trio.current_time()
            want.done.set()

    def _requeue(self, peer: Peer, inf: Inflight) -> None:
        if inf.path is not None:
            return
        f = self._fetches.get(inf.key)
        want = f.wants.get(inf.block) if f is not None else None
        if want is not None and not want.done.is_set():
            want.tried.add(peer)
            if inf.block not in f.queue:
                f.queue.appendleft(inf.block)

    # --- scheduling --------------------------------------------------------------------

    def schedule(self) -> None:
        """Hand queued wants to peers with free pipeline slots."""
        for key, f in self._fetches.items():
            if not f.queue:
                continue
            drive = self.drives.get(key)
            if drive is None or drive.head is None:
                continue
            peers = [p for p in self.peers if p.can_request(key) and not p.stalled]
            if not peers:
                if not self.peers and self._dialers == 0:
                    self._fail_all(f, "no peer is left to ask")
                continue
            deferred = []
            length = drive.head.length
            get_trusted = self._trusted_getter(key)
            while f.queue:
                free = [p for p in peers if len(p.inflight) < PIPELINE]
                if not free:
                    break
                block = f.queue.popleft()
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
                siblings, peaks = tree.proof_request(block, length, lambda n: get_trusted(n) is not None)
                peer.request_block(key, block, length, siblings, peaks)
            f.queue.extendleft(reversed(deferred))

    def _fail_all(self, f: _Fetches, why: str) -> None:
        for want in list(f.wants.values()):
            want.error = why
            want.done.set()
        f.wants.clear()
        f.queue.clear()

    def describe_peers(self) -> str:
        if not self.status:
            return "no peers given (use --peer HOST:PORT)"
        return "; ".join(f"{a}: {s}" for a, s in self.status.items())

    # --- BlockSource -------------------------------------------------------------------

    async def fetch(self, drive: Drive, blocks: list[int]) -> None:
        """Return once every listed block is stored (verified); else BlockUnavailableError."""
        self.add_drive(drive)
        f = self._fetches.setdefault(drive.key, _Fetches())
        wants = []
        for b in dict.fromkeys(blocks):
            if drive.has_block(b):
                continue
            want = f.wants.get(b)
            if want is None:
                want = f.wants[b] = _Want(b)
                f.queue.append(b)
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
                            f"{self.timeout:g} s ({self.describe_peers()})")
                    with trio.move_on_at(deadline):
                        await want.done.wait()
                if want.error:
                    raise BlockUnavailableError(
                        f"block {want.block} of drive {drive.key_text} is not available: "
                        f"{want.error} ({self.describe_peers()})")
        finally:
            for want in wants:
                want.waiters -= 1
                if want.waiters == 0 and not want.done.is_set():
                    f.wants.pop(want.block, None)
                    try:
                        f.queue.remove(want.block)
                    except ValueError:
                        pass

    def _readahead(self, drive: Drive, f: _Fetches, blocks: list[int]) -> None:
        """Sequential reads get read-ahead, so that the pipelines (several
        peers') do not drain between reads: a contiguous fetch of at least
        READAHEAD_MIN blocks queues twice as many after it, unwaited; a fetch
        inside the last read-ahead window doubles the window (up to
        READAHEAD_MAX) and moves it past this fetch."""
        n = len(blocks)
        if not n or blocks[-1] - blocks[0] != n - 1 or drive.head is None:
            return
        if f.ahead_start <= blocks[0] < f.ahead_end:
            window = min(READAHEAD_MAX, max(f.window * 2, 2 * n))
        elif n >= READAHEAD_MIN:
            window = min(READAHEAD_MAX, 2 * n)
        else:
            return
        start = blocks[-1] + 1
        end = min(start + window, drive.head.length)
        f.ahead_start, f.ahead_end, f.window = blocks[0], end, window
        for b in range(start, end):
            if b not in f.wants and not drive.has_block(b):
                f.wants[b] = _Want(b)
                f.queue.append(b)

    async def fetch_path(self, drive: Drive, path: bytes) -> None:
        """Best effort: every index block on `path` from one peer, one round trip."""
        self.add_drive(drive)
        if drive.head is None:
            return
        peers = [p for p in self.peers if p.can_request(drive.key) and not p.stalled
                 and p.has(drive.key, drive.head.length - 1)]
        if not peers:
            return
        peer = min(peers, key=lambda p: len(p.inflight))
        inf = peer.request_path(drive.key, path, drive.head.length)
        with trio.move_on_after(min(self.timeout, STALL_TIMEOUT)):
            await inf.done.wait()

    async def wait_for_peers(self, drive: Drive, timeout: float) -> None:
        """Until every static peer has announced the drive, refused it or failed
        (or `timeout` passes).  A peer whose connection ended is redialled, so
        it is still waited for; an unreachable one is not."""
        self.add_drive(drive)
        with trio.move_on_after(timeout):
            while True:
                pending = [a for a, s in self.status.items()
                           if (s in ("connecting", "connected", "closed the connection")
                               or s.startswith("connection lost"))
                           and not any(p.address == a and drive.key in p.announced for p in self.peers)]
                if not pending:
                    return
                await self._changed.wait()

    def peer_info(self, key: bytes) -> list[dict]:
        out = []
        for p in self.peers:
            if not p.connected.is_set():
                continue
            head = p.heads.get(key)
            ranges = p.haves.get(key, [])
            out.append({
                "address": p.address,
                "node_key": p.remote_key.hex() if p.remote_key else None,
                "dialled": p.initiator,
                "length": head.length if head else None,
                "blocks": sum(b - a for a, b in ranges),
                "ranges": [list(r) for r in ranges[:16]],
                "blocks_received": p.blocks_received,
            })
        return out

    # --- serving ---------------------------------------------------------------------

    def _announce(self, drive: Drive) -> None:
        head = drive.head
        if head is None:
            return
        for peer in self.peers:
            if not peer.closed and peer.conn.can_send and peer.conn.is_open(drive.key):
                ch = peer.conn.local_channel(drive.key)
                peer.write(peer.conn.send(m.Head(ch, head.length, head.root, head.signature)))
                self._send_have(peer, drive)
        self.schedule()
        self._changed_now()

    def answer(self, peer: Peer, key: bytes, msg) -> m.Message:
        """The reply to a peer's request (Data, IndexData or NoData); never raises
        for a request we cannot serve."""
        ch = peer.conn.local_channel(key)
        ch = 0 if ch is None else ch
        drive = self.drives.get(key)
        head = drive.head if drive is not None else None
        if head is None or msg.length > head.length:
            return m.NoData(ch, msg.id)
        try:
            if isinstance(msg, m.Request):
                data = self.store.get_block(key, msg.block)
                if data is None or len(data) > m.MAX_BLOCK_DATA:
                    return m.NoData(ch, msg.id)
                proof = tree.make_proof(msg.block, msg.length, msg.siblings, msg.peaks,
                                        self._serving_getter(key))
                return m.Data(ch, msg.id, msg.block, data, proof)
            return self._answer_path(drive, ch, msg)
        except (LookupError, MissingBlock, P2pfsError):
            return m.NoData(ch, msg.id)

    def _answer_path(self, drive: Drive, ch: int, msg: m.IndexRequest) -> m.Message:
        key, length = drive.key, msg.length
        reader = _StoreReader(self.store, key, length)
        commit = index.decode_block(reader.read_block(length - 1))
        if not isinstance(commit, index.Commit):
            return m.NoData(ch, msg.id)
        blocks = [0, length - 1] + index.Index(reader, commit.root).path_blocks(msg.path)
        items, total = [], 0
        for b in dict.fromkeys(blocks):
            data = reader.read_block(b)
            total += len(data)
            if total > INDEX_REPLY_BUDGET or len(items) == m.MAX_INDEX_BLOCKS:
                break
            items.append(m.BlockItem(b, data, tree.make_proof(b, length, 64, True, self._serving_getter(key))))
        return m.IndexData(ch, msg.id, items)


@asynccontextmanager
async def open_swarm(store: Store, node_key: bytes, **kwargs) -> AsyncIterator[Swarm]:
    """A running swarm; every connection and task ends when the block exits."""
    swarm = Swarm(store, node_key, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            swarm._nursery = nursery
            nursery.start_soon(swarm._poll_heads)
            nursery.start_soon(swarm._watch_stalls)
            nursery.start_soon(swarm._writer)
            try:
                yield swarm
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's error (say BlockUnavailableError) comes out of the
        # nursery wrapped in a group: give it back as itself.
        raise_single(group)


def unavailable(drive_text: str, swarm: Swarm, timeout: float, waited: float) -> P2pfsError:
    """The error for a drive no peer sent a signed head of, after `waited` seconds."""
    if swarm.status and all(s == "does not have the drive" for s in swarm.status.values()):
        return NotFoundError(f"no peer has drive {drive_text} ({swarm.describe_peers()})")
    when = f" within {timeout:g} s" if waited >= timeout else ""
    return BlockUnavailableError(f"no peer sent a signed version of drive {drive_text}{when} "
                                 f"({swarm.describe_peers()})")
