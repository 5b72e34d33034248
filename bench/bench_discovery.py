"""The DHT's standing costs: routing-table memory, and packets per minute of an idle node.

Memory: a table filled as a node in the public DHT fills it (22 buckets of
8 nodes, each with 8 in its replacement cache: about what a table holds
among ~10 million nodes), measured with tracemalloc, beside the 26 bytes
of compact node info per node (the baseline: what the same nodes cost on
the wire).

Idle traffic: 20 DHT nodes on loopback addresses (127.0.0.x), one process,
under trio's MockClock (real UDP sockets, virtual time: 90 virtual minutes
take seconds), with no lookups from users.  Counted from minute 30 to 90
(after bootstrap): what one node sends and receives per minute just to
keep its table alive (pings of quiet nodes, bucket refreshes, and the
same from its neighbours).  The simulation opens sockets, so it runs in a
loopback-only network namespace (`unshare -n`, as root).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tracemalloc

from p2pfs.net.discovery.dht.routing import ID_BITS, K, RoutingTable

BUCKETS = 22
NODES = 20
WARMUP_MIN, MEASURE_MIN = 30, 60


def table_memory() -> tuple[int, int, int]:
    """(bytes, nodes in the table, replacements) of a table filled like a public node's."""
    rng = random.Random(1)
    own = rng.randbytes(20)
    own_int = int.from_bytes(own, "big")
    ids = []
    for depth in range(BUCKETS):
        for _ in range(2 * K):
            keep = ((1 << depth) - 1) << (ID_BITS - depth)
            flip = 1 << (ID_BITS - depth - 1)
            ids.append(((own_int & keep) | ((own_int ^ flip) & flip)
                        | (rng.getrandbits(ID_BITS) & (flip - 1))).to_bytes(20, "big"))
    hosts = [f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
             for _ in ids]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    table = RoutingTable(own, 0.0, restrict_ips=False)
    for i, (node_id, host) in enumerate(zip(ids, hosts)):
        table.heard_from(node_id, host, 6881, float(i))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    replacements = sum(len(b.replacements) for b in table.buckets)
    return used, len(table), replacements


async def _idle_network() -> dict:
    import trio

    from p2pfs.net.discovery.dht.node import DhtNode

    async with trio.open_nursery() as nursery:
        nodes = [DhtNode(bind=("127.0.0.10", 0), bootstrap=[])]
        await nursery.start(nodes[0].run)
        for i in range(1, NODES):
            node = DhtNode(bind=(f"127.0.0.{10 + i}", 0), bootstrap=[nodes[0].address, nodes[i // 2].address])
            await nursery.start(node.run)
            nodes.append(node)
        await trio.sleep(WARMUP_MIN * 60)
        start = [dict(n.engine.counters) for n in nodes]
        tables = [len(n.engine.table) for n in nodes]
        await trio.sleep(MEASURE_MIN * 60)
        out = {"packets_in": [], "packets_out": [], "bytes_in": [], "bytes_out": []}
        for node, s in zip(nodes, start):
            for key in out:
                out[key].append((node.engine.counters[key] - s.get(key, 0)) / MEASURE_MIN)
        out["table"] = tables
        nursery.cancel_scope.cancel()
    return out


def _inner() -> None:
    import trio
    import trio.testing

    result = trio.run(_idle_network, clock=trio.testing.MockClock(autojump_threshold=0.002))
    print(json.dumps(result))


def main() -> None:
    used, nodes, replacements = table_memory()
    entries = nodes + replacements
    print(f"routing table, {BUCKETS} buckets: {nodes} nodes + {replacements} replacements = {entries} entries")
    print(f"  memory {used / 1024:.1f} KiB = {used / entries:.0f} B per entry; "
          f"compact node info 26 B per entry: ratio {used / entries / 26:.1f}x")
    if os.geteuid() != 0:
        print("idle traffic: skipped (needs root for a loopback-only network namespace)")
        return
    inner = f"ip link set lo up && exec {sys.executable} -c 'from bench.bench_dht import _inner; _inner()'"
    proc = subprocess.run(["unshare", "-n", "--", "bash", "-c", inner], capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"idle simulation failed:\n{proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"idle node, {NODES}-node loopback DHT (table {med(r['table'])} nodes), minutes "
          f"{WARMUP_MIN}-{WARMUP_MIN + MEASURE_MIN}, median (max) per node:")
    print(f"  packets per minute: in {med(r['packets_in']):.1f} ({max(r['packets_in']):.1f}), "
          f"out {med(r['packets_out']):.1f} ({max(r['packets_out']):.1f})")
    print(f"  bytes per minute: in {med(r['bytes_in']):.0f}, out {med(r['bytes_out']):.0f}")


if __name__ == "__main__":
    main()
