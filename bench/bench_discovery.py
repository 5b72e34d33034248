"""Discovery (issue 11): mount-to-first-byte through the DHT beside the same
read with --peer, at an injected RTT; and the DHT's standing costs:
routing-table memory, and packets per minute of an idle node.

First byte: a 20-node DHT (`p2pfs dht` processes) and a seeder in one
namespace, a reader in another, joined only through the lab's user-space
delay router (`netlab.delay_router`: TUN devices, every packet between the
two namespaces delayed RTT/2 each way; no netem here), every node
bootstrapped from the first lab node.  Each run starts `p2pfs mount KEY DIR`
in a fresh home -- once with only `--bootstrap` (found through the DHT),
once with `--peer SEEDER` -- and times from the process start until a small
file's bytes come out of the mount; the two alternate, medians of --runs.
The figures: both wall times in RTTs, and their difference (what discovery
costs) in round trips.

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

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

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


REPO = Path(__file__).resolve().parent.parent
FIRST_DHT_NODES = 20
SMALL = b"p2pfs first byte probe\n" * 20


def _p2pfs(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "p2pfs", "--home", str(home), *args]


def _mount_to_first_byte(reader_ns: str, home: Path, key: str, mnt: Path, extra: list[str],
                         timeout: float = 60.0) -> float:
    """Seconds from starting `p2pfs mount` (in the reader's namespace; the
    mount is visible here) until /small.txt reads as expected."""
    mnt.mkdir()
    argv = ["nsenter", f"--net=/run/netns/{reader_ns}", "--",
            *_p2pfs(home, "mount", key, str(mnt), "--no-lan", "--timeout", "30", *extra)]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            try:
                with open(mnt / "small.txt", "rb") as f:
                    if f.read() == SMALL:
                        return time.perf_counter() - started
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"mount exited with {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"no first byte within {timeout:g} s")
            time.sleep(0.002)
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def first_byte(rtt: float, runs: int) -> None:
    from bench.netlab import ROUTER_NET, Lab, sigterm_raises

    with sigterm_raises(), Lab() as lab, tempfile.TemporaryDirectory(prefix="p2pfs-bench-disc-") as tmp:
        work = Path(tmp)
        src = work / "src"
        (src / "docs").mkdir(parents=True)
        (src / "small.txt").write_bytes(SMALL)
        (src / "docs" / "readme.txt").write_text("a drive found by key alone\n")
        seed_home = work / "seed-home"
        done = subprocess.run(_p2pfs(seed_home, "create", str(src), "--quiet"), cwd=REPO,
                              capture_output=True, text=True, check=True)
        key = done.stdout.split()[-1]
        net, reader = lab.namespace("net"), lab.namespace("rd")
        dht_addrs = [f"{ROUTER_NET}.{10 + i}" for i in range(FIRST_DHT_NODES)]
        seed_addr, reader_addr = f"{ROUTER_NET}.5", f"{ROUTER_NET}.100"
        lab.delay_router([(net, [*dht_addrs, seed_addr]), (reader, [reader_addr])], rtt)
        first = f"{dht_addrs[0]}:7640"
        for i, addr in enumerate(dht_addrs):
            boot = ["--bootstrap", first] if i else ["--bootstrap", f"{dht_addrs[1]}:7640"]
            lab.service(net, _p2pfs(work / f"dht{i}", "dht", "--listen", f"{addr}:7640", *boot), f"dht{i}")
        seeder = lab.service(net, _p2pfs(seed_home, "seed", key, "--listen", f"{seed_addr}:0", "--no-lan",
                                         "--bootstrap", first), "seeder")
        # Until a reader finds the seeder's announce (it announces at start).
        deadline = time.monotonic() + 120
        n = 0
        while True:
            n += 1
            probe = lab.run(reader, _p2pfs(work / f"probe{n}", "cat", key, "/small.txt", "--no-lan",
                                           "--bootstrap", first, "--timeout", "10"), capture_output=True)
            if probe.returncode == 0 and probe.stdout == SMALL:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the reader never found the seeder: {probe.stderr.decode()[-500:]}")
        dht, peer = [], []
        for i in range(runs):  # alternating, so drift hits both alike
            dht.append(_mount_to_first_byte(reader.name, work / f"rd{i}", key, work / f"mnt-dht{i}",
                                            ["--bootstrap", first]))
            peer.append(_mount_to_first_byte(reader.name, work / f"rp{i}", key, work / f"mnt-peer{i}",
                                             ["--peer", seeder.address, "--no-dht"]))
        d, p = statistics.median(dht), statistics.median(peer)
        print(f"mount-to-first-byte at {rtt * 1000:g} ms RTT ({FIRST_DHT_NODES}-node DHT, medians of {runs}, "
              f"from process start):")
        print(f"  through the DHT (--bootstrap only): {d:.3f} s = {d / rtt:.1f} RTT "
              f"(runs: {' '.join(f'{x:.3f}' for x in dht)})")
        print(f"  with --peer SEEDER:                 {p:.3f} s = {p / rtt:.1f} RTT "
              f"(runs: {' '.join(f'{x:.3f}' for x in peer)})")
        print(f"  discovery costs {(d - p) / rtt:.1f} round trips more ({(d - p) * 1000:.0f} ms)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_discovery", description=__doc__.splitlines()[0])
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="injected RTT of the first-byte rows (default 20)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each first-byte figure (median)")
    args = ap.parse_args(argv if argv is not None else [])
    if os.geteuid() == 0:
        first_byte(args.rtt_ms / 1000, args.runs)
    else:
        print("mount-to-first-byte: skipped (needs root for the lab's namespaces)")
    used, nodes, replacements = table_memory()
    entries = nodes + replacements
    print(f"routing table, {BUCKETS} buckets: {nodes} nodes + {replacements} replacements = {entries} entries")
    print(f"  memory {used / 1024:.1f} KiB = {used / entries:.0f} B per entry; "
          f"compact node info 26 B per entry: ratio {used / entries / 26:.1f}x")
    if os.geteuid() != 0:
        print("idle traffic: skipped (needs root for a loopback-only network namespace)")
        return
    inner = f"ip link set lo up && exec {sys.executable} -c 'from bench.bench_discovery import _inner; _inner()'"
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
    main(sys.argv[1:])
