"""Lookups over the DHT: one small sans-IO object per kind.

Theory of operation
-------------------
A `Lookup` walks toward `target`.  It keeps the candidates it has heard of
(at most `max_candidates`, nearest by XOR; farther ones are forgotten),
and `next_queries()` returns up to `alpha` = 3 of the nearest not yet asked,
counting only the `k` nearest that have not failed, so that at most `alpha`
queries are in flight.  The driver sends them and reports each outcome
with `reply(address, response)` or `fail(address)`.  The lookup is `done`
when nothing is in flight and each of the `k` nearest live candidates has
answered (or nothing is left to ask), or after `max_queries` queries.

Peer input is checked on the way in: a reply from another ID than the one
a candidate was learned under fails that candidate; learned nodes with an
unusable address (port 0, multicast, our own ID, ...) are skipped, and a
node on a loopback or private address is only taken from a source that is
itself local, so a stranger cannot point our queries at our own network.

Kinds: `FindNode` (result: the nearest nodes that answered), `GetPeers`
(peers and write tokens), `GetItem` (the highest-seq BEP 44 item that
verifies and passes the caller's check, and write tokens).  `StoreRound`
then sends an announce_peer or put to the `k` nearest nodes that gave a
token, all at once, and counts acknowledgements.

Pure: no clock (timeouts are the driver's), no sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .items import MutableItem
from .krpc import Address, NodeInfo, Response, usable_address
from .node_id import is_local
from .routing import K

ALPHA = 3
MAX_CANDIDATES = 64
MAX_QUERIES = 64
MAX_PEERS_FOUND = 500

NEW, ASKED, REPLIED, FAILED = "new", "asked", "replied", "failed"


@dataclass(slots=True, eq=False)
class Candidate:
    id: bytes | None         # None for a bootstrap address whose ID we do not know
    address: Address
    distance: int
    state: str = NEW
    token: bytes | None = None


def usable(host: str, port: int, learned_from: str | None) -> bool:
    """May we send a query to (host, port), learned from `learned_from` (None: our own list)?"""
    if not usable_address(host, port):
        return False
    return learned_from is None or not is_local(host) or is_local(learned_from)


class Lookup:
    method = "find_node"

    def __init__(self, target: bytes, seeds, *, own_id: bytes | None = None, alpha: int = ALPHA,
                 k: int = K, max_candidates: int = MAX_CANDIDATES, max_queries: int = MAX_QUERIES):
        self.target = target
        self._t = int.from_bytes(target, "big")
        self.own_id = own_id
        self.alpha, self.k = alpha, k
        self.max_candidates, self.max_queries = max_candidates, max_queries
        self._by_address: dict[Address, Candidate] = {}
        self._sorted: list[Candidate] = []
        self.queries = 0
        self.in_flight = 0
        self.replies = 0
        self.failures = 0
        self.rejected_nodes = 0  # learned nodes we would not query
        for seed in seeds:
            node_id, address = (seed.id, seed.address) if hasattr(seed, "address") else seed
            self._add(node_id, address, None)

    # --- the driver's side ---------------------------------------------------------

    def next_queries(self) -> list[Candidate]:
        """Candidates to query now (marked asked)."""
        out = []
        live = 0
        for c in self._sorted:
            if self.in_flight >= self.alpha or self.queries >= self.max_queries or live >= self.k:
                break
            if c.state == FAILED:
                continue
            live += 1
            if c.state == NEW:
                c.state = ASKED
                self.in_flight += 1
                self.queries += 1
                out.append(c)
        return out

    def reply(self, address: Address, response: Response) -> None:
        c = self._by_address.get(address)
        if c is None or c.state != ASKED:
            return
        self.in_flight -= 1
        if c.id is not None and response.id != c.id:
            c.state = FAILED
            self.failures += 1
            return
        c.id = response.id
        c.distance = int.from_bytes(response.id, "big") ^ self._t
        c.state = REPLIED
        self.replies += 1
        self._resort()
        self.absorb(c, response)
        for node in response.nodes:
            self._add(node.id, node.address, address[0])

    def fail(self, address: Address) -> None:
        c = self._by_address.get(address)
        if c is None or c.state != ASKED:
            return
        self.in_flight -= 1
        c.state = FAILED
        self.failures += 1

    @property
    def done(self) -> bool:
        if self.in_flight:
            return False
        if self.queries >= self.max_queries:
            return True
        live = [c for c in self._sorted if c.state != FAILED][:self.k]
        return all(c.state == REPLIED for c in live)

    def closest(self, n: int | None = None, *, with_token: bool = False) -> list[Candidate]:
        """The nearest candidates that answered (and gave a token, if asked)."""
        out = [c for c in self._sorted if c.state == REPLIED and (c.token is not None or not with_token)]
        return out[:n or self.k]

    # --- hooks and internals ---------------------------------------------------

    def absorb(self, candidate: Candidate, response: Response) -> None:
        """What a kind of lookup takes from a reply, beyond nodes."""

    def _add(self, node_id: bytes | None, address: Address, learned_from: str | None) -> None:
        if address in self._by_address or (node_id is not None and node_id == self.own_id):
            return
        if not usable(*address, learned_from):
            self.rejected_nodes += 1
            return
        # an address without a known ID (a bootstrap node) sorts first: it is our way in
        c = Candidate(node_id, address, -1 if node_id is None else int.from_bytes(node_id, "big") ^ self._t)
        if len(self._sorted) >= self.max_candidates:
            worst = next((x for x in reversed(self._sorted) if x.state in (NEW, FAILED)), None)
            if worst is None or worst.distance <= c.distance:
                return
            self._sorted.remove(worst)
            del self._by_address[worst.address]
        self._by_address[address] = c
        self._sorted.append(c)
        self._resort()

    def _resort(self) -> None:
        self._sorted.sort(key=lambda c: c.distance)


class FindNode(Lookup):
    method = "find_node"


class GetPeers(Lookup):
    method = "get_peers"

    def __init__(self, info_hash: bytes, seeds, **kw):
        super().__init__(info_hash, seeds, **kw)
        self.peers: dict[Address, None] = {}

    def absorb(self, candidate: Candidate, response: Response) -> None:
        candidate.token = response.token
        for host, port in response.values:
            if len(self.peers) >= MAX_PEERS_FOUND:
                break
            if usable(host, port, candidate.address[0]):
                self.peers[(host, port)] = None


class GetItem(Lookup):
    """A BEP 44 mutable item lookup: keeps the highest seq that verifies and `accept`s."""

    method = "get"

    def __init__(self, public_key: bytes, salt: bytes, target: bytes, seeds, *,
                 accept: Callable[[MutableItem], bool] = lambda item: True, **kw):
        super().__init__(target, seeds, **kw)
        self.public_key, self.salt = public_key, salt
        self.accept = accept
        self.item: MutableItem | None = None
        self.invalid_items = 0
        self.copies = 0   # nodes that returned the best item's seq

    def absorb(self, candidate: Candidate, response: Response) -> None:
        candidate.token = response.token
        if response.v is None or response.seq is None or response.sig is None:
            return
        if self.item is not None and response.seq <= self.item.seq:
            if response.seq == self.item.seq and response.v == self.item.value:
                self.copies += 1
            return  # older, or the same seq with another value: the first one found stays
        item = MutableItem(self.public_key, self.salt, response.seq, response.v, response.sig)
        if response.k != self.public_key or not item.is_valid() or not self.accept(item):
            self.invalid_items += 1
            return
        self.item, self.copies = item, 1


class StoreRound:
    """Send one store (announce_peer or put) to each of the given nodes; count the acks."""

    def __init__(self, targets: list[Candidate]):
        self.targets = list(targets)
        self._waiting = {c.address for c in self.targets}
        self.acks = 0
        self.errors = 0

    def reply(self, address: Address, ok: bool) -> None:
        if address in self._waiting:
            self._waiting.discard(address)
            if ok:
                self.acks += 1
            else:
                self.errors += 1

    @property
    def done(self) -> bool:
        return not self._waiting


def node_infos(candidates: list[Candidate]) -> list[NodeInfo]:
    return [NodeInfo(c.id, *c.address) for c in candidates if c.id is not None]
