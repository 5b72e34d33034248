"""Lookups (sans-IO) over a simulated network: convergence, α, termination, hostile answers."""

from __future__ import annotations

import random

import pytest

from p2pfs import crypto
from p2pfs.net.discovery.dht import traversal
from p2pfs.net.discovery.dht.items import sign_item
from p2pfs.net.discovery.dht.krpc import NodeInfo, Response
from p2pfs.net.discovery.dht.routing import K


class Net:
    """`n` honest nodes on public addresses; each answers with the K nodes nearest the target."""

    def __init__(self, n: int, seed: int = 1, dead: float = 0.0):
        self.rng = random.Random(seed)
        self.nodes = [NodeInfo(self.rng.randbytes(20), f"198.18.{i // 250}.{i % 250 + 1}", 6881) for i in range(n)]
        self.by_address = {x.address: x for x in self.nodes}
        self.dead = {x.address for x in self.nodes if self.rng.random() < dead}

    def nearest(self, target: bytes, n: int = K, live_only: bool = False) -> list[NodeInfo]:
        t = int.from_bytes(target, "big")
        pool = [x for x in self.nodes if not live_only or x.address not in self.dead]
        return sorted(pool, key=lambda x: int.from_bytes(x.id, "big") ^ t)[:n]

    def answer(self, lookup, candidate) -> Response | None:
        if candidate.address in self.dead:
            return None
        me = self.by_address[candidate.address]
        # the K nearest live nodes, and the dead ones among the K nearest: tables hold dead nodes too
        nodes = self.nearest(lookup.target, live_only=True) + \
            [x for x in self.nearest(lookup.target) if x.address in self.dead]
        return Response(b"t", me.id, nodes=tuple(nodes), token=b"tok" + me.id[:2])


def drive(lookup, answer, *, shuffle: random.Random | None = None) -> int:
    """Run a lookup to its end, answering in a random order; returns the most in flight at once."""
    most, flying = 0, []
    while not lookup.done:
        flying += lookup.next_queries()
        most = max(most, lookup.in_flight)
        assert lookup.in_flight == len(flying) <= lookup.alpha
        if not flying:
            break
        c = flying.pop(shuffle.randrange(len(flying)) if shuffle else 0)
        r = answer(lookup, c)
        if r is None:
            lookup.fail(c.address)
        else:
            lookup.reply(c.address, r)
    assert lookup.done and lookup.in_flight == 0
    return most


@pytest.mark.parametrize("seed", range(5))
def test_find_node_converges_to_the_k_nearest(seed):
    net = Net(2000, seed)
    target = net.rng.randbytes(20)
    lookup = traversal.FindNode(target, net.rng.sample(net.nodes, 3))
    assert drive(lookup, net.answer, shuffle=random.Random(seed)) == traversal.ALPHA
    assert [c.id for c in lookup.closest()] == [x.id for x in net.nearest(target)]
    assert lookup.queries < 60


def test_dead_nodes_are_worked_around():
    net = Net(1000, 9, dead=0.25)
    target = net.rng.randbytes(20)
    live_seeds = [x for x in net.nodes if x.address not in net.dead][:3]
    lookup = traversal.FindNode(target, live_seeds)
    drive(lookup, net.answer)
    assert [c.id for c in lookup.closest()] == [x.id for x in net.nearest(target, live_only=True)]
    assert lookup.failures > 0


def test_bootstrap_addresses_without_ids():
    net = Net(300, 4)
    target = net.rng.randbytes(20)
    lookup = traversal.FindNode(target, [(None, net.nodes[0].address)])
    drive(lookup, net.answer)
    assert [c.id for c in lookup.closest()] == [x.id for x in net.nearest(target)]


def test_endless_fresh_garbage_still_terminates():
    rng = random.Random(5)
    target = rng.randbytes(20)

    bits = iter(range(150, 0, -1))

    def liar(lookup, c):  # every answer names 8 never-seen nodes, each time closer to the target
        t, b = int.from_bytes(target, "big"), next(bits)
        nodes = tuple(NodeInfo((t ^ (1 << b) ^ rng.getrandbits(b)).to_bytes(20, "big"),
                               f"198.19.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.randrange(1, 65536))
                      for _ in range(8))
        return Response(b"t", c.id if c.id else rng.randbytes(20), nodes=nodes)

    lookup = traversal.FindNode(target, [(None, ("198.51.100.1", 1))])
    drive(lookup, liar)
    assert lookup.queries == traversal.MAX_QUERIES
    assert len(lookup._sorted) <= traversal.MAX_CANDIDATES


def test_hostile_node_lists_are_filtered():
    own = bytes(20)
    lookup = traversal.FindNode(bytes([1]) * 20, [(None, ("198.51.100.1", 6881))], own_id=own)
    c, = lookup.next_queries()
    junk = (NodeInfo(b"\x01" * 20, "127.0.0.1", 53),     # our loopback, from a stranger
            NodeInfo(b"\x02" * 20, "192.168.1.1", 80),   # our LAN, from a stranger
            NodeInfo(b"\x03" * 20, "198.51.100.9", 0),        # port 0
            NodeInfo(b"\x04" * 20, "224.0.0.1", 5),      # multicast
            NodeInfo(b"\x05" * 20, "0.0.0.0", 5),
            NodeInfo(own, "198.51.100.7", 5),                 # ourselves
            NodeInfo(b"\x06" * 20, "198.51.100.8", 6881))     # fine
    lookup.reply(c.address, Response(b"t", b"\x07" * 20, nodes=junk))
    assert [x.address for x in lookup._sorted if x.state == traversal.NEW] == [("198.51.100.8", 6881)]
    assert lookup.rejected_nodes == 5
    # from a local source, local nodes are fine (a LAN or loopback DHT)
    local = traversal.FindNode(bytes(20), [(None, ("127.0.0.2", 1))])
    c, = local.next_queries()
    local.reply(c.address, Response(b"t", b"\x07" * 20, nodes=junk[:2]))
    assert local.rejected_nodes == 0


def test_an_answer_from_another_id_fails_the_candidate():
    lookup = traversal.FindNode(bytes(20), [NodeInfo(b"\x01" * 20, "198.51.100.1", 1)])
    c, = lookup.next_queries()
    lookup.reply(c.address, Response(b"t", b"\x02" * 20))
    assert c.state == traversal.FAILED and lookup.done and lookup.closest() == []
    lookup.reply(c.address, Response(b"t", b"\x01" * 20))  # a late second answer changes nothing
    assert c.state == traversal.FAILED


def test_get_peers_collects_bounded_usable_peers_and_tokens():
    net = Net(200, 2)
    target = net.rng.randbytes(20)
    holders = {x.address for x in net.nearest(target, 3)}

    def answer(lookup, c):
        r = net.answer(lookup, c)
        if c.address in holders:
            values = tuple((f"198.19.{i}.{j}", 7640) for i in range(30) for j in range(1, 10)) + (("192.0.2.99", 0),)
            r = Response(r.t, r.id, nodes=r.nodes, values=values, token=r.token)
        return r

    lookup = traversal.GetPeers(target, net.nodes[:3])
    drive(lookup, answer)
    assert len(lookup.peers) == 270 and ("192.0.2.99", 0) not in lookup.peers
    assert len(lookup.closest(K, with_token=True)) == K


def test_get_item_keeps_the_highest_valid_seq():
    public, seed = crypto.generate_keypair()
    _, other_seed = crypto.generate_keypair()
    good = {seq: sign_item(seed, b"p2pfs", seq, b"2:v%d" % seq) for seq in (3, 5, 6)}
    net = Net(100, 3)
    target = good[3].target
    by_node = {}
    order = net.nearest(target, 20)
    answers = [good[3], good[5], good[5], sign_item(other_seed, b"p2pfs", 99, b"1:x"),  # other signer
               good[6]]
    for node, item in zip(order, answers):
        by_node[node.address] = item
    forged_seq = order[5].address  # seq 100 with a signature over seq 6

    def answer(lookup, c):
        r = net.answer(lookup, c)
        item = by_node.get(c.address)
        if c.address == forged_seq:
            return Response(r.t, r.id, nodes=r.nodes, token=r.token, k=public, seq=100, sig=good[6].signature,
                            v=good[6].value)
        if item is None:
            return r
        return Response(r.t, r.id, nodes=r.nodes, token=r.token, k=item.key, seq=item.seq, sig=item.signature,
                        v=item.value)

    lookup = traversal.GetItem(public, b"p2pfs", target, net.nodes[:3])
    drive(lookup, answer)
    assert lookup.item == good[6] and lookup.invalid_items == 2
    refuse_6 = traversal.GetItem(public, b"p2pfs", target, net.nodes[:3], accept=lambda item: item.seq != 6)
    drive(refuse_6, answer)
    assert refuse_6.item == good[5] and refuse_6.copies == 2


def test_store_round_counts_acks():
    cands = [traversal.Candidate(bytes([i]) * 20, (f"198.51.100.{i}", 1), i) for i in range(1, 4)]
    r = traversal.StoreRound(cands)
    r.reply(("198.51.100.1", 1), True)
    r.reply(("198.51.100.1", 1), True)   # once per node
    r.reply(("198.51.100.2", 1), False)
    r.reply(("192.0.2.99", 1), True)   # not asked
    assert not r.done and r.acks == 1 and r.errors == 1
    r.reply(("198.51.100.3", 1), True)
    assert r.done and r.acks == 2
