"""Interop with an independent Mainline DHT: libtorrent's Python bindings, on loopback.

libtorrent runs its DHT only (no LSD, UPnP, NAT-PMP, no default routers),
listens on 127.0.0.1 and bootstraps from our loopback nodes; its per-IP
restrictions are off because every node here is on 127/8.  Run inside a
loopback-only network namespace (as scripts/test does).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import bencode2
import pytest
import trio

from p2pfs import crypto
from p2pfs.net.discovery.dht.items import MutableItem
from p2pfs.net.discovery.dht.node import DhtNode
from p2pfs.net.discovery.dht_source import HEAD_SALT, DhtSource, head_dht_signature, head_value

from test_dht import until

lt = pytest.importorskip("libtorrent")

SETTINGS = {
    "listen_interfaces": "127.0.0.1:0",
    "enable_dht": True,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "dht_bootstrap_nodes": "",
    "dht_restrict_routing_ips": False,
    "dht_restrict_search_ips": False,
}


class Alerts:
    """libtorrent's alerts, polled; `wait` returns the first one matching."""

    def __init__(self, session):
        self.session = session
        self.seen: list = []

    async def wait(self, predicate, timeout: float = 30.0, what: str = "alert"):
        with trio.move_on_after(timeout):
            while True:
                self.seen += self.session.pop_alerts()
                for alert in self.seen:
                    if predicate(alert):
                        self.seen.remove(alert)
                        return alert
                await trio.sleep(0.05)
        raise AssertionError(f"libtorrent sent no {what}; saw {[a.message()[:80] for a in self.seen[-5:]]}")


@asynccontextmanager
async def network(n: int = 8):
    """`n` p2pfs nodes on 127.0.0.40.. and a libtorrent session bootstrapped from them."""
    session = lt.session({**SETTINGS, "alert_mask": lt.alert_category.dht | lt.alert_category.dht_operation
                          | lt.alert_category.error})
    try:
        async with trio.open_nursery() as nursery:
            nodes = [DhtNode(bind=("127.0.0.40", 0), bootstrap=[], timeout=1.0)]
            await nursery.start(nodes[0].run)
            for i in range(1, n):
                node = DhtNode(bind=(f"127.0.0.{40 + i}", 0), bootstrap=[nodes[0].address], timeout=1.0)
                await nursery.start(node.run)
                nodes.append(node)
            for node in nodes[:3]:
                session.add_dht_node(node.address)
            alerts = Alerts(session)
            await until(lambda: all(len(x.engine.table) >= 4 for x in nodes), what="p2pfs tables")
            yield nodes, session, alerts
            nursery.cancel_scope.cancel()
    finally:
        session.pause()
        del session


async def test_libtorrent_finds_a_p2pfs_announce():
    async with network() as (nodes, session, alerts):
        info_hash = os.urandom(20)
        assert (await nodes[2].announce(info_hash, 7640)).stored >= 4
        session.dht_get_peers(lt.sha1_hash(info_hash))
        reply = await alerts.wait(lambda a: isinstance(a, lt.dht_get_peers_reply_alert)
                                  and a.info_hash.to_bytes() == info_hash, what="get_peers reply")
        assert (nodes[2].address[0], 7640) in reply.peers()


async def test_p2pfs_finds_a_libtorrent_announce():
    async with network() as (nodes, session, alerts):
        info_hash = os.urandom(20)
        session.dht_announce(lt.sha1_hash(info_hash), 6999, 0)
        # libtorrent sends no alert when its announce is done: ask until it is there
        with trio.move_on_after(30):
            while ("127.0.0.1", 6999) not in await nodes[5].get_peers(info_hash):
                await trio.sleep(0.2)
        assert ("127.0.0.1", 6999) in await nodes[5].get_peers(info_hash)


async def test_libtorrent_reads_and_verifies_a_p2pfs_head():
    drive_key, seed = crypto.generate_keypair()
    length, root = 77, os.urandom(32)
    signature = crypto.sign_head(seed, drive_key, length, root)
    async with network() as (nodes, session, alerts):
        source = DhtSource(nodes[1])
        assert await source.put_head(drive_key, length, root, signature,
                                     head_dht_signature(seed, length, root, signature)) >= 4
        blind = crypto.blinded_key(drive_key)  # the DHT never sees the drive key
        session.dht_get_mutable_item(blind, HEAD_SALT)
        alert = await alerts.wait(lambda a: isinstance(a, lt.dht_mutable_item_alert) and a.key == blind
                                  and a.seq > 0, what="mutable item")
        # libtorrent checked the BEP 44 signature before handing it over; check it and ours again
        value = bencode2.bencode(alert.item)
        assert alert.seq == length and alert.salt == HEAD_SALT and value == head_value(length, root, signature)
        crypto.verify_bep44(blind, alert.salt, alert.seq, value, alert.signature)
        raw = alert.item
        assert int.from_bytes(raw[:8], "little") == length and raw[8:40] == root
        crypto.verify_head(drive_key, length, root, raw[40:])


async def test_p2pfs_reads_and_verifies_items_libtorrent_put():
    drive_key, seed = crypto.generate_keypair()
    root = os.urandom(32)
    # libtorrent's put takes the next seq after what it finds: 1 for a new item, so the
    # head it carries is for length 1
    signature = crypto.sign_head(seed, drive_key, 1, root)
    raw = (1).to_bytes(8, "little") + root + signature
    async with network() as (nodes, session, alerts):
        # libtorrent signs with the drive's blinded secret, under its blinded key
        blind = crypto.blinded_key(drive_key)
        session.dht_put_mutable_item(crypto.blinded_secret(seed), blind, raw, HEAD_SALT)
        done = await alerts.wait(lambda a: isinstance(a, lt.dht_put_alert), what="put alert")
        assert done.num_success >= 4
        item = await nodes[6].get_mutable(blind, HEAD_SALT)
        assert isinstance(item, MutableItem) and item.seq == 1 and item.value == b"104:" + raw
        item.verify()
        head = await DhtSource(nodes[4]).get_head(drive_key)
        assert head == (1, root, signature, item.signature)
        # an item that is not a p2pfs head (arbitrary data) is read, but is no head
        other_key, other_seed = crypto.generate_keypair()
        other_blind = crypto.blinded_key(other_key)
        session.dht_put_mutable_item(crypto.blinded_secret(other_seed), other_blind, b"not a head",
                                     HEAD_SALT)
        await alerts.wait(lambda a: isinstance(a, lt.dht_put_alert) and a.public_key == other_blind,
                          what="second put alert")
        assert (await nodes[3].get_mutable(other_blind, HEAD_SALT)).value == b"10:not a head"
        assert await DhtSource(nodes[3]).get_head(other_key) is None
