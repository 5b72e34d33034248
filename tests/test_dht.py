"""The Mainline DHT over real UDP sockets on loopback: many nodes in one process.

Run inside a loopback-only network namespace (as scripts/test does):
    unshare -n -- bash -c 'ip link set lo up && .venv/bin/python -m pytest tests/test_dht.py'
Every node has its own loopback address (127.0.0.x: all of 127/8 is
loopback on Linux), so per-source limits apply per node, as between hosts.
Nodes bootstrap from each other only.
"""

from __future__ import annotations

import os
import socket
import stat

import trio

from p2pfs.net.discovery.dht import krpc
from p2pfs.net.discovery.dht.node import DhtNode
from p2pfs.net.discovery.dht.node_id import distance


class Swarm:
    """DHT nodes in one nursery, each in its own cancel scope so it can be killed."""

    def __init__(self, nursery):
        self.nursery = nursery
        self.nodes: list[DhtNode] = []
        self.scopes: dict[DhtNode, trio.CancelScope] = {}

    async def start(self, host: str, bootstrap=(), **kw) -> DhtNode:
        node = DhtNode(bind=(host, 0), bootstrap=list(bootstrap), timeout=1.0, **kw)
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await node.run(task_status=task_status)

        await self.nursery.start(run)
        self.nodes.append(node)
        self.scopes[node] = scope
        return node

    def kill(self, node: DhtNode) -> None:
        self.scopes[node].cancel()
        self.nodes.remove(node)


async def until(predicate, timeout: float = 30.0, what: str = "condition"):
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def twenty(nursery) -> Swarm:
    swarm = Swarm(nursery)
    first = await swarm.start("127.0.0.10")
    for i in range(1, 20):
        await swarm.start(f"127.0.0.{10 + i}", [first.address, swarm.nodes[i // 2].address])
    await until(lambda: all(len(n.engine.table) >= 6 for n in swarm.nodes), what="routing tables")
    return swarm


async def test_twenty_nodes_keep_finding_the_seeder_after_a_quarter_die():
    async with trio.open_nursery() as nursery:
        swarm = await twenty(nursery)
        seeder, reader = swarm.nodes[3], swarm.nodes[17]
        info_hash = os.urandom(20)
        announced = await seeder.announce(info_hash, 7640)
        assert announced.stored >= 6
        assert seeder.status()["last_announce"] is not None
        assert (seeder.address[0], 7640) in await reader.get_peers(info_hash)
        # kill the five nodes nearest the infohash (other than seeder and reader): the
        # worst quarter to lose, most of the nodes that stored the announce
        victims = sorted((n for n in swarm.nodes if n not in (seeder, reader)),
                         key=lambda n: distance(n.engine.own_id, info_hash))[:5]
        for node in victims:
            swarm.kill(node)
        assert len(swarm.nodes) == 15
        assert (seeder.address[0], 7640) in await reader.get_peers(info_hash)
        # a re-announce (every 15 minutes in use) lands on live nodes only; a node that
        # joins afterwards, bootstrapping from a survivor, finds the seeder too
        assert (await seeder.announce(info_hash, 7640)).stored >= 6
        late = await swarm.start("127.0.0.99", [swarm.nodes[0].address])
        assert (seeder.address[0], 7640) in await late.get_peers(info_hash)
        nursery.cancel_scope.cancel()


async def test_mutable_items_across_the_dht():
    from p2pfs import crypto
    from p2pfs.net.discovery.dht.items import sign_item

    async with trio.open_nursery() as nursery:
        swarm = await twenty(nursery)
        public, seed = crypto.generate_keypair()
        old, new = (sign_item(seed, b"p2pfs", seq, b"4:v%03d" % seq) for seq in (4, 9))
        assert await swarm.nodes[2].put_mutable(old) >= 6
        assert await swarm.nodes[5].put_mutable(new) >= 6
        assert await swarm.nodes[11].put_mutable(old) == 0  # a replay: every node holds seq 9
        assert await swarm.nodes[19].get_mutable(public, b"p2pfs") == new
        assert await swarm.nodes[19].get_mutable(public, b"other") is None
        nursery.cancel_scope.cancel()


async def test_a_flooded_node_keeps_answering_others():
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery)
        target = await swarm.start("127.0.0.20")
        honest = await swarm.start("127.0.0.21", [target.address])
        await until(lambda: target.engine.own_id in honest.engine.table, what="bootstrap")
        flood = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await flood.bind(("127.0.0.66", 0))
        valid_ping = krpc.encode(krpc.Ping(b"xx", os.urandom(20)))
        sent = 0

        async def flooder():
            nonlocal sent
            while True:
                for data in (os.urandom(300), valid_ping, b"x" * 1400, os.urandom(1600)):
                    await flood.sendto(data, target.address)
                    sent += 1

        answered = 0
        with flood:
            nursery.start_soon(flooder)
            await until(lambda: sent > 2000, what="the flood to start")
            for i in range(40):  # meanwhile an honest node's lookups and pings are answered
                found = await honest.find_node(os.urandom(20))
                answered += bool(found)
                await until(lambda: sent > 2000 + 200 * (i + 1), what="more flood")
            status = target.status()
        assert answered == 40
        assert sent > 10000
        unread = status["ignored_blocked"] + status["dropped_oversize"]  # never decoded
        assert unread > status["packets_in"] - 200
        assert status["blocked_sources"] == 1
        assert status["answers_out"] < 200  # the flooder got at most its first few answers
        nursery.cancel_scope.cancel()


async def test_state_file_is_private_and_bootstraps_a_restart(tmp_path):
    state = tmp_path / "home" / "dht.state"
    state.parent.mkdir()
    async with trio.open_nursery() as nursery:
        swarm = Swarm(nursery)
        first = await swarm.start("127.0.0.30")
        others = [await swarm.start(f"127.0.0.{31 + i}", [first.address]) for i in range(8)]
        saver = await swarm.start("127.0.0.50", [first.address], state_path=state)
        await until(lambda: len(saver.engine.table) >= 5, what="saver's table")
        own_id = saver.engine.own_id
        swarm.kill(saver)
        await until(lambda: state.exists(), what="state file")
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert len(state.read_bytes()) < 2000
        # restarted with no bootstrap nodes at all: the saved nodes bring it back in
        again = await swarm.start("127.0.0.50", [], state_path=state)
        assert again.engine.own_id == own_id
        await until(lambda: len(again.engine.table) >= 5, what="restarted table")
        info_hash = os.urandom(20)
        await others[3].announce(info_hash, 1234)
        assert ("127.0.0.34", 1234) in await again.get_peers(info_hash)
        swarm.kill(again)
        state.write_bytes(b"damaged")  # a damaged file means a fresh start, not a crash
        fresh = await swarm.start("127.0.0.50", [first.address], state_path=state)
        assert fresh.engine.own_id != own_id
        nursery.cancel_scope.cancel()
