"""Connections: dialling, accepting, deduplicating, bounding and banning peers.

Theory of operation
-------------------
*Targets.*  Every address we may dial is a `_Target`: static ones (`--peer`)
are dialled for the swarm's whole life and redialled with a short backoff
whenever their connection ends; discovered ones (`add_candidate`, fed by the
discovery sources) are dialled only while a topic they were found for has
fewer than `MAX_PEERS_PER_TOPIC` peers, with an exponential backoff after
each failure, and forgotten after `MAX_FAILURES` failures in a row.  A
target known to belong to a node we are already connected to (its node
key, from the LAN or an earlier connection) is not dialled.

*Accepting.*  `listen` runs our own accept loop: a descriptor shortage
(EMFILE, ENFILE, ENOBUFS, ENOMEM) is reported once per `SHORTAGE_REPORT`
seconds and waited out, never a traceback.  The number of connections is
capped (`max_connections`, below the process's descriptor limit) in all
and per remote IP.  The caps count descriptors: an accepted connection is
counted from its accept (before its task runs), and one that ended counts
until its socket is closed (it may spend a second sending its refusal).
When a cap is reached, such an ending connection is cut short first, else
the idlest connection (no Noise handshake yet, else no channel open, else
one that reads nothing we send, else the least recently active one with
nothing in flight) is closed to make room, and if none is idle the
newcomer is refused.

*Deduplication.*  Two nodes dialling each other end with one connection:
when a handshake completes with a node key we already have a connection
to, both sides keep the connection dialled by the node with the smaller
node public key (or, if the same side dialled both, the older one), and
close the other without fault.

*Bans.*  A peer at fault (broke the protocol, sent data failing
verification, flooded us) is reported and its node key refused for
`BAN_SECONDS`; a dialled one's address is not dialled again for that long
either (static addresses for the whole session, as `man p2pfs-protocol`
says).

*Costs.*  The janitor closes peers without a channel `IDLE_TIMEOUT`
seconds after their handshake, and peers whose socket has taken no bytes
for `WRITE_STALL` seconds while we had output for them (a peer that does
not read).  The bytes queued for all peers together are bounded by
`MAX_OUTPUT`: while it is exceeded, the server of a peer with more than
`OUTPUT_FAIR` bytes of its own queued waits in `output_room` (every peer
goes on with a little), and the janitor closes the peers blocked longest,
for a second or more, until half the budget is free.  Every `TRIM_EVERY` seconds, with
little output queued, free memory goes back to the system (`heap.trim`).
"""

from __future__ import annotations

import errno
import gc
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .. import heap
from .discovery import Candidate
from .peer import Peer, PeerEnd
from . import transport

MAX_CONNECTIONS = 512
RESERVED_FDS = 64          # descriptors left for the store, logs and the FUSE device
MAX_PER_IP = 16            # incoming connections from one IP address
MAX_PEERS_PER_TOPIC = 32   # discovered peers dialled per drive
MAX_DIALS = 8              # dials in progress at once (discovered targets)
MAX_TARGETS = 4096         # discovered addresses remembered
MAX_FAILURES = 6
IDLE_TIMEOUT = 20.0        # s after the handshake a peer may go without opening a channel
WRITE_STALL = 10.0         # s a peer's socket may take no bytes while we have output for it
MAX_OUTPUT = 32 << 20      # bytes queued for all peers together
OUTPUT_FAIR = 256 << 10    # ... beyond which a peer with less queued than this still may send
TRIM_EVERY = 5.0           # s between returning free memory to the system
BAN_SECONDS = 600.0
SHORTAGE_REPORT = 10.0
REPORT_EVERY = 10.0        # s between two lines about peers dropped for the same reason
_SHORTAGE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def _stderr(text: str) -> None:
    print(f"p2pfs: {text}", file=sys.stderr, flush=True)


def default_max_connections() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, soft - RESERVED_FDS))


@dataclass
class _Target:
    address: str
    static: bool = False
    sources: set[str] = field(default_factory=set)
    topics: set[bytes] = field(default_factory=set)
    node_key: bytes | None = None
    failures: int = 0
    next_try: float = 0.0
    dialing: bool = False
    peer: Peer | None = None
    status: str = "connecting"


class Connections:
    """Every peer connection of a swarm.  `host` is what each Peer reports to
    (the swarm); `on_end(peer, end)` is called when a peer's connection ends."""

    def __init__(self, host, *, report: Callable[[str], None] = _stderr,
                 max_connections: int | None = None,
                 topic_peers: Callable[[bytes], int] | None = None):
        self.host = host
        self.report = report
        self.max_connections = max_connections or default_max_connections()
        self.topic_peers = topic_peers or (lambda dk: 0)
        self.peers: list[Peer] = []
        self.by_key: dict[bytes, Peer] = {}
        self.targets: dict[str, _Target] = {}
        self.banned_addresses: set[str] = set()
        self.banned_keys: dict[bytes, float] = {}
        self.output = 0
        self._output_room = trio.Event()
        self._dialers = 0
        self._dials = 0
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._last_shortage = -1e9
        self._ended_since_trim = 0
        self._reported: dict[str, tuple[float, int]] = {}  # kind of trouble -> (last line, left out)
        self.shortages = 0
        self.refused = 0
        self.evicted = 0
        self._nursery: trio.Nursery | None = None

    # --- state for others ------------------------------------------------------------

    @property
    def dialing(self) -> bool:
        """Whether some static peer is still being dialled (or redialled)."""
        return self._dialers > 0

    def changed(self) -> None:
        """Wake whoever waits for the set of peers or their state to change."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def status(self) -> dict[str, str]:
        """Static address -> what happened to it last."""
        return {a: t.status for a, t in self.targets.items() if t.static}

    # --- output budget ---------------------------------------------------------------

    def output_changed(self, delta: int) -> None:
        self.output += delta
        if delta < 0:
            self._output_room.set()  # waiters look again

    async def output_room(self, peer: Peer) -> None:
        """Wait while the output budget is spent and `peer` has more than its
        fair `OUTPUT_FAIR` bytes queued: every peer goes on with a little,
        while the janitor closes those that read nothing."""
        while self.output > MAX_OUTPUT and peer.queued_output > OUTPUT_FAIR and not peer.closed:
            if self._output_room.is_set():
                self._output_room = trio.Event()
            await self._output_room.wait()

    # --- running peers -----------------------------------------------------------------

    async def run_peer(self, peer: Peer, registered: bool = False) -> PeerEnd:
        """Run a peer to its end; `registered`: the caller put it in `peers`
        already (the accept loop does, so the next accept counts it)."""
        if not registered:
            self.peers.append(peer)
        try:
            end = await peer.run()
        finally:
            if peer in self.peers:
                self.peers.remove(peer)
            if peer.remote_key is not None and self.by_key.get(peer.remote_key) is peer:
                del self.by_key[peer.remote_key]
            self._ended_since_trim += 1
            self.host.peer_gone(peer)
            self.changed()
        if end.fault:
            self._ban(peer, end.reason)
        return end

    def attach(self, stream: trio.abc.Stream, *, initiator: bool, address: str) -> None:
        """Run a peer over a stream connected some other way (tests: memory
        streams).  A dialled one counts as a static peer while it runs."""
        target = None
        if initiator:
            target = self.targets.setdefault(address, _Target(address, static=True))
            target.status = "connected"

        async def run() -> None:
            end = await self.run_peer(Peer(self.host, stream, initiator, address))
            if target is not None:
                target.status = end.reason
        self._nursery.start_soon(run)

    def admit(self, peer: Peer, own_public: bytes) -> None:
        """A handshake completed: refuse banned keys and ourselves, deduplicate."""
        key = peer.remote_key
        until = self.banned_keys.get(key)
        if until is not None:
            if trio.current_time() < until:
                peer.drop("its node key was dropped earlier", fault=False)
                return
            del self.banned_keys[key]
        if key == own_public:
            self._forget_self(peer)
            peer.drop("it is this node itself", fault=False)
            return
        other = self.by_key.get(key)
        if other is not None and not other.closed:
            def dialler(p: Peer) -> bytes:
                return own_public if p.initiator else key
            keep = min((other, peer), key=lambda p: (dialler(p), p.started))
            loser = peer if keep is other else other
            if loser is other:
                self.by_key[key] = peer
            loser.drop("a second connection to the same node", fault=False)
            target = self.targets.get(loser.address) if loser.initiator else None
            if target is not None:
                target.node_key = key
            return
        self.by_key[key] = peer
        if peer.initiator:
            target = self.targets.get(peer.address)
            if target is not None:
                target.node_key = key

    def _forget_self(self, peer: Peer) -> None:
        if peer.initiator:
            target = self.targets.get(peer.address)
            if target is not None and not target.static:
                target.failures = MAX_FAILURES  # never again

    def _ban(self, peer: Peer, reason: str) -> None:
        if peer.remote_key is not None:
            self.banned_keys[peer.remote_key] = trio.current_time() + BAN_SECONDS
        if peer.initiator:
            self.banned_addresses.add(peer.address)
            target = self.targets.get(peer.address)
            if target is not None:
                target.status = f"dropped: {reason}"
                target.next_try = trio.current_time() + BAN_SECONDS
        if peer.initiator:
            self._report_limited(reason, f"peer {peer.address} {reason}; dropped it and will not ask it again")
        else:
            self._report_limited(reason, f"peer {peer.address} {reason}; disconnected it")

    def _report_limited(self, kind: str, line: str) -> None:
        """Report, but at most one line per kind of trouble per REPORT_EVERY
        seconds (a flood of attackers is one line, with a count)."""
        now = trio.current_time()
        last, suppressed = self._reported.get(kind, (-1e9, 0))
        if now - last < REPORT_EVERY:
            self._reported[kind] = (last, suppressed + 1)
            return
        if suppressed:
            line += f" ({suppressed} more peers like it in the last {now - last:.0f} s)"
        self._reported[kind] = (now, 0)
        if len(self._reported) > 256:
            self._reported.clear()
        self.report(line)

    def ban_now(self, peer: Peer, reason: str) -> None:
        """Drop a peer at fault at once (the ban follows when its tasks end)."""
        peer.drop(reason, fault=True)

    # --- dialling ------------------------------------------------------------------------

    def add_static(self, address: str) -> None:
        """Keep a connection to a static peer (reconnecting) for the swarm's life."""
        transport.parse_address(address)
        target = self.targets.get(address)
        if target is None:
            target = self.targets[address] = _Target(address)
        if target.static:
            return
        target.static = True
        target.sources.add("static")
        self._dialers += 1
        self._nursery.start_soon(self._static_loop, target)

    async def _static_loop(self, target: _Target) -> None:
        backoff = 0.05
        address = target.address
        try:
            while address not in self.banned_addresses:
                try:
                    stream = await transport.dial(address)
                except (OSError, trio.TooSlowError) as exc:
                    target.status = f"unreachable ({transport.describe_dial_error(exc)})"
                    self.changed()
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.05
                target.status = "connected"
                peer = Peer(self.host, stream, True, address)
                target.peer = peer
                end = await self.run_peer(peer)
                target.peer = None
                if address in self.banned_addresses:
                    break
                target.status = end.reason
                self.changed()
                await trio.sleep(backoff)
        finally:
            self._dialers -= 1
            self.host.schedule()
            self.changed()

    def add_candidate(self, discovery_key: bytes, candidate: Candidate) -> None:
        """An address a discovery source found for a topic."""
        address = candidate.address
        target = self.targets.get(address)
        if target is None:
            if len(self.targets) >= MAX_TARGETS:
                self._forget_some()
                if len(self.targets) >= MAX_TARGETS:
                    return
            target = self.targets[address] = _Target(address)
        target.sources.add(candidate.source)
        target.topics.add(discovery_key)
        if candidate.node_key is not None:
            target.node_key = candidate.node_key
        if target.failures >= MAX_FAILURES and not target.static:
            # heard of again: give it another chance later
            target.failures = MAX_FAILURES - 1
        self._wake.set()

    def _forget_some(self) -> None:
        for address, t in list(self.targets.items()):
            if not t.static and t.peer is None and not t.dialing and t.failures:
                del self.targets[address]

    def _dialable(self, t: _Target, now: float) -> bool:
        if t.static or t.dialing or t.peer is not None or t.failures >= MAX_FAILURES:
            return False
        if t.address in self.banned_addresses or now < t.next_try:
            return False
        if t.node_key is not None and t.node_key in self.by_key:
            return False
        return any(self.topic_peers(dk) < MAX_PEERS_PER_TOPIC for dk in t.topics)

    async def _dial_discovered(self) -> None:
        """Dial discovered targets as topics need peers (the discovery dialer)."""
        while True:
            now = trio.current_time()
            soonest = now + 5.0
            for t in list(self.targets.values()):
                if self._dials >= MAX_DIALS or len(self.peers) >= self.max_connections:
                    break
                if self._dialable(t, now):
                    t.dialing = True
                    self._dials += 1
                    self._nursery.start_soon(self._dial_once, t)
                elif not t.static and t.peer is None and not t.dialing and t.next_try > now:
                    soonest = min(soonest, t.next_try)
            self._wake = trio.Event()
            with trio.move_on_at(soonest):
                await self._wake.wait()

    async def _dial_once(self, t: _Target) -> None:
        try:
            try:
                stream = await transport.dial(t.address)
            except (OSError, trio.TooSlowError) as exc:
                t.failures += 1
                t.status = f"unreachable ({transport.describe_dial_error(exc)})"
                t.next_try = trio.current_time() + min(300.0, 2.0 ** t.failures)
                return
            peer = Peer(self.host, stream, True, t.address)
            peer.source = ",".join(sorted(t.sources))
            t.peer = peer
            t.dialing = False
            self._dials -= 1
            self._wake.set()
            end = await self.run_peer(peer)
            t.peer = None
            t.status = end.reason
            if peer.remote_key is None or end.fault:
                t.failures += 1
            else:
                t.failures = 0
            t.next_try = trio.current_time() + min(300.0, 2.0 ** max(t.failures, 1))
        finally:
            if t.dialing:
                t.dialing = False
                self._dials -= 1
            self._wake.set()

    # --- accepting ------------------------------------------------------------------------

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        """Accept peers on these listeners until cancelled."""
        async with trio.open_nursery() as nursery:
            for lst in listeners:
                nursery.start_soon(self._accept_loop, lst)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _SHORTAGE:
                        raise
                    if not self._shortage(exc):
                        await trio.sleep(0.1)  # nothing to close: wait for descriptors
                    continue
                transport.tune(stream)
                address = transport.peer_address(stream)
                if not self._make_room(address):
                    self.refused += 1
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    continue
                # counted from now on, before its task first runs
                peer = Peer(self.host, stream, False, address)
                self.peers.append(peer)
                self._nursery.start_soon(self._accepted, peer)

    def _shortage(self, exc: OSError) -> bool:
        """Out of descriptors: report (rarely) and close an idle peer; True if one went."""
        self.shortages += 1
        now = trio.current_time()
        if now - self._last_shortage >= SHORTAGE_REPORT:
            self._last_shortage = now
            self.report(f"cannot accept more connections ({exc.strerror}); "
                        f"{len(self.peers)} open, closing idle ones")
        return self._evict(None)

    def _idleness(self, peer: Peer, now: float) -> tuple | None:
        """A sort key (most evictable first) for a peer that may be evicted, else None."""
        if not peer.connected.is_set():
            return (0, peer.started)
        if not peer.has_channels:
            return (1, peer.started)
        if peer.slow:  # we have output for it and it reads nothing
            return (2, peer.send_blocked_since)
        if peer.inflight or peer.queued_output or peer.serving:
            return None
        return (3, peer.last_active)

    def _evict(self, ip: str | None) -> bool:
        now = trio.current_time()
        peers = [p for p in self.peers if p.holds_descriptor
                 and (ip is None or transport.address_host(p.address) == ip)]
        # one that ended but still holds its socket (sending its refusal) goes
        # first, without the refusal
        ending = [p for p in peers if p.closed]
        if ending:
            ending[0].abort("closed to make room for another connection")
            return True
        cands = [(k, p) for p in peers if (k := self._idleness(p, now)) is not None]
        if not cands:
            return False
        _k, victim = min(cands, key=lambda kp: kp[0])
        self.evicted += 1
        victim.abort("closed to make room for another connection")
        return True

    def _make_room(self, address: str) -> bool:
        # the cap counts descriptors: a peer that ended holds its socket
        # until its task lets it go
        ip = transport.address_host(address)
        holding = [p for p in self.peers if p.holds_descriptor]
        same = sum(1 for p in holding if not p.initiator and transport.address_host(p.address) == ip)
        if same >= MAX_PER_IP and not self._evict(ip):
            return False
        if len(holding) >= self.max_connections and not self._evict(None):
            return False
        return True

    async def _accepted(self, peer: Peer) -> None:
        # a peer at fault is reported by the ban; routine ends are quiet
        await self.run_peer(peer, registered=True)

    # --- the janitor -------------------------------------------------------------------------

    async def janitor(self) -> None:
        last_trim = trio.current_time()
        while True:
            await trio.sleep(0.5)
            now = trio.current_time()
            if now - last_trim >= TRIM_EVERY and self.output < OUTPUT_FAIR:
                last_trim = now
                if self._ended_since_trim:
                    # peers that ended leave reference cycles behind (tasks,
                    # streams): collect them before giving memory back
                    self._ended_since_trim = 0
                    gc.collect()
                heap.trim()
            blocked = []
            for peer in list(self.peers):
                if peer.closed:
                    continue
                if peer.connected.is_set() and not peer.has_channels \
                        and now - peer.started > IDLE_TIMEOUT and not peer.inflight:
                    peer.drop(f"opened no drive within {IDLE_TIMEOUT:g} s", fault=False)
                elif peer.send_blocked_since is not None:
                    waited = now - peer.send_blocked_since
                    if waited > WRITE_STALL:
                        peer.drop(f"read nothing we sent for {WRITE_STALL:g} s", fault=False)
                    else:
                        blocked.append((peer.send_blocked_since, peer))
            if self.output > MAX_OUTPUT:
                # the budget is spent on peers that do not read: close those
                # blocked for a second, worst first, until half of it is free
                excess = self.output - MAX_OUTPUT // 2
                for since, peer in sorted(blocked, key=lambda sp: sp[0]):
                    if excess <= 0 or now - since < 1.0:
                        break
                    excess -= peer.queued_output
                    peer.drop("read too slowly while others waited", fault=False)

    # --- life -------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.janitor)
            nursery.start_soon(self._dial_discovered)
            task_status.started()
