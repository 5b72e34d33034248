"""Peers and BEP 44 items stored for others: bounds, expiry, BEP 44's rules."""

from __future__ import annotations

import random

from p2pfs import crypto
from p2pfs.net.discovery.dht import krpc
from p2pfs.net.discovery.dht.items import MutableItem, immutable_target, sign_item
from p2pfs.net.discovery.dht.storage import ITEM_TTL, PEER_TTL, ItemStore, PeerStore

IH = [bytes([i]) * 20 for i in range(10)]


def test_peers_expire():
    s = PeerStore()
    s.announce(IH[0], ("192.0.2.11", 80), 0.0)
    s.announce(IH[0], ("192.0.2.12", 80), 100.0)
    assert sorted(s.get(IH[0], 1.0)) == [("192.0.2.11", 80), ("192.0.2.12", 80)]
    assert s.get(IH[0], PEER_TTL + 1) == [("192.0.2.12", 80)]   # lazily hidden
    s.expire(PEER_TTL + 1)
    assert len(s) == 1
    s.expire(PEER_TTL + 200)
    assert len(s) == 0 and s.infohashes == 0
    s.announce(IH[1], ("192.0.2.11", 80), 0.0)
    s.announce(IH[1], ("192.0.2.11", 80), PEER_TTL - 1)         # a re-announce extends
    assert s.get(IH[1], PEER_TTL + 1) == [("192.0.2.11", 80)] and len(s) == 1


def test_peer_store_bounds():
    s = PeerStore(max_per_infohash=4, max_infohashes=3, max_peers=10)
    for i in range(6):
        s.announce(IH[0], (f"192.0.2.{100 + i}", 80), float(i))
    assert sorted(s.get(IH[0], 10.0)) == [(f"192.0.2.{100 + i}", 80) for i in range(2, 6)]  # oldest went
    for j in range(1, 5):
        s.announce(IH[j], ("192.0.2.22", 80), 10.0)
    assert s.infohashes == 3 and s.get(IH[1], 11.0) == []    # least recently announced went
    big = PeerStore(max_per_infohash=100, max_infohashes=100, max_peers=10)
    for j in range(5):
        for i in range(5):
            big.announce(IH[j], (f"198.51.100.{i}", 80), 0.0)
    assert len(big) <= 10 and big.get(IH[4], 1.0)


def test_peer_replies_are_bounded_samples():
    s = PeerStore()
    for i in range(128):
        s.announce(IH[0], (f"198.18.{i}.1", 80), 0.0)
    got = s.get(IH[0], 1.0, limit=50, rng=random.Random(3))
    assert len(got) == len(set(got)) == 50
    assert s.get(IH[9], 1.0) == []


def _items(seed, salt=b"p2pfs"):
    return [sign_item(seed, salt, seq, b"3:v%02d" % seq) for seq in range(5)]


def test_item_store_follows_bep44():
    pk, seed = crypto.generate_keypair()
    s = ItemStore()
    items = _items(seed)
    assert s.put_mutable(items[2], 0.0) is None
    assert s.put_mutable(items[1], 1.0) == krpc.SEQ_TOO_OLD                 # older: refused
    same_seq_other_value = sign_item(seed, b"p2pfs", 2, b"3:zzz")
    assert s.put_mutable(same_seq_other_value, 1.0) == krpc.SEQ_TOO_OLD
    assert s.put_mutable(items[3], 2.0, cas=1) == krpc.CAS_MISMATCH
    assert s.put_mutable(items[3], 2.0, cas=2) is None
    forged = MutableItem(pk, b"p2pfs", 4, b"3:v04", bytes(64))
    assert s.put_mutable(forged, 3.0) == krpc.INVALID_SIGNATURE
    assert s.get(items[0].target, 3.0).item == items[3]
    assert s.put_mutable(items[3], ITEM_TTL) is None                           # same: refreshes
    assert s.get(items[0].target, ITEM_TTL + 10).item == items[3]
    s.expire(2 * ITEM_TTL + 1)
    assert s.get(items[0].target, 2 * ITEM_TTL + 1) is None and len(s) == 0


def test_item_store_bounds_and_immutable_items():
    s = ItemStore(max_items=3)
    for _ in range(5):
        s.put_mutable(_items(crypto.generate_keypair()[1])[0], 0.0)
    assert len(s) == 3
    assert s.put_immutable(b"5:hello", 1.0) is None
    assert s.get(immutable_target(b"5:hello"), 1.0).value == b"5:hello" and len(s) == 3
    assert s.put_immutable(b"x" * 1001, 1.0) == krpc.VALUE_TOO_BIG
