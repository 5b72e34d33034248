"""The swarm: a node's drives, heads and peers, composed from one module per concern.

Theory of operation
-------------------
The swarm owns the drive registry and the signed heads; it is the `PeerHost`
every `Peer` reports to and passes each report to the part that deals with
it: `connections.Connections` (dialling, accepting, dedupe, caps, bans),
`fetcher.Fetcher` (the drives' BlockSource: wants, scheduling, verifying,
storing), `serving.Server` (answers).

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
drive) and the peer stays, an older head changes nothing.  A Head we hold
already is recognised by its bytes, before any signature check.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import trio

from .. import crypto
from ..drive import Drive
from ..errors import BlockUnavailableError, ForkError, NotFoundError, P2pfsError, VerificationError
from ..store import Store
from ..types import Head
from ..wire import messages as m
from . import transport
from .connections import Connections
from .discovery import Candidate, Source
from .discovery.static import StaticSource
from .fetcher import DEFAULT_TIMEOUT, STALL_TIMEOUT, Fetcher, NodeCaches
from .peer import Inflight, Peer, PeerDropped, raise_single
from .serving import Server

POLL_INTERVAL = 0.15       # seconds between polls of the store's latest heads
DISCOVERY_GRACE = 1.0      # s a reader holding a drive looks for a newer version before going on
HEAD_LOOKUP_EVERY = 300.0  # s between looking up a drive's newest head in the DHT
HEAD_RETRY_FIRST = 2.0     # s before a failed head lookup or put is tried again (doubling)


def _stderr(text: str) -> None:
    print(f"p2pfs: {text}", file=sys.stderr, flush=True)


class Swarm:
    """A node's peers.  Use `open_swarm`; then `add_drive`, `add_peer`, `listen`."""

    def __init__(self, store: Store, node_key: bytes, *, serve_all: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, report: Callable[[str], None] = _stderr,
                 max_connections: int | None = None):
        self.store = store
        self.node_key = node_key
        self.node_public = crypto.x25519_public(node_key)
        self.serve_all = serve_all
        self.timeout = timeout
        self.report = report
        self.drives: dict[bytes, Drive] = {}
        self._dk: dict[bytes, bytes] = {}
        self._store_keys_checked = -1e9
        self._unsubscribe: dict[bytes, Callable[[], None]] = {}
        self.nodes = NodeCaches(store)
        self.connections = Connections(self, report=report, max_connections=max_connections,
                                       topic_peers=self._topic_peers)
        self.fetcher = Fetcher(store, self.nodes, timeout=timeout, peers=self._peers,
                               drive=self.drives.get, more_peers_coming=self._more_peers_coming,
                               describe=self.describe_peers)
        self.server = Server(store, self.nodes, self.drives.get)
        self.static = StaticSource()
        self.sources: list[Source] = []
        self.port: int | None = None  # the TCP port we accept peers on, once listening
        self._hints: dict[bytes, tuple[bytes, int]] = {}   # drive key -> (path, content bytes)
        self._hinted: dict[bytes, list[Inflight]] = {}     # ... the first-flight requests sent
        self._put_heads = trio.Event()  # a head (or its DHT signature) to put in the DHT
        self._nursery: trio.Nursery | None = None

    # --- registry ------------------------------------------------------------------

    @property
    def peers(self) -> list[Peer]:
        return self.connections.peers

    def _peers(self) -> list[Peer]:
        return self.connections.peers

    @property
    def status(self) -> dict[str, str]:
        return self.connections.status()

    def add_drive(self, drive: Drive) -> Drive:
        """Fetch/serve this Drive object (the one the caller reads through)."""
        old = self.drives.get(drive.key)
        if old is drive:
            return drive
        if old is not None:
            self._unsubscribe.pop(drive.key)()
        self.drives[drive.key] = drive
        self._put_heads.set()
        dk = crypto.discovery_key(drive.key)
        self._dk[dk] = drive.key
        for source in self.sources:
            source.join(dk, announce=self.port is not None)
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

    def _topic_peers(self, discovery_key: bytes) -> int:
        key = self._dk.get(discovery_key)
        if key is None:
            return 0
        return sum(1 for p in self.peers if not p.closed and p.conn.is_open(key))

    def _more_peers_coming(self) -> bool:
        return self.connections.dialing or any(src.active for src in self.sources)

    # --- peers -------------------------------------------------------------------

    def add_peer(self, address: str) -> None:
        """Keep a connection to a static peer (reconnecting) for the swarm's life."""
        self.static.add(address)

    async def add_source(self, source: Source) -> None:
        """Feed a discovery source's candidates to the connections from now on."""
        self.sources.append(source)
        source.set_port(self.port)
        for dk in self._dk:
            if dk in self._wanted_topics():
                source.join(dk, announce=self.port is not None)
        await self._nursery.start(source.run, self._candidate)
        if hasattr(source, "get_head"):
            self._nursery.start_soon(self._dht_heads, source)

    def _wanted_topics(self) -> set[bytes]:
        return {crypto.discovery_key(k) for k in self.drives}

    def _candidate(self, discovery_key: bytes | None, candidate: Candidate) -> None:
        if candidate.source == "static":
            self.connections.add_static(candidate.address)
        elif discovery_key is not None:
            self.connections.add_candidate(discovery_key, candidate)

    async def listen(self, address: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept peers on 'HOST:PORT'; task_status gets the bound addresses.
        Discovery sources then announce the swarm's drives with that port."""
        listeners = await transport.listen(address)
        addresses = [transport.listener_address(lst) for lst in listeners]
        if self.port is None and addresses:
            self.port = int(addresses[0].rpartition(":")[2])
            for source in self.sources:
                source.set_port(self.port)
                for dk in self._wanted_topics():
                    source.join(dk, announce=True)
        task_status.started(addresses)
        await self.connections.serve(listeners)

    async def _poll_heads(self) -> None:
        while True:
            await trio.sleep(POLL_INTERVAL)
            for drive in list(self.drives.values()):
                try:
                    drive.reload_head()  # subscribers (we) announce it
                except VerificationError as exc:
                    self.report(str(exc))

    # --- PeerHost ------------------------------------------------------------------

    def hint(self, drive: Drive, path: bytes, content_bytes: int = 0) -> None:
        """Ask every peer we dial from now on, in the first flight (with the
        channel's Open, before any reply), for the index path of `path` in
        its newest version and the first `content_bytes` of it: a cold small
        read then costs no further round trip."""
        self.add_drive(drive)
        self._hints[drive.key] = (path, content_bytes)

    def on_connected(self, peer: Peer) -> None:
        self.connections.admit(peer, self.node_public)
        if peer.initiator and not peer.closed:
            for key in self.drives:
                peer.write(peer.conn.open_channel(key))
                hint = self._hints.get(key)
                if hint is not None:
                    self._hinted.setdefault(key, []).append(peer.request_path(key, hint[0], 0, hint[1]))
        self.connections.changed()

    def on_channel_opened(self, peer: Peer, key: bytes) -> None:
        drive = self._drive(key)
        if drive is None:
            return
        self._send_heads(peer, drive)
        self.connections.changed()

    def _head_message(self, channel: int, drive: Drive, h: Head) -> m.Head:
        """A Head, with the owner's DHT signature of it when we hold one."""
        return m.Head(channel, h.length, h.root, h.signature, self.store.dht_signature(drive.key, h.length))

    def _send_heads(self, peer: Peer, drive: Drive) -> None:
        """The newest Head, the Head of the newest version held completely when
        that is another (what a relay can prove when the newest is not held),
        then the Have."""
        ch = peer.conn.local_channel(drive.key)
        ranges = drive.held_ranges()
        full = drive.complete_head(ranges)
        for h in dict.fromkeys(h for h in (drive.head, full) if h is not None):
            peer.write(peer.conn.send(self._head_message(ch, drive, h)))
        for i in range(0, max(len(ranges), 1), m.MAX_HAVE_RANGES):
            peer.write(peer.conn.send(m.Have(ch, ranges[i:i + m.MAX_HAVE_RANGES])))

    def on_channel_closed(self, peer: Peer, key: bytes, rejected: bool) -> None:
        self.fetcher.channel_closed(peer, key)
        target = self.connections.targets.get(peer.address) if peer.initiator else None
        if target is not None and target.static:
            target.status = "does not have the drive" if rejected else "closed the drive"
        self.connections.changed()

    def on_head(self, peer: Peer, key: bytes, head: Head, dht_signature: bytes = b"") -> None:
        drive = self.drives.get(key)
        if drive is None:
            return
        if drive.head != head:  # the head we hold is not checked again
            try:
                drive.accept_head(head)
            except ForkError as exc:
                self.report(f"{exc} (announced by peer {peer.address})")
            except VerificationError as exc:
                raise PeerDropped(f"sent a signed head that does not verify ({exc})") from None
        if dht_signature and drive.accept_dht_signature(head, dht_signature):
            self._put_heads.set()
        old = peer.heads.get(key)
        if old is None or head.length >= old.length:
            peer.heads[key] = head
        self.fetcher.schedule()
        self.connections.changed()

    def on_have(self, peer: Peer, key: bytes) -> None:
        self.fetcher.schedule()
        self.connections.changed()

    def on_reply(self, peer: Peer, inf: Inflight, msg, leaves=None) -> None:
        self.fetcher.on_reply(peer, inf, msg, leaves)

    def after_input(self, peer: Peer) -> None:
        self.fetcher.after_input()

    async def input_room(self) -> None:
        await self.fetcher.input_room()

    def output_changed(self, delta: int) -> None:
        self.connections.output_changed(delta)

    async def output_room(self, peer: Peer) -> None:
        await self.connections.output_room(peer)

    def answer(self, peer: Peer, key: bytes, msg, send) -> None:
        ch = peer.conn.local_channel(key)
        self.server.respond(0 if ch is None else ch, key, msg, send)

    def peer_gone(self, peer: Peer) -> None:
        self.fetcher.peer_gone(peer)

    def schedule(self) -> None:
        self.fetcher.schedule()

    # --- announcing ----------------------------------------------------------------

    async def _dht_heads(self, source) -> None:
        """The drives' heads and the DHT (a HeadSource): put every head we hold
        with its owner's DHT signature (once per length once some node took
        it; the source puts it again while it lives), and look up the newest
        head of every drive we do not own: at once, again after 2, 4, 8 ...
        s while none is found, then every HEAD_LOOKUP_EVERY s (a reader
        learns a new version before any peer tells it)."""
        put: dict[bytes, int] = {}           # drive -> length some DHT node took
        next_put: dict[bytes, tuple[float, float]] = {}   # drive -> (when, backoff)
        next_get: dict[bytes, tuple[float, float]] = {}
        busy: set[tuple[str, bytes]] = set()

        async def do_put(drive: Drive, head: Head, sig: bytes) -> None:
            try:
                took = await source.put_head(drive.key, head.length, head.root, head.signature, sig)
            except (P2pfsError, OSError) as exc:
                self.report(f"could not put the head of drive {drive.key_text} in the DHT: {exc}")
                took = 0
            finally:
                busy.discard(("put", drive.key))
            when, backoff = next_put.get(drive.key, (0.0, HEAD_RETRY_FIRST))
            if took:
                put[drive.key] = max(put.get(drive.key, -1), head.length)
                next_put.pop(drive.key, None)
            else:
                next_put[drive.key] = (trio.current_time() + backoff, min(2 * backoff, HEAD_LOOKUP_EVERY))
            self._put_heads.set()

        async def do_get(drive: Drive) -> None:
            found = None
            try:
                found = await source.get_head(drive.key)
            except P2pfsError:
                pass
            finally:
                busy.discard(("get", drive.key))
                self._put_heads.set()  # the loop sleeps until the next lookup is due
            _when, backoff = next_get.get(drive.key, (0.0, HEAD_RETRY_FIRST))
            if found is None:
                next_get[drive.key] = (trio.current_time() + backoff, min(2 * backoff, HEAD_LOOKUP_EVERY))
                return
            next_get[drive.key] = (trio.current_time() + HEAD_LOOKUP_EVERY, HEAD_RETRY_FIRST)
            length, root, signature, dht_signature = found
            head = Head(length, root, signature)
            try:
                if drive.head is None or head.length > drive.head.length:
                    drive.accept_head(head)
                drive.accept_dht_signature(head, dht_signature)
            except VerificationError as exc:
                self.report(f"a head of drive {drive.key_text} in the DHT: {exc}")
            self.connections.changed()

        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                wake = now + HEAD_LOOKUP_EVERY
                for key, drive in list(self.drives.items()):
                    head = drive.head
                    if head is not None and put.get(key, -1) < head.length and ("put", key) not in busy:
                        when = next_put.get(key, (now, 0.0))[0]
                        sig = self.store.dht_signature(key, head.length)
                        if sig and when <= now:
                            busy.add(("put", key))
                            nursery.start_soon(do_put, drive, head, sig)
                        elif sig:
                            wake = min(wake, when)
                    if not drive.writable and ("get", key) not in busy:
                        when = next_get.get(key, (now, 0.0))[0]
                        if when <= now:
                            busy.add(("get", key))
                            nursery.start_soon(do_get, drive)
                        else:
                            wake = min(wake, when)
                self._put_heads = trio.Event()
                with trio.move_on_at(wake):
                    await self._put_heads.wait()

    def _announce(self, drive: Drive) -> None:
        self._put_heads.set()
        head = drive.head
        if head is None:
            return
        for peer in self.peers:
            if not peer.closed and peer.conn.can_send and peer.conn.is_open(drive.key):
                self._send_heads(peer, drive)
        self.fetcher.schedule()
        self.connections.changed()

    # --- BlockSource -------------------------------------------------------------------

    async def fetch(self, drive: Drive, blocks: list[int]) -> None:
        """Return once every listed block is stored (verified); else BlockUnavailableError."""
        self.add_drive(drive)
        await self.fetcher.fetch(drive, blocks)

    async def drain(self, drive: Drive | None = None) -> None:
        """Return once every block verified so far (of `drive`; None: of
        every drive) is stored (bounded)."""
        await self.fetcher.drain(None if drive is None else drive.key)

    async def fetch_verified(self, drive: Drive, blocks: list[int]) -> dict[int, bytes]:
        """Return once every listed block is stored or verified, with the bytes
        of those not yet stored; else BlockUnavailableError."""
        self.add_drive(drive)
        return await self.fetcher.fetch_verified(drive, blocks)

    async def fetch_path(self, drive: Drive, path: bytes) -> None:
        """Best effort: every index block on `path` from one peer, one round trip
        (none if a first-flight request for that path is answered or in flight)."""
        self.add_drive(drive)
        hinted = self._hinted.get(drive.key, [])
        if any(inf.done.is_set() for inf in hinted):
            return  # a first-flight answer holds the header, the commit and the index root
        hinted = [inf for inf in hinted if inf.path == path]
        if hinted:
            with trio.move_on_after(min(self.timeout, STALL_TIMEOUT)):
                await hinted[0].done.wait()  # answered (or refused: NoData) by its peer
            return
        await self.fetcher.fetch_path(drive, path)

    def reading(self, drive: Drive, blocks: list[int]) -> None:
        self.fetcher.reading(drive, blocks)

    def announced(self, drive: Drive, block: int) -> bool:
        """Whether a connected peer announced holding `block` (Drive.open
        passes over signed versions whose commit nobody can send)."""
        return any(p.has(drive.key, block) for p in self.peers)

    # --- waiting and reporting -----------------------------------------------------------

    def describe_peers(self) -> str:
        status = self.status
        parts = [f"{a}: {s}" for a, s in status.items()]
        if self.sources:
            found = sum(1 for p in self.peers if p.source not in ("static", "incoming"))
            names = " and ".join(f"the {src.name.upper()}" for src in self.sources)
            parts.append(f"looked up on {names}, {found} peer{'s' if found != 1 else ''} found")
        if not parts:
            return "no peers given (use --peer HOST:PORT)"
        return "; ".join(parts)

    async def wait_for_peers(self, drive: Drive, timeout: float,
                             grace: float = DISCOVERY_GRACE) -> None:
        """Until every static peer has announced the drive, refused it or failed
        (a peer whose connection ended is redialled, so it is still waited
        for; an unreachable one is not) and, with discovery and no static
        peer, until a peer announced the drive (or, if this home could read a
        version of it already, `grace` seconds passed) — at most `timeout`
        seconds.  A head heard from the DHT meanwhile is not a readable
        version: its blocks are at the peers still to be found."""
        self.add_drive(drive)
        started = trio.current_time()
        readable_here = drive.head is not None and drive.store.has_block(drive.key, drive.head.length - 1)
        with trio.move_on_after(timeout):
            while True:
                status = self.status
                pending = [a for a, s in status.items()
                           if (s in ("connecting", "connected", "closed the connection")
                               or s.startswith("connection lost"))
                           and not any(p.address == a and drive.key in p.announced for p in self.peers)]
                if not pending:
                    if status or not self._more_peers_coming():
                        return
                    if any(drive.key in p.announced for p in self.peers):
                        return
                    waited = trio.current_time() - started
                    if readable_here and waited >= grace:
                        return
                    with trio.move_on_after(max(0.0, grace - waited) if readable_here
                                            else float("inf")):
                        await self.connections.wait_changed()
                    continue
                await self.connections.wait_changed()

    def discovery_info(self) -> dict:
        """Each discovery source's state (for `p2pfs info`)."""
        return {src.name: src.status() for src in self.sources}

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
                "source": p.source,
                "length": head.length if head else None,
                "blocks": sum(b - a for a, b in ranges),
                "ranges": [list(r) for r in ranges[:16]],
                "blocks_received": p.blocks_received,
                "open": p.conn.is_open(key),
                "blocks_sent": p.blocks_sent,
                "bytes_sent": p.bytes_sent,
                "bytes_received": p.bytes_received,
            })
        return out


@asynccontextmanager
async def open_swarm(store: Store, node_key: bytes, **kwargs) -> AsyncIterator[Swarm]:
    """A running swarm; every connection and task ends when the block exits."""
    swarm = Swarm(store, node_key, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            swarm._nursery = nursery
            await nursery.start(swarm.connections.run)
            swarm.static.start(swarm._candidate)
            nursery.start_soon(swarm._poll_heads)
            nursery.start_soon(swarm.fetcher.watch)
            nursery.start_soon(swarm.fetcher.writer)
            try:
                yield swarm
            finally:
                with trio.CancelScope(shield=True):
                    await swarm.fetcher.drain()  # what reads took from memory is stored
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's error (say BlockUnavailableError) comes out of the
        # nursery wrapped in a group: give it back as itself.
        raise_single(group)


def unavailable(drive_text: str, swarm: Swarm, timeout: float, waited: float) -> P2pfsError:
    """The error for a drive no peer sent a signed head of, after `waited` seconds."""
    status = swarm.status
    if status and all(s == "does not have the drive" for s in status.values()):
        return NotFoundError(f"no peer has drive {drive_text} ({swarm.describe_peers()})")
    when = f" within {timeout:g} s" if waited >= timeout else ""
    hint = "" if status else "; give --peer HOST:PORT to name a peer that has it"
    return BlockUnavailableError(f"no peer sent a signed version of drive {drive_text}{when} "
                                 f"({swarm.describe_peers()}){hint}")
