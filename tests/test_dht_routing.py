"""The k-bucket routing table against a slow reference (hypothesis), liveness, refresh, persistence."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from p2pfs.net.discovery.dht.krpc import NodeInfo
from p2pfs.net.discovery.dht.node_id import generate_id, is_local, verify_id
from p2pfs.net.discovery.dht.routing import (GOOD_FOR, ID_BITS, K, MAX_FAILS, REFRESH_AFTER, RoutingTable,
                                             decode_state, encode_state)

rng = random.Random(42)
OWN = rng.randbytes(20)
OWN_INT = int.from_bytes(OWN, "big")


def sharing(bits: int) -> bytes:
    """A random ID sharing exactly `bits` leading bits with OWN."""
    r = rng.getrandbits(ID_BITS)
    keep = ((1 << bits) - 1) << (ID_BITS - bits)
    flip = 1 << (ID_BITS - bits - 1)
    return ((OWN_INT & keep) | ((OWN_INT ^ flip) & flip) | (r & (flip - 1))).to_bytes(20, "big")


PUBLIC = [f"203.0.113.{100 + i}" for i in range(16)]
# IDs that overflow the first buckets (many share 0, 1 or 2 bits with OWN), a few deeper
# ones (splits), IDs that follow BEP 42 for public IPs and some that break it on the same IPs
LOOPBACK_IDS = [sharing(0) for _ in range(12)] + [sharing(1) for _ in range(12)] + \
    [sharing(2) for _ in range(10)] + [sharing(d) for d in range(3, 10) for _ in range(3)]
IDS = LOOPBACK_IDS + [generate_id(ip) for ip in PUBLIC] + [rng.randbytes(20) for _ in range(8)]
HOME = [(f"127.0.0.{i + 1}", 6000 + i) for i in range(len(LOOPBACK_IDS))] + \
    [(ip, 6881) for ip in PUBLIC] + [(PUBLIC[i], 7000) for i in range(8)]
ADDRS = HOME + [("127.0.9.9", 1), (PUBLIC[3], 9)]


# --- the slow reference: one flat list, buckets recomputed by scanning ----------------------

class Ref:
    def __init__(self):
        self.nbuckets = 1
        self.nodes: list[dict] = []
        self.repl: list[dict] = []

    def bucket(self, node_id: bytes) -> int:
        shared = ID_BITS - (int.from_bytes(node_id, "big") ^ OWN_INT).bit_length()
        return min(shared, self.nbuckets - 1)

    @staticmethod
    def state(e, now):
        if e["fails"] >= MAX_FAILS:
            return "bad"
        if e["reply"] is not None and (now - e["reply"] < GOOD_FOR
                                       or (e["query"] is not None and now - e["query"] < GOOD_FOR)):
            return "good"
        return "questionable"

    def members(self, b, pool):
        return [e for e in pool if self.bucket(e["id"]) == b]

    def ip_taken(self, host):
        return not is_local(host) and any(e["addr"][0] == host for e in self.nodes)

    def add_repl(self, e):
        b = self.bucket(e["id"])
        self.repl = [r for r in self.repl
                     if not (self.bucket(r["id"]) == b and (r["id"] == e["id"] or r["addr"] == e["addr"]))]
        self.repl.append(e)
        mine = self.members(b, self.repl)
        if len(mine) > K:
            unconfirmed = [r for r in mine if r["reply"] is None]
            self.repl.remove(unconfirmed[0] if unconfirmed else mine[0])

    def replace(self, old, new):
        self.nodes[self.nodes.index(old)] = new
        if new in self.repl:
            self.repl.remove(new)

    def insert(self, e, now):
        while True:
            b = self.bucket(e["id"])
            mine = self.members(b, self.nodes)
            if len(mine) < K:
                self.nodes.append(e)
                return
            if b == self.nbuckets - 1 and self.nbuckets < ID_BITS:
                self.nbuckets += 1
                continue
            bad = [m for m in mine if self.state(m, now) == "bad"]
            if bad:
                return self.replace(bad[0], e)
            unverified = [m for m in mine if not m["verified"]]
            if e["verified"] and unverified:
                return self.replace(min(unverified, key=lambda m: m["reply"] or 0.0), e)
            return self.add_repl(e)

    def heard_from(self, node_id, addr, now):
        known = [e for e in self.nodes if e["id"] == node_id]
        if known:
            if known[0]["addr"] == addr:
                known[0]["reply"], known[0]["fails"] = now, 0
            return
        self.nodes = [e for e in self.nodes if e["addr"] != addr]
        if self.ip_taken(addr[0]):
            return
        b = self.bucket(node_id)
        prev = next((r for r in self.members(b, self.repl) if r["id"] == node_id or r["addr"] == addr), None)
        exact = None
        if prev is not None:
            self.repl.remove(prev)
            exact = prev if prev["id"] == node_id and prev["addr"] == addr else None
        self.insert({"id": node_id, "addr": addr, "reply": now, "query": exact["query"] if exact else None,
                     "fails": 0, "verified": verify_id(node_id, addr[0])}, now)

    def heard_about(self, node_id, addr, now):
        known = [e for e in self.nodes if e["id"] == node_id]
        if known:
            if known[0]["addr"] == addr:
                known[0]["query"] = now
            return
        if any(e["addr"] == addr for e in self.nodes) or self.ip_taken(addr[0]):
            return
        for r in self.members(self.bucket(node_id), self.repl):
            if r["id"] == node_id or r["addr"] == addr:
                if r["id"] == node_id and r["addr"] == addr:
                    r["query"] = now
                return
        self.add_repl({"id": node_id, "addr": addr, "reply": None, "query": now, "fails": 0,
                       "verified": verify_id(node_id, addr[0])})

    def failed(self, node_id, addr, now):
        match = [e for e in self.nodes if (e["id"] == node_id if node_id is not None else e["addr"] == addr)]
        if match and match[0]["addr"] == addr:
            e = match[0]
            e["fails"] += 1
            if e["fails"] >= MAX_FAILS:
                ok = [r for r in self.members(self.bucket(e["id"]), self.repl) if r["reply"] is not None
                      and (r["addr"][0] == e["addr"][0] or not self.ip_taken(r["addr"][0]))]
                if ok:
                    self.replace(e, ok[-1])
            return
        if node_id is not None:
            b = self.bucket(node_id)
            self.repl = [r for r in self.repl if not (self.bucket(r["id"]) == b and r["addr"] == addr)]


def _same(table: RoutingTable, ref: Ref, now: float):
    assert len(table.buckets) == ref.nbuckets
    for i, b in enumerate(table.buckets):
        assert [(e.id, e.address) for e in b.nodes] == [(e["id"], e["addr"]) for e in ref.members(i, ref.nodes)]
        assert [(e.id, e.address, e.last_reply) for e in b.replacements] == \
            [(e["id"], e["addr"], e["reply"]) for e in ref.members(i, ref.repl)]
        assert len(b.nodes) <= K and len(b.replacements) <= K
        assert all(table.bucket_index(e.id) == i for e in b.nodes)
    assert {e.id: table.get(e.id).state(now) for e in table.entries()} == \
        {e["id"]: Ref.state(e, now) for e in ref.nodes}
    public = [e.host for e in table.entries() if not is_local(e.host)]
    assert len(public) == len(set(public))
    for target in (OWN, IDS[0], IDS[-1], bytes(20)):
        t = int.from_bytes(target, "big")
        live = sorted((e for e in ref.nodes if Ref.state(e, now) != "bad"),
                      key=lambda e: int.from_bytes(e["id"], "big") ^ t)
        assert [e.id for e in table.closest(target, K, now)] == [e["id"] for e in live[:K]]


# an address index of -1 is the ID's usual address (most operations), else any address
addr_index = st.one_of(st.just(-1), st.just(-1), st.just(-1), st.integers(0, len(ADDRS) - 1))
ops = st.lists(st.one_of(
    st.tuples(st.just("from"), st.integers(0, len(IDS) - 1), addr_index),
    st.tuples(st.just("from"), st.integers(0, len(IDS) - 1), addr_index),
    st.tuples(st.just("about"), st.integers(0, len(IDS) - 1), addr_index),
    st.tuples(st.just("fail"), st.integers(-1, len(IDS) - 1), addr_index),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 60.0, GOOD_FOR]), st.just(0)),
), min_size=30, max_size=250)


@settings(max_examples=250, deadline=None)
@given(ops)
def test_table_matches_slow_reference(operations):
    now = 1000.0
    table, ref = RoutingTable(OWN, now), Ref()
    for op, a, b in operations:
        if op == "tick":
            now += a
            continue
        node_id = IDS[a] if a >= 0 else None
        addr = ADDRS[b] if b >= 0 else HOME[a if a >= 0 else 0]
        if op == "from":
            table.heard_from(node_id, *addr, now)
            ref.heard_from(node_id, addr, now)
        elif op == "about":
            table.heard_about(node_id, *addr, now)
            ref.heard_about(node_id, addr, now)
        else:
            table.failed(node_id, *addr, now)
            ref.failed(node_id, addr, now)
        _same(table, ref, now)


# --- liveness -----------------------------------------------------------------------------

def test_liveness_follows_bep5():
    t = RoutingTable(OWN, 0.0)
    node = IDS[0]
    assert t.heard_from(node, "127.0.0.1", 5000, 0.0)
    e = t.get(node)
    assert e.state(GOOD_FOR - 1) == "good"
    assert e.state(GOOD_FOR) == "questionable"
    t.heard_about(node, "127.0.0.1", 5000, GOOD_FOR + 10)  # it queried us: good again
    assert e.state(GOOD_FOR + 10) == "good"
    for i in range(MAX_FAILS):
        assert e.state(GOOD_FOR + 11) != "bad"
        t.failed(node, "127.0.0.1", 5000, GOOD_FOR + 11)
    assert e.state(GOOD_FOR + 11) == "bad"
    assert t.closest(node, K, GOOD_FOR + 11) == []
    t.heard_from(node, "127.0.0.1", 5000, GOOD_FOR + 12)  # an answer clears the failures
    assert e.state(GOOD_FOR + 12) == "good"


def test_a_node_that_only_queried_us_waits_in_the_replacement_cache():
    t = RoutingTable(OWN, 0.0)
    t.heard_about(IDS[5], "127.0.0.3", 5000, 0.0)
    assert len(t) == 0
    pings = t.to_ping(1.0)
    assert [p.id for p in pings] == [IDS[5]]
    assert t.to_ping(2.0) == []  # not again at once
    t.heard_from(IDS[5], "127.0.0.3", 5000, 3.0)  # it answered the ping
    assert IDS[5] in t and sum(len(b.replacements) for b in t.buckets) == 0


def test_nobody_moves_a_known_node():
    t = RoutingTable(OWN, 0.0)
    t.heard_from(IDS[0], "127.0.0.1", 5000, 0.0)
    assert not t.heard_from(IDS[0], "127.0.0.9", 5000, 1.0)
    assert t.get(IDS[0]).address == ("127.0.0.1", 5000)


def test_one_node_per_public_ip_but_many_on_loopback():
    t = RoutingTable(OWN, 0.0)
    assert t.heard_from(IDS[0], "198.51.100.44", 1, 0.0)
    assert not t.heard_from(IDS[1], "198.51.100.44", 2, 0.0)
    assert t.heard_from(IDS[2], "127.0.0.1", 1, 0.0) and t.heard_from(IDS[3], "127.0.0.1", 2, 0.0)
    assert len(RoutingTable(OWN, 0.0, restrict_ips=False).buckets) == 1


def test_unusable_addresses_are_refused():
    t = RoutingTable(OWN, 0.0)
    for host, port in [("0.0.0.0", 1), ("224.0.0.1", 1), ("127.0.0.1", 0), ("240.0.0.1", 5), ("::1", 5)]:
        assert not t.heard_from(IDS[0], host, port, 0.0)
    assert not t.heard_from(OWN, "127.0.0.1", 5, 0.0)
    assert len(t) == 0


def test_questionable_nodes_are_pinged_least_recent_first():
    t = RoutingTable(OWN, 0.0)
    for i in range(4):
        t.heard_from(IDS[i * 4], f"127.0.0.{i + 1}", 5000, float(i))
    later = GOOD_FOR + 10
    assert [e.id for e in t.to_ping(later, limit=2)] == [IDS[0], IDS[4]]
    assert [e.id for e in t.to_ping(later, limit=2)] == [IDS[8], IDS[12]]


def test_bad_node_is_replaced_by_a_confirmed_replacement():
    t = RoutingTable(OWN, 0.0)
    far = [sharing(0) for _ in range(K + 1)]
    for i, node in enumerate(far):
        t.heard_from(node, f"127.0.1.{i + 1}", 5000, 0.0)
    assert len(t) == K + 0 or len(t) == K  # the ninth waits
    waiting = [n for n in far if n not in t]
    assert len(waiting) == 1
    victim = t.buckets[0].nodes[0]
    for _ in range(MAX_FAILS):
        t.failed(victim.id, victim.host, victim.port, 1.0)
    assert victim.id not in t and waiting[0] in t


# --- refresh --------------------------------------------------------------------------------

def test_refresh_targets_fall_in_their_buckets():
    t = RoutingTable(OWN, 0.0, randbytes=random.Random(1).randbytes)
    for i, node in enumerate(IDS[:40]):
        t.heard_from(node, f"127.0.2.{i + 1}", 5000, 0.0)
    assert len(t.buckets) > 3
    assert t.refresh_targets(REFRESH_AFTER - 1) == []
    targets = t.refresh_targets(REFRESH_AFTER)
    assert len(targets) == len(t.buckets)
    assert [t.bucket_index(x) for x in targets] == list(range(len(t.buckets)))
    assert t.refresh_targets(REFRESH_AFTER + 1) == []  # each counts as refreshed


def test_with_id_keeps_the_nodes():
    t = RoutingTable(OWN, 0.0)
    for i, node in enumerate(IDS[:20]):
        t.heard_from(node, f"127.0.3.{i + 1}", 5000, 0.0)
    new = t.with_id(bytes(20), 1.0)
    assert new.own_id == bytes(20)
    assert {e.id for e in new.entries()} <= {e.id for e in t.entries()}
    assert len(new) >= min(len(t), K)


# --- persistence --------------------------------------------------------------------------------

def test_state_round_trip_and_damage():
    nodes = [NodeInfo(IDS[i], f"127.0.0.{i + 1}", 6000 + i) for i in range(10)]
    data = encode_state(OWN, nodes, "203.0.113.5")
    assert decode_state(data) == (OWN, nodes, "203.0.113.5")
    assert decode_state(encode_state(OWN, nodes, None)) == (OWN, nodes, None)
    for bad in (b"", b"garbage", data[:-1], data + b"x", b"d2:id3:abce", b"x" * 70000,
                encode_state(OWN, nodes, None).replace(b"5:nodes260:", b"5:nodes259:")):
        assert decode_state(bad) is None
    zero_port = encode_state(OWN, [NodeInfo(IDS[0], "127.0.0.1", 0)] + nodes, None)
    assert decode_state(zero_port)[1] == nodes  # unusable saved nodes are dropped


def test_saved_nodes_are_those_that_answered():
    t = RoutingTable(OWN, 0.0)
    t.heard_from(IDS[0], "127.0.0.1", 1, 5.0)
    t.heard_from(IDS[4], "127.0.0.2", 1, 9.0)
    t.heard_about(IDS[8], "127.0.0.3", 1, 9.0)
    assert [n.id for n in t.saved_nodes(10.0)] == [IDS[4], IDS[0]]


@pytest.mark.parametrize("n", [0, 1, K - 1, K, K + 1, 300])
def test_table_size_is_bounded(n):
    t = RoutingTable(OWN, 0.0, randbytes=random.Random(n).randbytes)
    r = random.Random(n)
    for i in range(n):
        t.heard_from(r.randbytes(20), f"127.{i // 250}.{i % 250}.1", 5000, 0.0)
    assert len(t) == sum(len(b.nodes) for b in t.buckets) <= K * len(t.buckets)
    assert len(t) == min(n, len(t))
    if n <= K:
        assert len(t) == n


def _full_far_bucket(t: RoutingTable, hosts: list[tuple[str, float]]) -> list[bytes]:
    """Fill bucket 0 (IDs sharing no bit with OWN) with one node per (host, time)."""
    ids = []
    for i, (host, when) in enumerate(hosts):
        node = sharing(0)
        assert t.heard_from(node, host, 5000 + i, when)
        ids.append(node)
    return ids


def test_a_newcomer_takes_the_first_bad_slot():
    t = RoutingTable(OWN, 0.0)
    ids = _full_far_bucket(t, [(f"127.0.4.{i + 1}", 0.0) for i in range(K)])
    for victim in (ids[2], ids[5]):
        for _ in range(MAX_FAILS):
            e = t.get(victim)
            t.failed(victim, e.host, e.port, 1.0)
    newcomer = sharing(0)
    assert t.heard_from(newcomer, "127.0.4.99", 5000, 2.0)
    assert ids[2] not in t and ids[5] in t and t.buckets[0].nodes[2].id == newcomer


def test_a_bep42_node_pushes_out_the_least_recently_heard_unverified_one():
    t = RoutingTable(OWN, 0.0)
    hosts = [("198.51.100.101", 5.0), ("198.51.100.102", 3.0), ("198.51.100.103", 4.0)] + \
        [(f"127.0.5.{i + 1}", 1.0) for i in range(K - 3)]
    ids = _full_far_bucket(t, hosts)
    assert not any(t.get(i).verified for i in ids[:3])
    while True:  # a BEP 42 ID for a public IP that shares no bit with OWN
        newcomer = generate_id("192.0.2.99")
        if (int.from_bytes(newcomer, "big") ^ OWN_INT).bit_length() == ID_BITS:
            break
    assert t.heard_from(newcomer, "192.0.2.99", 5000, 6.0)
    assert ids[1] not in t and ids[0] in t and ids[2] in t
    unverified = sharing(0)  # an unverified newcomer waits instead
    assert not t.heard_from(unverified, "198.51.100.109", 5000, 7.0)
