"""The DHT discovery source: topics looked up and announced, heads as BEP 44 items.

Real UDP on loopback (run under `unshare -n`, as scripts/test does); the
head item checks are pure.
"""

from __future__ import annotations

import os

import pytest
import trio

from p2pfs import crypto
from p2pfs.errors import VerificationError
from p2pfs.net.discovery import Candidate
from p2pfs.net.discovery.dht.items import MutableItem, sign_item
from p2pfs.net.discovery.dht.node import DhtNode
from p2pfs.net.discovery.dht_source import (HEAD_SALT, DhtSource, head_dht_signature, head_value, info_hash,
                                            parse_head_item)

from test_dht import Swarm, until


def head(seed: bytes, key: bytes, length: int, root: bytes | None = None):
    root = root or os.urandom(32)
    signature = crypto.sign_head(seed, key, length, root)
    return length, root, signature, head_dht_signature(seed, length, root, signature)


# --- the head item ------------------------------------------------------------------------

def test_head_item_layout_and_checks():
    key, seed = crypto.generate_keypair()
    length, root, signature, dht_signature = head(seed, key, 12)
    value = head_value(length, root, signature)
    assert value[:4] == b"104:" and len(value) == 108
    assert value[4:12] == (12).to_bytes(8, "little") and value[12:44] == root and value[44:] == signature
    blind = crypto.blinded_key(key)
    item = MutableItem(blind, HEAD_SALT, length, value, dht_signature)
    assert parse_head_item(key, item) == (length, root, signature)
    other_key, other_seed = crypto.generate_keypair()
    wrong = [
        MutableItem(other_key, HEAD_SALT, length, value, dht_signature),             # another key
        MutableItem(blind, b"other", length, value, dht_signature),                  # another salt
        MutableItem(blind, HEAD_SALT, length, value, bytes(64)),                     # bad BEP 44 signature
        MutableItem(key, HEAD_SALT, length, value, dht_signature),                   # the unblinded key
        sign_item(seed, HEAD_SALT, 13, value),                                       # seq != length inside
        sign_item(seed, HEAD_SALT, 12, head_value(12, root, bytes(64))),             # bad head signature
        sign_item(seed, HEAD_SALT, 12, head_value(12, os.urandom(32), signature)),   # root not signed
        sign_item(seed, HEAD_SALT, 12, b"3:abc"),                                    # not a head
        sign_item(seed, HEAD_SALT, 12, b"i12e"),
        sign_item(other_seed, HEAD_SALT, 12, value),                                 # other owner
    ]
    for bad in wrong:
        assert parse_head_item(key, bad) is None
    assert info_hash(crypto.discovery_key(key)) == crypto.discovery_key(key)[:20]


# --- over UDP -------------------------------------------------------------------------------

async def start_source(nursery, host: str, bootstrap, **kw):
    """A DhtSource running its own node; returns (source, emitted candidates, cancel scope)."""
    source = DhtSource(DhtNode(bind=(host, 0), bootstrap=bootstrap, timeout=1.0), **kw)
    emitted: list[tuple[bytes, Candidate]] = []
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await source.run(lambda key, c: emitted.append((key, c)), task_status=task_status)

    await nursery.start(run)
    return source, emitted, scope


async def dht(nursery, n: int = 10) -> Swarm:
    swarm = Swarm(nursery)
    first = await swarm.start("127.0.0.60")
    for i in range(1, n):
        await swarm.start(f"127.0.0.{60 + i}", [first.address])
    await until(lambda: all(len(x.engine.table) >= 5 for x in swarm.nodes), what="routing tables")
    return swarm


async def test_a_joined_topic_is_announced_once_the_port_is_known_and_found():
    topic = crypto.discovery_key(crypto.generate_keypair()[0])
    async with trio.open_nursery() as nursery:
        swarm = await dht(nursery)
        boot = [swarm.nodes[0].address]
        seeder, _, _ = await start_source(nursery, "127.0.0.80", boot)
        seeder.join(topic, announce=True)
        await until(lambda: seeder.lookups >= 1, what="the seeder's first lookup")
        assert seeder.announces == 0                 # no port yet: nothing announced
        seeder.set_port(7640)
        await until(lambda: seeder.announces == 1, what="the announce")
        assert seeder.status()["last_announce"] is not None
        reader, emitted, _ = await start_source(nursery, "127.0.0.81", boot, retry_every=0.5)
        reader.join(topic, announce=False)
        await until(lambda: emitted, what="a candidate")
        assert emitted[0] == (topic, Candidate("127.0.0.80", 7640, "dht"))
        assert reader.announces == 0
        status = reader.status()
        assert status["topics"] == 1 and status["running"] and status["nodes"] >= 1
        reader.leave(topic)
        assert reader.status()["topics"] == 0
        nursery.cancel_scope.cancel()


async def test_a_reader_keeps_looking_until_a_seeder_appears():
    topic = crypto.discovery_key(crypto.generate_keypair()[0])
    async with trio.open_nursery() as nursery:
        swarm = await dht(nursery)
        boot = [swarm.nodes[0].address]
        reader, emitted, _ = await start_source(nursery, "127.0.0.82", boot, retry_every=0.5)
        reader.join(topic, announce=False)
        await until(lambda: reader.lookups >= 2, what="lookups")
        assert emitted == []
        seeder, _, _ = await start_source(nursery, "127.0.0.83", boot)
        seeder.set_port(9000)
        seeder.join(topic, announce=True)  # port already known: announced at once
        await until(lambda: emitted, what="the late seeder")
        assert emitted[0][1] == Candidate("127.0.0.83", 9000, "dht")
        nursery.cancel_scope.cancel()


async def test_heads_move_forward_only_and_seeders_reput_the_owners_item():
    key, seed = crypto.generate_keypair()
    topic = crypto.discovery_key(key)
    old, new = head(seed, key, 5), head(seed, key, 9)
    async with trio.open_nursery() as nursery:
        swarm = await dht(nursery)
        boot = [swarm.nodes[0].address]
        owner, _, owner_scope = await start_source(nursery, "127.0.0.84", boot)
        owner.join(topic, announce=True)
        assert await owner.put_head(key, *old) >= 5
        assert await owner.put_head(key, *new) >= 5
        with pytest.raises(VerificationError):
            await owner.put_head(key, new[0], new[1], new[2], bytes(64))
        reader, _, _ = await start_source(nursery, "127.0.0.85", boot)
        assert await reader.get_head(key) == new
        # a seeder re-puts the owner's item as it got it, without the secret key
        seeder, _, _ = await start_source(nursery, "127.0.0.86", boot)
        got = await seeder.get_head(key)
        assert await seeder.put_head(key, *got) >= 5
        # the owner goes away; two hours on every copy has expired (BEP 44), and an
        # attacker replays the old item, which verifies
        owner_scope.cancel()
        for node in swarm.nodes + [reader.node, seeder.node]:
            node.engine.items.expire(float("inf"))
        replayed = MutableItem(crypto.blinded_key(key), HEAD_SALT, 5, head_value(*old[:3]), old[3])
        assert await swarm.nodes[0].put_mutable(replayed) >= 5
        fresh, _, _ = await start_source(nursery, "127.0.0.87", [swarm.nodes[0].address])
        assert await fresh.get_head(key) == old      # the DHT now only has the old head...
        assert await reader.get_head(key) == new     # ...and a reader that saw 9 never goes back
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("listen, host", [("127.0.0.7:0", "127.0.0.7"), ("0.0.0.0:7650", "0.0.0.0"),
                                          ("localhost:0", "0.0.0.0"), (None, "0.0.0.0")])
async def test_the_dht_node_runs_on_the_address_a_seeder_listens_on(listen, host):
    """DHT nodes take the UDP source address as an announcing peer's: a seeder
    listening on one of several addresses must send from that one, or readers
    dial an address it does not serve on."""
    from p2pfs.node import NetOptions, discovery_sources
    (source,) = discovery_sources(os.urandom(32), NetOptions(dht=True, bootstrap=(), listen=listen))
    async with trio.open_nursery() as nursery:
        await nursery.start(source.node.run)
        assert source.node.address[0] == host
        nursery.cancel_scope.cancel()
