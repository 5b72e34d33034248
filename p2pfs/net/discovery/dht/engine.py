"""A DHT node's state machine: datagrams in, answers out, replies matched to our queries.

Theory of operation
-------------------
`Engine.receive(datagram, source, now)` is everything a datagram costs.
In order, each step cheaper than the next:

1. A datagram over `krpc.MAX_DATAGRAM` bytes is dropped unread.
2. The DoS blocker: a source IP sending more than 5 datagrams a second
   (over 10 s) is ignored for 5 minutes.
3. Strict decoding (`krpc.decode`): garbage is dropped; a query with a
   sound envelope but bad arguments gets "203 Protocol Error".
4. A query is answered if the node-wide answer budget allows (a token
   bucket), from the routing table, the peer store and the item store; the
   asker is noted in the routing table as heard-about.
5. A reply or error is matched to our outstanding query by transaction id
   *and* source address; an unmatched one is ignored.  A reply's sender
   enters the routing table; its `ip` field is a vote on our external IP.
   Once enough distinct sources agree on a public IP our ID does not fit,
   we take a BEP 42 ID for it (`id_changed` is set for the driver).

Every outcome is counted in `counters`.  The engine sends nothing itself:
`receive` returns the bytes to send back, and `query` returns the bytes of
a new query with its `Pending` entry; the driver owns the socket, the
timers and the lookups (traversal.py).

Pure: the time is passed in as `now`; randomness comes from `randbytes`.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Callable

from ....errors import ProtocolError
from . import krpc
from .items import MutableItem
from .node_id import ExternalIpVote, RandBytes, generate_id, is_local, verify_id
from .routing import K, RoutingTable
from .rpc import QUERY_TIMEOUT, DosBlocker, Pending, RateLimit, Tokens, Transactions
from .storage import ItemStore, PeerStore

ANSWER_RATE = 250.0    # queries answered per second, in all
ANSWER_BURST = 500.0


class Engine:
    def __init__(self, now: float, *, node_id: bytes | None = None, external_ip: str | None = None,
                 timeout: float = QUERY_TIMEOUT,
                 randbytes: RandBytes = os.urandom, dos: DosBlocker | None = None,
                 answer_rate: float = ANSWER_RATE, answer_burst: float = ANSWER_BURST):
        self._randbytes = randbytes
        if node_id is None or (external_ip is not None and not verify_id(node_id, external_ip)):
            node_id = generate_id(external_ip, randbytes) if external_ip else randbytes(20)
        self.table = RoutingTable(node_id, now, randbytes=randbytes)
        self.transactions = Transactions(timeout=timeout, randbytes=randbytes)
        self.dos = dos or DosBlocker()
        self.answers = RateLimit(answer_rate, answer_burst)
        self.tokens = Tokens(now, randbytes=randbytes)
        self.peers = PeerStore()
        self.items = ItemStore()
        self.vote = ExternalIpVote()
        self.vote.address = external_ip
        self.id_changed = False
        self.counters: Counter[str] = Counter()

    @property
    def own_id(self) -> bytes:
        return self.table.own_id

    @property
    def external_ip(self) -> str | None:
        return self.vote.address

    # --- incoming ---------------------------------------------------------------------

    def receive(self, data: bytes, source: krpc.Address, now: float
                ) -> tuple[bytes | None, tuple[Pending, krpc.Response | krpc.Error] | None]:
        """(bytes to send back to `source` or None, (our query, its answer) or None)."""
        c = self.counters
        c["packets_in"] += 1
        c["bytes_in"] += len(data)
        if len(data) > krpc.MAX_DATAGRAM:
            c["dropped_oversize"] += 1
            return None, None
        if not self.dos.allow(source[0], now):
            c["ignored_blocked"] += 1
            return None, None
        try:
            msg = krpc.decode(data)
        except krpc.BadQuery as exc:
            c["dropped_malformed"] += 1
            if not self.answers.allow(now):
                return None, None
            return krpc.encode(krpc.Error(exc.t, krpc.PROTOCOL_ERROR, "malformed query"), ip=source), None
        except ProtocolError:
            c["dropped_malformed"] += 1
            return None, None
        if isinstance(msg, (krpc.Response, krpc.Error)):
            pending = self.transactions.match(msg.t, source)
            if pending is None:
                c["ignored_unexpected"] += 1
                return None, None
            if isinstance(msg, krpc.Response):
                c["replies_in"] += 1
                self.table.heard_from(msg.id, source[0], source[1], now)
                if msg.ip is not None:
                    self._vote(source[0], msg.ip[0], now)
            else:
                c["errors_in"] += 1
            return None, (pending, msg)
        c["queries_in"] += 1
        if not self.answers.allow(now):
            c["ignored_rate"] += 1
            return None, None
        if not msg.read_only:
            self.table.heard_about(msg.id, source[0], source[1], now)
        answer = self._answer(msg, source, now)
        c["errors_out" if isinstance(answer, krpc.Error) else "answers_out"] += 1
        return krpc.encode(answer, ip=source), None

    def _vote(self, voter: str, reported: str, now: float) -> None:
        winner = self.vote.add(voter, reported)
        if winner is None or is_local(winner) or verify_id(self.own_id, winner):
            return
        self.table = self.table.with_id(generate_id(winner, self._randbytes), now)
        self.id_changed = True
        self.counters["id_changes"] += 1

    # --- answering queries -------------------------------------------------------------

    def _answer(self, q: krpc.Query, source: krpc.Address, now: float) -> krpc.Response | krpc.Error:
        me = self.own_id
        host = source[0]
        if isinstance(q, krpc.Ping):
            return krpc.Response(q.t, me)
        if isinstance(q, krpc.FindNode):
            return krpc.Response(q.t, me, nodes=self._nodes(q.target, now))
        if isinstance(q, krpc.GetPeers):
            return krpc.Response(q.t, me, nodes=self._nodes(q.info_hash, now),
                                 values=tuple(self.peers.get(q.info_hash, now)),
                                 token=self.tokens.make(host, now))
        if isinstance(q, krpc.AnnouncePeer):
            if not self.tokens.check(q.token, host, now):
                self.counters["bad_tokens"] += 1
                return krpc.Error(q.t, krpc.PROTOCOL_ERROR, "bad token")
            self.peers.announce(q.info_hash, (host, source[1] if q.implied_port else q.port), now)
            return krpc.Response(q.t, me)
        if isinstance(q, krpc.GetItem):
            r = krpc.Response(q.t, me, nodes=self._nodes(q.target, now), token=self.tokens.make(host, now))
            stored = self.items.get(q.target, now)
            if stored is None:
                return r
            if stored.item is None:
                return krpc.Response(r.t, me, nodes=r.nodes, token=r.token, v=stored.value)
            item = stored.item
            if q.seq is not None and item.seq <= q.seq:
                return krpc.Response(r.t, me, nodes=r.nodes, token=r.token, seq=item.seq)
            return krpc.Response(r.t, me, nodes=r.nodes, token=r.token, k=item.key, seq=item.seq,
                                 sig=item.signature, v=item.value)
        if isinstance(q, krpc.PutItem):
            if not self.tokens.check(q.token, host, now):
                self.counters["bad_tokens"] += 1
                return krpc.Error(q.t, krpc.PROTOCOL_ERROR, "bad token")
            if q.k is None:
                code = self.items.put_immutable(q.v, now)
            else:
                code = self.items.put_mutable(MutableItem(q.k, q.salt, q.seq, q.v, q.sig), now, q.cas)
            if code is not None:
                return krpc.Error(q.t, code, _PUT_ERRORS.get(code, "refused"))
            return krpc.Response(q.t, me)
        return krpc.Error(q.t, krpc.METHOD_UNKNOWN, "method unknown")

    def _nodes(self, target: bytes, now: float) -> tuple[krpc.NodeInfo, ...]:
        return tuple(e.info() for e in self.table.closest(target, K, now))

    # --- outgoing -------------------------------------------------------------------------

    def query(self, build: Callable[[bytes, bytes], krpc.Query], address: krpc.Address,
              node_id: bytes | None, now: float) -> tuple[Pending, bytes]:
        """A new query to `address` (expecting `node_id` to answer, if known):
        `build(t, own_id)` makes the message.  The caller checks `transactions.full()` first."""
        pending = self.transactions.new(address, node_id, "", now)
        message = build(pending.tid, self.own_id)
        pending.kind = krpc.METHODS.get(type(message), b"?").decode()
        self.counters["queries_out"] += 1
        return pending, krpc.encode(message)

    def sent(self, size: int) -> None:
        self.counters["packets_out"] += 1
        self.counters["bytes_out"] += size

    def timed_out(self, pending: Pending, now: float) -> None:
        """Our query got no answer in time (the driver's timer says so)."""
        self.transactions.cancel(pending.tid)
        self.counters["timeouts"] += 1
        self.table.failed(pending.node_id, pending.address[0], pending.address[1], now)

    def expire(self, now: float) -> None:
        self.peers.expire(now)
        self.items.expire(now)

    def status(self, now: float) -> dict:
        states = self.table.count(now)
        return {
            "node_id": self.own_id.hex(),
            "external_ip": self.external_ip,
            "nodes": len(self.table),
            "good": states["good"],
            "questionable": states["questionable"],
            "bad": states["bad"],
            "replacements": states["replacements"],
            "buckets": states["buckets"],
            "pending_queries": len(self.transactions),
            "stored_peers": len(self.peers),
            "stored_infohashes": self.peers.infohashes,
            "stored_items": len(self.items),
            "blocked_sources": len(self.dos.blocked(now)),
            **{k: self.counters[k] for k in COUNTERS},
        }


COUNTERS = ("packets_in", "packets_out", "bytes_in", "bytes_out", "queries_in", "answers_out",
            "errors_out", "queries_out", "replies_in", "errors_in", "timeouts", "dropped_oversize",
            "dropped_malformed", "ignored_blocked", "ignored_rate", "ignored_unexpected", "bad_tokens",
            "id_changes")

_PUT_ERRORS = {krpc.VALUE_TOO_BIG: "value too big", krpc.INVALID_SIGNATURE: "invalid signature",
               krpc.CAS_MISMATCH: "cas mismatch", krpc.SEQ_TOO_OLD: "sequence number less than current"}

