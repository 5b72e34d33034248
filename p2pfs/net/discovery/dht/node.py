"""The trio driver of a DHT node: one UDP socket, a receive loop, timers, lookups.

Theory of operation
-------------------
`DhtNode.run` binds the socket, loads the saved routing state (our ID, the
external IP we learned, nodes that answered us) and starts three tasks:
the receive loop (each datagram goes through `Engine.receive`; its answer
is sent back at once, and a reply wakes the task waiting for it), the
timers (ping questionable nodes, refresh stale buckets, expire storage,
save the state every few minutes), and bootstrapping (a find_node for our
own ID seeded with the saved nodes, then the bootstrap routers; retried
with backoff while the table is empty).  The state is saved again on
exit, to `state_path` (mode 0600, written atomically).

Each lookup is a traversal object (traversal.py) driven by `_walk`: up to
α queries in flight, each a task that waits for its reply until the
transaction's deadline.  At most `Transactions.max_pending` queries are
outstanding in all; beyond that a query waits for a slot.

Default bootstrap nodes are the well-known public Mainline routers, for
real users; tests always pass loopback addresses instead.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import trio

from ....store import write_private_file
from . import krpc, traversal
from .engine import Engine
from .items import MutableItem, mutable_target
from .routing import K, decode_state, encode_state

DEFAULT_PORT = 6881
DEFAULT_BOOTSTRAP = (
    ("router.bittorrent.com", 6881),
    ("dht.transmissionbt.com", 6881),
    ("router.utorrent.com", 6881),
    ("dht.libtorrent.org", 25401),
)
STATE_FILE = "dht.state"
TICK = 0.5
PINGS_PER_TICK = 3
REFRESH_EVERY = 60.0
EXPIRE_EVERY = 60.0
SAVE_EVERY = 5 * 60.0
BOOTSTRAP_RETRY = (2.0, 5.0, 15.0, 30.0, 60.0)
RESOLVE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Announced:
    peers: list[krpc.Address]   # peers the lookup found on its way
    stored: int                 # nodes that accepted our announce


class DhtNode:
    def __init__(self, *, bind: tuple[str, int] = ("0.0.0.0", DEFAULT_PORT),
                 bootstrap: Sequence[tuple[str, int]] = DEFAULT_BOOTSTRAP,
                 state_path: str | os.PathLike | None = None, timeout: float = 3.0,
                 randbytes: Callable[[int], bytes] = os.urandom):
        self.bind = bind
        self.bootstrap_nodes = list(bootstrap)
        self.state_path = Path(state_path) if state_path is not None else None
        self.timeout = timeout
        self._randbytes = randbytes
        self.engine: Engine | None = None
        self.address: krpc.Address | None = None
        self.last_announce: float | None = None   # wall-clock time of our last accepted announce
        self._sock = None
        self._waiters: dict[bytes, tuple[trio.Event, list]] = {}
        self._slots: trio.Semaphore | None = None
        self._saved_nodes: list[krpc.NodeInfo] = []
        self._bootstrap_addresses: list[krpc.Address] = []
        self._ready = trio.Event()   # set after the first bootstrap attempt
        self._resolved = trio.Event()  # set once bootstrap addresses are known

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled.  Started once the socket is bound (`address` is set).
        Raises OSError if the address cannot be bound."""
        now = trio.current_time()
        node_id, external = self._load_state()
        self.engine = Engine(now, node_id=node_id, external_ip=external, timeout=self.timeout,
                             randbytes=self._randbytes)
        self._slots = trio.Semaphore(self.engine.transactions.max_pending)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            try:
                await sock.bind(self.bind)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or not self.bind[1]:
                    raise
                await sock.bind((self.bind[0], 0))  # another node has the port: any other
            self._sock = sock
            self.address = sock.getsockname()[:2]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._timers)
                nursery.start_soon(self._bootstrap)
                task_status.started()
        finally:
            sock.close()
            self._save_state()

    @property
    def has_contacts(self) -> bool:
        """Whether it knows any node to ask: its table, saved nodes or bootstrap nodes."""
        table = self.engine is not None and len(self.engine.table) > 0
        return table or bool(self._saved_nodes) or bool(self.bootstrap_nodes)

    async def wait_ready(self) -> None:
        """Until the first bootstrap attempt has ended (the table may still be empty)."""
        await self._ready.wait()

    def status(self) -> dict:
        if self.engine is None:
            return {"running": False}
        s = self.engine.status(trio.current_time())
        s.update(running=True, address=f"{self.address[0]}:{self.address[1]}" if self.address else None,
                 last_announce=self.last_announce)
        return s

    # --- the public lookups -----------------------------------------------------------------

    async def find_node(self, target: bytes) -> list[krpc.NodeInfo]:
        """The nodes nearest `target` that answered."""
        await self._resolved.wait()
        lookup = traversal.FindNode(target, self._seeds(target), own_id=self.engine.own_id)
        await self._walk(lookup, lambda t, me, c: krpc.FindNode(t, me, target))
        return traversal.node_infos(lookup.closest())

    async def get_peers(self, info_hash: bytes) -> list[krpc.Address]:
        """Peers announced for `info_hash`, from the nodes nearest it."""
        return list((await self._get_peers(info_hash)).peers)

    async def announce(self, info_hash: bytes, port: int, *, implied_port: bool = False) -> Announced:
        """Find the nodes nearest `info_hash` and announce (our IP, `port`) to the K that gave
        tokens.  `implied_port`: the storing nodes take our UDP source port instead."""
        lookup = await self._get_peers(info_hash)
        targets = lookup.closest(K, with_token=True)
        stored = await self._store(targets, lambda t, me, c: krpc.AnnouncePeer(
            t, me, info_hash, 0 if implied_port else port, c.token, implied_port))
        if stored:
            self.last_announce = time.time()
        return Announced(list(lookup.peers), stored)

    async def get_mutable(self, public_key: bytes, salt: bytes = b"", *,
                          accept: Callable[[MutableItem], bool] = lambda item: True) -> MutableItem | None:
        """The highest-seq BEP 44 item under (public_key, salt) that verifies and passes `accept`."""
        lookup = await self._get_item(public_key, salt, accept)
        return lookup.item

    async def put_mutable(self, item: MutableItem) -> int:
        """Store a signed item on the K nearest nodes that gave tokens; how many took it
        (0 without storing if the lookup found a newer seq: ours would be a replay).
        Raises VerificationError if the item does not verify (nothing is sent then)."""
        item.verify()
        lookup = await self._get_item(item.key, item.salt, lambda found: True)
        if lookup.item is not None and lookup.item.seq > item.seq:
            return 0
        targets = lookup.closest(K, with_token=True)
        return await self._store(targets, lambda t, me, c: krpc.PutItem(
            t, me, c.token, item.value, item.key, item.salt, item.seq, item.signature))

    # --- lookups ----------------------------------------------------------------------------------

    async def _get_peers(self, info_hash: bytes) -> traversal.GetPeers:
        await self._resolved.wait()
        lookup = traversal.GetPeers(info_hash, self._seeds(info_hash), own_id=self.engine.own_id)
        await self._walk(lookup, lambda t, me, c: krpc.GetPeers(t, me, info_hash))
        return lookup

    async def _get_item(self, public_key, salt, accept) -> traversal.GetItem:
        await self._resolved.wait()
        target = mutable_target(public_key, salt)
        lookup = traversal.GetItem(public_key, salt, target, self._seeds(target),
                                   accept=accept, own_id=self.engine.own_id)
        await self._walk(lookup, lambda t, me, c: krpc.GetItem(t, me, target))
        return lookup

    def _seeds(self, target: bytes) -> list:
        now = trio.current_time()
        seeds: list = list(self.engine.table.closest(target, 2 * K, now))
        if len(seeds) < K:
            seeds += self._saved_nodes
            seeds += [(None, address) for address in self._bootstrap_addresses]
        return seeds

    async def _walk(self, lookup: traversal.Lookup, build) -> None:
        send, receive = trio.open_memory_channel(traversal.MAX_QUERIES)

        async def ask(candidate: traversal.Candidate) -> None:
            result = await self._query(candidate.address, candidate.id,
                                       lambda t, me: build(t, me, candidate))
            if isinstance(result, krpc.Response):
                lookup.reply(candidate.address, result)
            else:
                lookup.fail(candidate.address)
            send.send_nowait(None)

        async with trio.open_nursery() as nursery:
            while not lookup.done:
                for candidate in lookup.next_queries():
                    nursery.start_soon(ask, candidate)
                if lookup.done:
                    break
                if lookup.in_flight:
                    await receive.receive()
                else:
                    break  # nothing in flight and nothing to ask

    async def _store(self, targets: list[traversal.Candidate], build) -> int:
        round_ = traversal.StoreRound(targets)

        async def store(candidate: traversal.Candidate) -> None:
            result = await self._query(candidate.address, candidate.id,
                                       lambda t, me: build(t, me, candidate))
            round_.reply(candidate.address, isinstance(result, krpc.Response))

        async with trio.open_nursery() as nursery:
            for candidate in targets:
                nursery.start_soon(store, candidate)
        return round_.acks

    # --- one query -----------------------------------------------------------------------------

    async def _query(self, address: krpc.Address, node_id: bytes | None, build
                     ) -> krpc.Response | krpc.Error | None:
        """Send one query and wait for its answer until its deadline (None: no answer)."""
        async with self._slots:
            now = trio.current_time()
            pending, data = self.engine.query(build, address, node_id, now)
            event, box = trio.Event(), []
            self._waiters[pending.tid] = (event, box)
            try:
                if not await self._send(data, address):
                    self.engine.timed_out(pending, now)
                    return None
                with trio.move_on_at(pending.deadline):
                    await event.wait()
                if not box:
                    self.engine.timed_out(pending, trio.current_time())
                    return None
                return box[0]
            finally:
                del self._waiters[pending.tid]
                if not box:
                    self.engine.transactions.cancel(pending.tid)

    async def _send(self, data: bytes, address: krpc.Address) -> bool:
        try:
            await self._sock.sendto(data, address)
        except OSError:  # unreachable network, no route: the query fails, the node lives on
            self.engine.counters["send_errors"] += 1
            return False
        self.engine.sent(len(data))
        return True

    # --- tasks --------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                data, source = await self._sock.recvfrom(krpc.MAX_DATAGRAM + 1)
            except OSError:  # ICMP errors surface here on Linux; they mean nothing to us
                continue
            source = source[:2]
            answer, reply = self.engine.receive(data, source, trio.current_time())
            if answer is not None:
                await self._send(answer, source)
            if reply is not None:
                pending, message = reply
                waiter = self._waiters.get(pending.tid)
                if waiter is not None:
                    waiter[1].append(message)
                    waiter[0].set()

    async def _timers(self) -> None:
        start = trio.current_time()
        next_refresh, next_expire, next_save = start + REFRESH_EVERY, start + EXPIRE_EVERY, start + SAVE_EVERY
        async with trio.open_nursery() as nursery:
            refreshing = False

            async def refresh(targets: list[bytes]) -> None:
                nonlocal refreshing
                try:
                    for target in targets:
                        await self.find_node(target)
                finally:
                    refreshing = False

            while True:
                await trio.sleep(TICK)
                now = trio.current_time()
                engine = self.engine
                for entry in engine.table.to_ping(now, PINGS_PER_TICK):
                    nursery.start_soon(self._query, entry.address, entry.id,
                                       lambda t, me: krpc.Ping(t, me))
                if engine.id_changed and not refreshing:
                    engine.id_changed = False
                    refreshing = True
                    nursery.start_soon(refresh, [engine.own_id])
                if now >= next_refresh and not refreshing:
                    next_refresh = now + REFRESH_EVERY
                    targets = engine.table.refresh_targets(now)
                    if targets:
                        refreshing = True
                        nursery.start_soon(refresh, targets)
                if now >= next_expire:
                    next_expire = now + EXPIRE_EVERY
                    engine.expire(now)
                if now >= next_save:
                    next_save = now + SAVE_EVERY
                    self._save_state()

    async def _bootstrap(self) -> None:
        """find_node(own ID) until the table holds K nodes, with backoff; then the
        bucket refreshes keep it filled."""
        await self._resolve()
        for delay in (*BOOTSTRAP_RETRY, None):
            await self.find_node(self.engine.own_id)
            self._ready.set()
            if len(self.engine.table) >= K or delay is None:
                return
            await trio.sleep(delay)
            if not self._bootstrap_addresses:
                await self._resolve()

    async def _resolve(self) -> None:
        """Bootstrap host names to addresses (IP literals need no resolver); until this is
        done, lookups wait."""
        addresses = []
        for host, port in self.bootstrap_nodes:
            try:
                socket.inet_aton(host)
                addresses.append((host, port))
                continue
            except OSError:
                pass
            with trio.move_on_after(RESOLVE_TIMEOUT):
                try:
                    infos = await trio.socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
                except (OSError, UnicodeError):
                    continue
                addresses += [info[4][:2] for info in infos[:1]]
        self._bootstrap_addresses = addresses
        self._resolved.set()

    # --- state file ---------------------------------------------------------------------------

    def _load_state(self) -> tuple[bytes | None, str | None]:
        if self.state_path is None:
            return None, None
        try:
            data = self.state_path.read_bytes()
        except OSError:
            return None, None
        state = decode_state(data)
        if state is None:
            return None, None
        node_id, self._saved_nodes, external = state
        return node_id, external

    def _save_state(self) -> None:
        if self.state_path is None or self.engine is None:
            return
        now = trio.current_time()
        nodes = self.engine.table.saved_nodes(now) or self._saved_nodes
        data = encode_state(self.engine.own_id, nodes, self.engine.external_ip)
        try:
            write_private_file(self.state_path, data)
        except OSError:
            self.engine.counters["save_errors"] += 1
