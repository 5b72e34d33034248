"""LAN discovery, sans-IO: the packet format and the protocol state.

Theory of operation
-------------------
Nodes on one link talk UDP to a fixed multicast group (`GROUP`:`PORT`,
TTL 1).  There are three packets, all of one fixed layout (see
`encode_packet`): the sender's node key (its X25519 public key), a TCP
port and one to `MAX_KEYS` discovery keys.  A drive key never appears.

* **Announce** (multicast): "I accept peers on this port for these
  topics".  A node that listens announces every topic it serves once when
  it starts serving it, and all of them every `ANNOUNCE_INTERVAL` s
  (jittered), `ANNOUNCE_PACKETS` packets per round at most; a node with
  more topics rotates through them round by round.
* **Query** (multicast): "who serves these topics?".  A node queries a
  topic as soon as it joins it, again after 1, 2, 4, ... s (jittered,
  capped at `QUERY_MAX` s) while no node has answered or announced it,
  then every `QUERY_MAX` s.  Its port (0 when it does not listen) makes the
  querier a candidate for nodes that read the same topic.
* **Answer** (unicast to the query's source address and port): the topics
  of the query that the answerer serves.  An answer lists a subset of the
  query's keys behind the same header, so it is never larger than the
  query: a forged source address gains an attacker no amplification.

Every packet for a topic this node has joined yields a `Found` whose host
is the datagram's source address (never an address a packet claims) and
whose port and node key come from the packet; the node key is a claim
that the Noise handshake checks.  Packets carrying our own node key (our
multicast looped back) are ignored.

Bounds: a datagram is refused before decoding once its source host has
spent its token bucket (`SOURCE_RATE` per s, burst `SOURCE_BURST`); the
buckets are kept for at most `MAX_SOURCES` hosts (least recently heard
evicted), so a flood costs bounded CPU per datagram and bounded memory.
What we send is bounded too: multicast packets by one bucket
(`SEND_RATE`), answers by one bucket per querier host (`HOST_ANSWER_RATE`,
so one flooding querier cannot spend the answers due to others) and one
for all (`ANSWER_RATE`); what one receiver gets from us stays below what
it allows one source.  State grows only with the topics this node
joins itself.

The object never reads a clock or touches a socket: every call takes
`now` (seconds, any monotonic origin) and returns what to send; the
driver (`lan.LanSource`) calls `tick(now)` again at `deadline()`.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from ...errors import ProtocolError

GROUP = "239.192.76.40"  # IPv4 organization-local scope (RFC 2365); sent with TTL 1
PORT = 7641              # UDP; the TCP default is 7640

MAGIC = b"p2pfs/lan"
VERSION = 1
ANNOUNCE, QUERY, ANSWER = 1, 2, 3
KINDS = {ANNOUNCE: "announce", QUERY: "query", ANSWER: "answer"}
_RECEIVED = {ANNOUNCE: "announces_received", QUERY: "queries_received", ANSWER: "answers_received"}
KEY_BYTES = 32
MAX_KEYS = 32
_HEADER = struct.Struct(">9sBB32sHB")  # magic, version, kind, node key, port, key count
HEADER_BYTES = _HEADER.size            # 46
MAX_PACKET = HEADER_BYTES + MAX_KEYS * KEY_BYTES  # 1070: fits one datagram on any IPv4 or IPv6 link

ANNOUNCE_INTERVAL = 30.0
ANNOUNCE_PACKETS = 8      # per round: 256 topics
QUERY_FIRST = 1.0
QUERY_MAX = 60.0
JITTER = 0.2              # intervals are multiplied by uniform(1 - JITTER, 1 + JITTER)
SEND_RATE, SEND_BURST = 10.0, 20        # our multicast packets per s
ANSWER_RATE, ANSWER_BURST = 50.0, 100   # our unicast answers per s, to all hosts
HOST_ANSWER_RATE, HOST_ANSWER_BURST = 5.0, 20  # ... to one host
SOURCE_RATE, SOURCE_BURST = 50.0, 100   # datagrams per s we accept from one host
MAX_SOURCES = 1024


@dataclass(frozen=True, slots=True)
class Packet:
    """One LAN discovery packet (any kind)."""

    kind: int            # ANNOUNCE, QUERY or ANSWER
    node_key: bytes      # the sender's X25519 public key
    port: int            # TCP port the sender accepts peers on; 0 (queries only): not listening
    keys: tuple[bytes, ...]  # discovery keys, 1..MAX_KEYS, distinct


def encode_packet(packet: Packet) -> bytes:
    """The bytes of a packet.  Our own malformed packet is a bug (ValueError)."""
    if packet.kind not in KINDS:
        raise ValueError(f"unknown LAN packet kind {packet.kind}")
    if len(packet.node_key) != KEY_BYTES:
        raise ValueError("a node key is 32 bytes")
    if not (0 if packet.kind == QUERY else 1) <= packet.port <= 65535:
        raise ValueError(f"port {packet.port} out of range for a {KINDS[packet.kind]}")
    if not 1 <= len(packet.keys) <= MAX_KEYS or len(set(packet.keys)) != len(packet.keys):
        raise ValueError(f"a LAN packet carries 1 to {MAX_KEYS} distinct discovery keys")
    if any(len(k) != KEY_BYTES for k in packet.keys):
        raise ValueError("a discovery key is 32 bytes")
    return _HEADER.pack(MAGIC, VERSION, packet.kind, packet.node_key, packet.port,
                        len(packet.keys)) + b"".join(packet.keys)


def decode_packet(data: bytes) -> Packet:
    """Parse a datagram from the network.  Raises only ProtocolError.

    A version-1 packet must be exactly as long as its keys make it; a packet
    of a later version is read as version 1 and what follows is ignored
    (later versions only append)."""
    if len(data) > MAX_PACKET:
        raise ProtocolError(f"LAN packet of {len(data)} bytes exceeds {MAX_PACKET}")
    if len(data) < HEADER_BYTES:
        raise ProtocolError(f"LAN packet of {len(data)} bytes is shorter than its header")
    magic, version, kind, node_key, port, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("not a p2pfs LAN packet (bad magic)")
    if version < 1:
        raise ProtocolError(f"LAN packet version {version} is invalid")
    if kind not in KINDS:
        raise ProtocolError(f"unknown LAN packet kind {kind}")
    if not 1 <= count <= MAX_KEYS:
        raise ProtocolError(f"LAN packet with {count} discovery keys (1 to {MAX_KEYS} allowed)")
    end = HEADER_BYTES + count * KEY_BYTES
    if len(data) < end or (version == VERSION and len(data) != end):
        raise ProtocolError(f"LAN packet of {len(data)} bytes does not match its {count} keys")
    if port == 0 and kind != QUERY:
        raise ProtocolError(f"LAN {KINDS[kind]} with port 0")
    keys = tuple(bytes(data[i:i + KEY_BYTES]) for i in range(HEADER_BYTES, end, KEY_BYTES))
    if len(set(keys)) != count:
        raise ProtocolError("LAN packet lists a discovery key twice")
    return Packet(kind, bytes(node_key), port, keys)


# --------------------------------------------------------------------------
# rate limits


_EPSILON = 1e-9  # a token refilled to 0.9999999 by float arithmetic counts


class TokenBucket:
    """`rate` tokens per second, at most `burst` held; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self._refill(now)
        if self.tokens >= 1 - _EPSILON:
            self.tokens = max(0.0, self.tokens - 1)
            return True
        return False

    def ready_at(self, now: float) -> float:
        """The earliest time at which `take` succeeds (so a driver woken then does not spin)."""
        self._refill(now)
        return now if self.tokens >= 1 - _EPSILON else self.stamp + (1 - self.tokens) / self.rate


class SourceLimiter:
    """One token bucket per source host, for at most `max_sources` hosts
    (the least recently heard is forgotten: it starts full again)."""

    def __init__(self, rate: float = SOURCE_RATE, burst: float = SOURCE_BURST,
                 max_sources: int = MAX_SOURCES):
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, host: str, now: float) -> bool:
        bucket = self._buckets.pop(host, None)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                del self._buckets[next(iter(self._buckets))]
            bucket = TokenBucket(self.rate, self.burst, now)
        self._buckets[host] = bucket  # most recent last
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


# --------------------------------------------------------------------------
# the protocol


@dataclass(frozen=True, slots=True)
class Found:
    """A node on the link says it serves (or reads, and listens for) a topic we joined."""

    discovery_key: bytes
    host: str           # the datagram's source address
    port: int
    node_key: bytes


@dataclass(frozen=True, slots=True)
class Send:
    """A datagram to send: to `to` (host, port), or to the group on every interface if None."""

    data: bytes
    to: tuple[str, int] | None = None


class _Topic:
    __slots__ = ("announce", "interval", "next_query")

    def __init__(self, announce: bool, now: float):
        self.announce = announce
        self.next_query = now
        self.interval = QUERY_FIRST


class LanProtocol:
    """The LAN discovery state of one node (see the module docstring)."""

    def __init__(self, node_key: bytes, *, now: float = 0.0, rng: random.Random | None = None):
        if len(node_key) != KEY_BYTES:
            raise ValueError("a node key is 32 bytes")
        self.node_key = node_key
        self.port: int | None = None
        self._rng = rng or random.Random()
        self._topics: dict[bytes, _Topic] = {}
        self._fresh: dict[bytes, None] = {}     # announced topics not yet announced (ordered)
        self._round: list[list[bytes]] = []     # key chunks of the announce round in progress
        self._cursor = 0                        # where the next round starts in the sorted topics
        self._next_round: float | None = None   # None: nothing to announce
        self._send_budget = TokenBucket(SEND_RATE, SEND_BURST, now)
        self._answer_budget = TokenBucket(ANSWER_RATE, ANSWER_BURST, now)
        self._sources = SourceLimiter()
        self._answered = SourceLimiter(HOST_ANSWER_RATE, HOST_ANSWER_BURST)
        self.counters = dict.fromkeys(
            ("received", "rate_limited", "malformed", "own", "found",
             "announces_received", "queries_received", "answers_received",
             "announces_sent", "queries_sent", "answers_sent", "answers_dropped"), 0)

    # what the node wants ------------------------------------------------------

    def join(self, discovery_key: bytes, *, announce: bool, now: float) -> None:
        """Look the topic up from now on; serve (announce and answer) it if `announce`."""
        if len(discovery_key) != KEY_BYTES:
            raise ValueError("a discovery key is 32 bytes")
        topic = self._topics.get(discovery_key)
        if topic is None:
            self._topics[discovery_key] = _Topic(announce, now)
        elif topic.announce == announce:
            return
        else:
            topic.announce = announce
        if announce:
            self._fresh[discovery_key] = None
            self._schedule_rounds(now)
        else:
            self._fresh.pop(discovery_key, None)

    def leave(self, discovery_key: bytes) -> None:
        self._topics.pop(discovery_key, None)
        self._fresh.pop(discovery_key, None)

    def set_port(self, port: int | None, now: float) -> None:
        """The TCP port we accept peers on; None: we do not listen, so we neither announce nor answer."""
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        if port == self.port:
            return
        self.port = port
        self._round = []
        self._next_round = None
        if port is not None:
            self._fresh = {k: None for k, t in self._topics.items() if t.announce}
            self._schedule_rounds(now)

    def network_changed(self, now: float) -> None:
        """An interface came up: announce and query everything again soon."""
        for topic in self._topics.values():
            topic.next_query, topic.interval = now, QUERY_FIRST
        if self._next_round is not None:
            self._next_round = now

    def _schedule_rounds(self, now: float) -> None:
        if self._next_round is None and self.port is not None:
            self._next_round = now + self._jittered(ANNOUNCE_INTERVAL)

    def _jittered(self, seconds: float) -> float:
        return seconds * self._rng.uniform(1 - JITTER, 1 + JITTER)

    # timers -------------------------------------------------------------------

    def tick(self, now: float) -> list[Send]:
        """Announcements and queries due by `now`, as far as the send budget allows."""
        out: list[Send] = []
        while self._send_budget.ready_at(now) <= now:
            packet = self._next_multicast(now)
            if packet is None:
                break
            self._send_budget.take(now)
            out.append(Send(encode_packet(packet)))
        return out

    def deadline(self, now: float) -> float:
        """When `tick` has something to send next (may be <= now; inf if never)."""
        due = min((t.next_query for t in self._topics.values()), default=float("inf"))
        if self.port is not None and (self._fresh or self._round):
            due = now
        elif self._next_round is not None:
            due = min(due, self._next_round)
        return max(due, self._send_budget.ready_at(now))

    def _next_multicast(self, now: float) -> Packet | None:
        if self.port is not None:
            if self._fresh:
                keys = list(self._fresh)[:MAX_KEYS]
                for key in keys:
                    del self._fresh[key]
                return self._announce(keys)
            if not self._round and self._next_round is not None and self._next_round <= now:
                self._start_round(now)
            while self._round:
                keys = [k for k in self._round.pop(0) if (t := self._topics.get(k)) is not None and t.announce]
                if keys:  # (topics left since the round began are dropped)
                    return self._announce(keys)
        return self._query(now)

    def _announce(self, keys: list[bytes]) -> Packet:
        self.counters["announces_sent"] += 1
        return Packet(ANNOUNCE, self.node_key, self.port, tuple(keys))

    def _start_round(self, now: float) -> None:
        served = sorted(k for k, t in self._topics.items() if t.announce)
        if not served:
            self._next_round = None  # until a topic is served again
            return
        self._next_round = now + self._jittered(ANNOUNCE_INTERVAL)
        start = self._cursor % len(served)
        ordered = served[start:] + served[:start]
        taken = ordered[:ANNOUNCE_PACKETS * MAX_KEYS]
        self._cursor = (start + len(taken)) % len(served)
        self._round = [taken[i:i + MAX_KEYS] for i in range(0, len(taken), MAX_KEYS)]

    def _query(self, now: float) -> Packet | None:
        due = sorted((t.next_query, k) for k, t in self._topics.items() if t.next_query <= now)
        if not due:
            return None
        keys = [k for _, k in due[:MAX_KEYS]]
        factor = self._rng.uniform(1 - JITTER, 1 + JITTER)  # one draw: keys asked together stay together
        for key in keys:
            topic = self._topics[key]
            topic.next_query = now + topic.interval * factor
            topic.interval = min(2 * topic.interval, QUERY_MAX)
        self.counters["queries_sent"] += 1
        return Packet(QUERY, self.node_key, self.port or 0, tuple(keys))

    # input --------------------------------------------------------------------

    def datagram_received(self, data: bytes, host: str, port: int, now: float) -> list[Found | Send]:
        """Handle one datagram from (host, port).  Never raises on its content:
        a malformed or rate-limited datagram is counted and dropped."""
        self.counters["received"] += 1
        if not self._sources.allow(host, now):
            self.counters["rate_limited"] += 1
            return []
        try:
            packet = decode_packet(data)
        except ProtocolError:
            self.counters["malformed"] += 1
            return []
        if packet.node_key == self.node_key:
            self.counters["own"] += 1
            return []
        self.counters[_RECEIVED[packet.kind]] += 1
        out: list[Found | Send] = []
        if packet.kind != QUERY or packet.port:
            for key in packet.keys:
                topic = self._topics.get(key)
                if topic is None:
                    continue
                out.append(Found(key, host, packet.port, packet.node_key))
                if packet.kind != QUERY and topic.interval < QUERY_MAX:
                    topic.interval = QUERY_MAX  # answered: back to the slow pace
                    topic.next_query = now + self._jittered(QUERY_MAX)
        self.counters["found"] += len(out)
        if packet.kind == QUERY:
            answer = self._answer(packet, host, port, now)
            if answer is not None:
                out.append(Send(answer, (host, port)))
        return out

    def _answer(self, query: Packet, query_host: str, port: int, now: float) -> bytes | None:
        if self.port is None or port == 0:
            return None
        served = tuple(k for k in query.keys if (t := self._topics.get(k)) is not None and t.announce)
        if not served:
            return None
        if not (self._answered.allow(query_host, now) and self._answer_budget.take(now)):
            self.counters["answers_dropped"] += 1
            return None
        self.counters["answers_sent"] += 1
        return encode_packet(Packet(ANSWER, self.node_key, self.port, served))

    def status(self) -> dict:
        return {
            "topics": len(self._topics),
            "served": sum(1 for t in self._topics.values() if t.announce),
            "port": self.port,
            "sources": len(self._sources),
            **self.counters,
        }
