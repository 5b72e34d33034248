"""The k-bucket routing table (BEP 5), node liveness, replacement caches, persistence.

Theory of operation
-------------------
Buckets are a list: bucket `i` (for i below the last) holds nodes whose ID
shares exactly `i` leading bits with ours; the last bucket holds every node
sharing at least `len(buckets) - 1` bits, the part of the ID space around
our own ID.  Each holds at most `K` = 8 nodes.  When the last bucket is full
it splits in two (at most 160 buckets); any other full bucket keeps its
nodes and remembers the newcomer in its replacement cache (at most `K`
entries, newest kept).

Liveness follows BEP 5.  A node is *good* if it answered one of our
queries within the last 15 minutes, or has ever answered one and queried
us within the last 15 minutes; *bad* after `MAX_FAILS` queries in a row went
unanswered; *questionable* otherwise.  A bad node is replaced at once by
the newest replacement that has answered us; `to_ping` names the
questionable nodes, and replacements that could fill a slot, for the
driver to ping.

Only nodes that answered one of *our* queries enter the table
(`heard_from`).  A node that merely sent us a query (`heard_about`; its
source address could be forged) goes to the replacement cache unconfirmed,
to be pinged before it can take a slot.  A node already in the table is
never moved to another address, and for public addresses the table holds
at most one node per IP (a Sybil on one host gets one slot), as
libtorrent's `restrict_routing_ips` does.  A node whose ID breaks BEP 42
takes only a free slot and is the first pushed out by one that follows it
(libtorrent's `prefer_verified_node_ids`).

`refresh_targets` returns a random ID inside every bucket not changed for
15 minutes, for a find_node lookup.  The table is persisted as a small
bencoded dictionary (`encode_state` / `decode_state`): our ID, the external
IP we learned, and the nodes that answered us.

Pure: every method takes the time as `now` (seconds, any epoch).
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field

import bencode2

from .krpc import NodeInfo, pack_address, pack_nodes, unpack_address, unpack_nodes, usable_address
from .node_id import ID_BYTES, RandBytes, is_local, verify_id

K = 8
ID_BITS = 160
GOOD_FOR = 15 * 60.0
MAX_FAILS = 2
REFRESH_AFTER = 15 * 60.0
PING_AGAIN_AFTER = 20.0   # seconds between two pings of one node
MAX_SAVED_NODES = 200
MAX_STATE_BYTES = 64 * 1024


@dataclass(slots=True, eq=False)
class Entry:
    id: bytes
    host: str
    port: int
    first_seen: float
    last_reply: float | None = None   # it answered one of our queries
    last_query: float | None = None   # it queried us
    fails: int = 0                    # our queries in a row it did not answer
    last_ping: float | None = None
    verified: bool = True             # its ID follows BEP 42 for its IP
    int_id: int = field(default=0, repr=False)

    def __post_init__(self):
        self.int_id = int.from_bytes(self.id, "big")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def state(self, now: float) -> str:
        if self.fails >= MAX_FAILS:
            return "bad"
        if self.last_reply is not None and (
            now - self.last_reply < GOOD_FOR
            or (self.last_query is not None and now - self.last_query < GOOD_FOR)
        ):
            return "good"
        return "questionable"

    def info(self) -> NodeInfo:
        return NodeInfo(self.id, self.host, self.port)


@dataclass(slots=True)
class Bucket:
    nodes: list[Entry] = field(default_factory=list)
    replacements: list[Entry] = field(default_factory=list)  # oldest first
    changed: float = 0.0


class RoutingTable:
    def __init__(self, own_id: bytes, now: float = 0.0, *, k: int = K,
                 restrict_ips: bool = True, randbytes: RandBytes = os.urandom):
        if len(own_id) != ID_BYTES:
            raise ValueError("node ID must be 20 bytes")
        self.own_id = own_id
        self._own = int.from_bytes(own_id, "big")
        self.k = k
        self.restrict_ips = restrict_ips
        self._randbytes = randbytes
        self.buckets: list[Bucket] = [Bucket(changed=now)]
        self._by_id: dict[bytes, Entry] = {}
        self._by_addr: dict[tuple[str, int], Entry] = {}
        self._ips: set[str] = set()  # public IPs with a node in the table

    # --- queries ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, node_id: bytes) -> bool:
        return node_id in self._by_id

    def get(self, node_id: bytes) -> Entry | None:
        return self._by_id.get(node_id)

    def entries(self):
        for b in self.buckets:
            yield from b.nodes

    def count(self, now: float) -> dict[str, int]:
        states = {"good": 0, "questionable": 0, "bad": 0}
        for e in self._by_id.values():
            states[e.state(now)] += 1
        states["replacements"] = sum(len(b.replacements) for b in self.buckets)
        states["buckets"] = len(self.buckets)
        return states

    def closest(self, target: bytes, n: int = K, now: float | None = None) -> list[Entry]:
        """The `n` nodes nearest `target` by XOR, bad ones left out (when `now` is given)."""
        t = int.from_bytes(target, "big")
        pool = self._by_id.values() if now is None else [e for e in self._by_id.values()
                                                          if e.state(now) != "bad"]
        return heapq.nsmallest(n, pool, key=lambda e: e.int_id ^ t)

    def bucket_index(self, node_id: bytes) -> int:
        shared = ID_BITS - (int.from_bytes(node_id, "big") ^ self._own).bit_length()
        return min(shared, len(self.buckets) - 1)

    # --- updates ----------------------------------------------------------------

    def heard_from(self, node_id: bytes, host: str, port: int, now: float) -> bool:
        """`node_id` at (host, port) answered one of our queries.  True if it is in the table now."""
        if node_id == self.own_id or len(node_id) != ID_BYTES or not usable_address(host, port):
            return False
        e = self._by_id.get(node_id)
        if e is not None:
            if e.address != (host, port):
                return False  # nobody moves a node we know to another address
            e.last_reply, e.fails = now, 0
            return True
        old = self._by_addr.get((host, port))
        if old is not None:  # the node at that address changed its ID
            self._remove(old)
        if self._ip_taken(host):
            return False
        b = self.buckets[self.bucket_index(node_id)]
        previous = self._take_replacement(b, node_id, host, port)
        entry = Entry(node_id, host, port, previous.first_seen if previous else now,
                      last_reply=now, last_query=previous.last_query if previous else None,
                      verified=verify_id(node_id, host))
        return self._insert(entry, now)

    def heard_about(self, node_id: bytes, host: str, port: int, now: float) -> None:
        """`node_id` at (host, port) sent us a query: noted, but it must answer before it counts."""
        if node_id == self.own_id or len(node_id) != ID_BYTES or not usable_address(host, port):
            return
        e = self._by_id.get(node_id)
        if e is not None:
            if e.address == (host, port):
                e.last_query = now
            return
        if (host, port) in self._by_addr or self._ip_taken(host):
            return
        b = self.buckets[self.bucket_index(node_id)]
        for r in b.replacements:
            if r.id == node_id or r.address == (host, port):
                if r.address == (host, port) and r.id == node_id:
                    r.last_query = now
                return
        self._add_replacement(b, Entry(node_id, host, port, now, last_query=now,
                                       verified=verify_id(node_id, host)))

    def failed(self, node_id: bytes | None, host: str, port: int, now: float) -> None:
        """Our query to (host, port) (expecting `node_id`, if known) went unanswered."""
        e = self._by_id.get(node_id) if node_id is not None else self._by_addr.get((host, port))
        if e is not None and e.address == (host, port):
            e.fails += 1
            if e.fails >= MAX_FAILS:
                b = self.buckets[self.bucket_index(e.id)]
                confirmed = [r for r in b.replacements if r.last_reply is not None
                             and (r.host == e.host or not self._ip_taken(r.host))]
                if confirmed:
                    self._replace(b, e, confirmed[-1], now)
            return
        if node_id is not None:
            b = self.buckets[self.bucket_index(node_id)]
            b.replacements = [r for r in b.replacements if r.address != (host, port)]

    def to_ping(self, now: float, limit: int = 2) -> list[Entry]:
        """Nodes to ping now: questionable ones (least recently heard first), then
        unconfirmed replacements that could fill a free or bad slot."""
        due = lambda e: e.last_ping is None or now - e.last_ping >= PING_AGAIN_AFTER  # noqa: E731
        picked = sorted((e for e in self._by_id.values() if e.state(now) == "questionable" and due(e)),
                        key=lambda e: max(e.last_reply or 0.0, e.last_query or 0.0))[:limit]
        for b in self.buckets:
            if len(picked) >= limit:
                break
            if len(b.nodes) < self.k or any(e.state(now) == "bad" for e in b.nodes):
                for r in reversed(b.replacements):
                    if r.last_reply is None and due(r):
                        picked.append(r)
                        break
        for e in picked:
            e.last_ping = now
        return picked

    def refresh_targets(self, now: float) -> list[bytes]:
        """A random ID inside each bucket unchanged for REFRESH_AFTER (each then counts as refreshed)."""
        targets = []
        for i, b in enumerate(self.buckets):
            if now - b.changed >= REFRESH_AFTER:
                b.changed = now
                targets.append(self.random_id_in(i))
        return targets

    def random_id_in(self, i: int) -> bytes:
        """A random ID that falls in bucket `i`."""
        r = int.from_bytes(self._randbytes(ID_BYTES), "big")
        if i < len(self.buckets) - 1:  # share i bits with us, then differ
            keep = ((1 << i) - 1) << (ID_BITS - i)
            flip = 1 << (ID_BITS - i - 1)
            value = (self._own & keep) | ((self._own ^ flip) & flip) | (r & (flip - 1))
        else:
            keep = ((1 << i) - 1) << (ID_BITS - i)
            value = (self._own & keep) | (r & ~keep & ((1 << ID_BITS) - 1))
        return value.to_bytes(ID_BYTES, "big")

    def with_id(self, own_id: bytes, now: float) -> "RoutingTable":
        """The same nodes in a table for a new ID of ours (BEP 42, after learning our IP)."""
        table = RoutingTable(own_id, now, k=self.k, restrict_ips=self.restrict_ips,
                             randbytes=self._randbytes)
        for e in sorted(self._by_id.values(), key=lambda e: -(e.last_reply or 0.0)):
            if e.id != own_id:
                table._insert(Entry(e.id, e.host, e.port, e.first_seen, e.last_reply, e.last_query,
                                    e.fails, e.last_ping, e.verified), now)
        return table

    # --- internals --------------------------------------------------------------

    def _ip_taken(self, host: str) -> bool:
        return self.restrict_ips and not is_local(host) and host in self._ips

    def _index(self, e: Entry) -> None:
        self._by_id[e.id] = e
        self._by_addr[e.address] = e
        if not is_local(e.host):
            self._ips.add(e.host)

    def _unindex(self, e: Entry) -> None:
        self._by_id.pop(e.id, None)
        self._by_addr.pop(e.address, None)
        self._ips.discard(e.host)

    def _remove(self, e: Entry) -> None:
        b = self.buckets[self.bucket_index(e.id)]
        b.nodes.remove(e)
        self._unindex(e)

    def _replace(self, b: Bucket, old: Entry, new: Entry, now: float) -> None:
        b.nodes[b.nodes.index(old)] = new
        self._unindex(old)
        if new in b.replacements:
            b.replacements.remove(new)
        self._index(new)
        b.changed = now

    def _insert(self, entry: Entry, now: float) -> bool:
        while True:
            index = self.bucket_index(entry.id)
            b = self.buckets[index]
            if len(b.nodes) < self.k:
                b.nodes.append(entry)
                self._index(entry)
                b.changed = now
                return True
            if index == len(self.buckets) - 1 and len(self.buckets) < ID_BITS:
                self._split()
                continue
            bad = [e for e in b.nodes if e.state(now) == "bad"]
            if bad:
                self._replace(b, bad[0], entry, now)
                return True
            if entry.verified:
                unverified = [e for e in b.nodes if not e.verified]
                if unverified:
                    oldest = min(unverified, key=lambda e: e.last_reply or 0.0)
                    self._replace(b, oldest, entry, now)
                    return True
            self._add_replacement(b, entry)
            return False

    def _split(self) -> None:
        last = self.buckets[-1]
        new = Bucket(changed=last.changed)
        self.buckets.append(new)
        depth = len(self.buckets) - 1
        moves = lambda e: ID_BITS - (e.int_id ^ self._own).bit_length() >= depth  # noqa: E731
        new.nodes = [e for e in last.nodes if moves(e)]
        last.nodes = [e for e in last.nodes if not moves(e)]
        new.replacements = [e for e in last.replacements if moves(e)]
        last.replacements = [e for e in last.replacements if not moves(e)]

    def _take_replacement(self, b: Bucket, node_id: bytes, host: str, port: int) -> Entry | None:
        for r in b.replacements:
            if r.id == node_id or r.address == (host, port):
                b.replacements.remove(r)
                return r if r.id == node_id and r.address == (host, port) else None
        return None

    def _add_replacement(self, b: Bucket, entry: Entry) -> None:
        b.replacements = [r for r in b.replacements if r.id != entry.id and r.address != entry.address]
        b.replacements.append(entry)
        if len(b.replacements) > self.k:  # drop the oldest unconfirmed one, else the oldest
            unconfirmed = [r for r in b.replacements if r.last_reply is None]
            b.replacements.remove(unconfirmed[0] if unconfirmed else b.replacements[0])

    # --- persistence ------------------------------------------------------------

    def saved_nodes(self, now: float, limit: int = MAX_SAVED_NODES) -> list[NodeInfo]:
        """Nodes worth remembering across restarts: not bad, answered us, most recent first."""
        live = [e for e in self._by_id.values() if e.state(now) != "bad" and e.last_reply is not None]
        live.sort(key=lambda e: -(e.last_reply or 0.0))
        return [e.info() for e in live[:limit]]


def encode_state(own_id: bytes, nodes: list[NodeInfo], external_ip: str | None) -> bytes:
    """The routing table's state file: bencoded {id, ip?, nodes}."""
    state: dict[bytes, bytes] = {b"id": own_id, b"nodes": pack_nodes(nodes[:MAX_SAVED_NODES])}
    if external_ip is not None:
        state[b"ip"] = pack_address(external_ip, 0)[:4]
    return bencode2.bencode(state)


def decode_state(data: bytes) -> tuple[bytes, list[NodeInfo], str | None] | None:
    """(our ID, saved nodes, external IP) from a state file; None if it is damaged."""
    if len(data) > MAX_STATE_BYTES:
        return None
    try:
        state = bencode2.bdecode(data)
        own_id, packed = state[b"id"], state[b"nodes"]
        if not (isinstance(own_id, bytes) and len(own_id) == ID_BYTES and isinstance(packed, bytes)):
            return None
        nodes = list(unpack_nodes(packed, limit=MAX_SAVED_NODES))
        ip = state.get(b"ip")
        external = unpack_address(ip + b"\0\0")[0] if isinstance(ip, bytes) and len(ip) == 4 else None
    except Exception:  # a damaged file of ours: start afresh
        return None
    return own_id, [n for n in nodes if usable_address(n.host, n.port)], external
