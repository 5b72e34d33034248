"""Network benchmark of replication (issue 3), each figure beside a baseline
measured in the same run:

1. cold `p2pfs cat` of a 1 GiB file from one seeder on loopback, against raw
   trio TCP between two processes (64 KiB writes) on the same loopback (goal
   >= 0.25) and against Holepunch Hyperdrive 13 reading the same file cold
   from its own seeder over a loopback socket (bench/hyperlab.py; goal >= 8x),
   the two alternating, medians of --cold-runs; reader and seeder CPU seconds
   per GiB; and, alternating with them, the store alone: the same bytes put
   as 64 KiB blocks into a fresh home in 32 MiB committed transactions, as
   the reader's writer thread does (the reader cannot outrun it);
2. four seeders, each in its own namespace behind a veth with a tbf rate
   limit, read at once by one reader in another namespace, against one seeder
   under the same limit (and raw TCP over the same links, as a lab check);
3. round trips of a cold `p2pfs cat` of a small file and of `p2pfs ls`
   through the delay proxy at 20 ms RTT: the extra wall time over the same
   commands without the proxy, divided by the RTT (counted again at 200 ms,
   where process start-up noise matters less).

Diagnostic rows say where the time goes: CPU cores used by the reader and
the seeders during the big reads, the share of bytes each seeder's link
sent (kernel counters), and whether every seeder survived its readers and
stopped cleanly on SIGTERM (a failure there fails the benchmark).

Run as root (it creates network namespaces): `scripts/bench net`, or
`.venv/bin/python -m bench.bench_net [--size MIB] [--rate 200mbit] ...`.
Every process runs inside a namespace the lab made; nothing leaves the
machine; the namespaces, processes and the temp dir (test files, homes) are
removed on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from bench import hyperlab
from bench.netlab import Lab, LabError, Netns, Service, sigterm_raises, tc_rate
from bench.storefloor import store_alone

MiB = 1024 * 1024


@dataclass
class Row:
    name: str
    figure: str = ""
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    verdict: str = ""  # "ok", "below goal", "FAILED: ...", or "" (report only)


def mbs(rate: float) -> str:
    return f"{rate / 1e6:,.0f} MB/s" if rate >= 10e6 else f"{rate / 1e6:,.1f} MB/s"


def print_table(rows: Sequence[Row]) -> None:
    head = Row("benchmark", "figure", "baseline", "ratio", "goal", "verdict")
    cols = ["name", "figure", "baseline", "ratio", "goal", "verdict"]
    widths = {c: max(len(getattr(r, c)) for r in [head, *rows]) for c in cols[:-1]}
    for i, r in enumerate([head, *rows]):
        print("  ".join(getattr(r, c).ljust(widths[c]) for c in cols[:-1]) + "  " + r.verdict, flush=True)
        if i == 0:
            print("  ".join("-" * widths[c] for c in cols[:-1]) + "  " + "-" * 7)


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


class Run(NamedTuple):
    wall: float  # seconds
    cpu: float  # user + system seconds of the p2pfs process


def cpu_of(services: Sequence[Service]) -> float:
    return sum(s.cpu_seconds() for s in services)


def cores(cpu: float, wall: float) -> str:
    return f"{cpu / wall:.2f}"


class P2pfs:
    """Drives the p2pfs CLI inside lab namespaces, one home per node."""

    def __init__(self, lab: Lab, work: Path) -> None:
        self.lab = lab
        self.work = work
        self._homes = 0
        self.seeds = 0  # seeder processes stopped so far
        self.faults: list[str] = []  # seeders that crashed or did not stop cleanly

    def argv(self, home: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "p2pfs", "--home", str(home), *args]

    def fresh_home(self) -> Path:
        self._homes += 1
        home = self.work / "homes" / f"h{self._homes}"
        home.mkdir(parents=True)
        return home

    def missing(self) -> str | None:
        """Why the replication CLI cannot be driven yet, or None."""
        lo = self.lab.namespace("probe")
        seed = self.lab.run(lo, self.argv(self.work, "seed", "--help"), capture_output=True, text=True)
        if seed.returncode != 0 or "--listen" not in seed.stdout:
            return "p2pfs seed not available (`p2pfs seed --help` has no --listen)"
        cat = self.lab.run(lo, self.argv(self.work, "cat", "--help"), capture_output=True, text=True)
        if cat.returncode != 0 or "--peer" not in cat.stdout:
            return "p2pfs cat --peer not available"
        return None

    def check(self, done: subprocess.CompletedProcess, what: str) -> None:
        """Raise LabError if the command failed: its first line names the
        command and its last stderr line, the rest is the stderr tail."""
        if done.returncode != 0:
            err = done.stderr if isinstance(done.stderr, str) else (done.stderr or b"").decode(errors="replace")
            lines = [ln for ln in err.splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else "(no stderr)"
            raise LabError(f"{what} exited with {done.returncode}: {last}\n" + "\n".join(lines[-15:]))

    def create(self, ns: Netns, home: Path, src: Path) -> tuple[str, float]:
        seconds, _, done = self.lab.timed(ns, self.argv(home, "create", str(src), "--quiet"),
                                       capture_output=True, text=True, timeout=1800)
        self.check(done, "p2pfs create")
        return done.stdout.strip().splitlines()[-1].strip(), seconds

    def seed(self, ns: Netns, home: Path, key: str, host: str) -> Service:
        return self.lab.service(ns, self.argv(home, "seed", key, "--listen", f"{host}:0"), "seed", timeout=60.0)

    def timed_read(self, ns: Netns, key: str, args: Sequence[str], peers: Sequence[Service],
                   expect: bytes | None = None, timeout: float = 900.0) -> Run:
        """Wall and CPU seconds of one `p2pfs ARGS --peer ...` in a fresh home.
        With `expect`, stdout must equal it; otherwise stdout goes to /dev/null."""
        home = self.fresh_home()
        peer_args = [a for p in peers for a in ("--peer", p.address)]
        argv = self.argv(home, *args, *peer_args, "--timeout", "30")
        try:
            stdout = subprocess.PIPE if expect is not None else subprocess.DEVNULL
            seconds, cpu, done = self.lab.timed(ns, argv, stdout=stdout, stderr=subprocess.PIPE, timeout=timeout)
            try:
                self.check(done, f"p2pfs {' '.join(args[:1])}")
            except LabError as exc:
                dead = [f"peer {p.address} had exited with {p.proc.returncode}:\n{p.log_tail(40)}"
                        for p in peers if p.proc.poll() is not None]
                raise LabError("\n".join([str(exc), f"peers: {' '.join(p.address for p in peers)}", *dead])) from None
            if expect is not None and done.stdout != expect:
                raise LabError(f"p2pfs {' '.join(args)} printed {len(done.stdout)} bytes, not the expected {len(expect)}")
            return Run(seconds, cpu)
        finally:
            shutil.rmtree(home, ignore_errors=True)

    @contextlib.contextmanager
    def seeders(self, key: str, home: Path, where: Sequence[tuple[Netns, str]]) -> Iterator[list[Service]]:
        """Fresh `p2pfs seed` processes, one per (namespace, host), all sharing
        `home`; stopped with SIGTERM on exit.  A seeder that exited on its own
        or did not stop cleanly is recorded in `self.faults`."""
        started: list[Service] = []
        try:
            for ns, host in where:
                started.append(self.seed(ns, home, key, host))
            yield started
        finally:
            for s in started:
                self.seeds += 1
                early = s.proc.poll()
                code = s.stop()
                if early is not None:
                    self.faults.append(f"seeder {s.address} exited on its own with {early} while in use:\n{s.log_tail(40)}")
                elif code != 0:
                    self.faults.append(f"seeder {s.address} exited with {code} on SIGTERM:\n{s.log_tail(40)}")


def guarded(rows: list[Row], notes: list[str], names: Sequence[str], goals: Sequence[str],
            fn: Callable[[], list[Row]]) -> None:
    """Run a group of rows; on failure, record each of its rows as FAILED with
    the reason's first line, and the whole reason as a note."""
    try:
        rows.extend(fn())
    except (LabError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        text = str(exc).strip() or type(exc).__name__
        rows.extend(Row(n, goal=g, verdict=f"FAILED: {text.splitlines()[0]}") for n, g in zip(names, goals))
        notes.append(f"{names[0]}: {text}")


def judge(ratio: float, goal: float) -> str:
    return "ok" if ratio >= goal else "below goal"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_net", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB of the cold-fetch file (default 1024)")
    parser.add_argument("--cold-runs", type=int, default=3,
                        help="runs of the cold fetch, p2pfs and Hyperdrive alternating (median)")
    parser.add_argument("--multi-size", type=int, default=None,
                        help="MiB of the file read from rate-limited seeders (default: 20 s at one link's rate)")
    parser.add_argument("--rate", default="200mbit", help="tbf rate of each seeder's link (tc syntax)")
    parser.add_argument("--seeders", type=int, default=4)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--count-rtt-ms", type=float, default=200.0,
                        help="a second, long RTT at which round trips are counted with less noise")
    parser.add_argument("--runs", type=int, default=7, help="runs of each latency measurement (median)")
    args = parser.parse_args(list(argv) if argv is not None else [])
    if not 1 <= args.seeders <= 200:
        parser.error("--seeders must be 1..200")
    try:
        link_rate = tc_rate(args.rate)
    except ValueError as exc:
        parser.error(f"--rate: {exc}")
    if args.multi_size is None:
        args.multi_size = max(16, round(link_rate * 20 / MiB / 16) * 16)

    rows: list[Row] = []
    notes: list[str] = []
    rtt = args.rtt_ms / 1000
    print(f"files: {args.size} MiB (loopback), {args.multi_size} MiB ({args.seeders} seeders, "
          f"tbf {args.rate} each); delay proxy RTT {args.rtt_ms:g} ms; {args.runs} latency runs", flush=True)

    with sigterm_raises(), Lab() as lab, tempfile.TemporaryDirectory(prefix="p2pfs-bench-net-") as tmp:
        work = Path(tmp)
        p2p = P2pfs(lab, work)
        lo = lab.namespace("lo")

        # Baseline 1: raw trio TCP, two processes, loopback (median of 3).
        raw = statistics.median(lab.raw_tcp(lo, lo, nbytes=args.size * MiB).rate for _ in range(3))

        # The lab's own check: raw TCP over rate-limited links, one and all.
        reader = lab.namespace("r")
        links = []
        for i in range(args.seeders):
            ns = lab.namespace(f"s{i + 1}")
            link = lab.link(ns, reader)
            lab.rate_limit(ns, link.a_dev, args.rate)
            links.append(link)
        probe = min(256 * MiB, max(8 * MiB, round(link_rate * 3)))  # about 3 s per link
        one_raw = lab.raw_tcp(reader, links[0].a, host=links[0].b_ip, nbytes=probe).rate
        all_raw = lab.raw_tcp_parallel([(reader, l.b_ip, l.a) for l in links], nbytes=probe).rate
        rows.append(Row(f"raw TCP, {args.seeders} tbf links vs 1 (lab check)", mbs(all_raw), mbs(one_raw),
                        f"{all_raw / one_raw:.2f}x", f">= {args.seeders * 0.85:.1f}x",
                        judge(all_raw / one_raw, args.seeders * 0.85)))

        why_not = p2p.missing()
        cold_name = f"cold cat {args.size} MiB, 1 seeder, loopback"
        multi_names = [f"cat {args.multi_size} MiB, {args.seeders} seeders vs 1 ({args.rate} each)",
                       "  same, excluding start-up (small cat)",
                       "  1 seeder vs raw TCP over the same link",
                       "  share of the bytes each seeder's link sent"]
        lat_names = [f"cold cat small file @{args.rtt_ms:g} ms RTT", f"  same @{args.count_rtt_ms:g} ms RTT",
                     f"cold ls @{args.rtt_ms:g} ms RTT", f"  same @{args.count_rtt_ms:g} ms RTT"]
        if why_not:
            rows.append(Row(cold_name, baseline=f"raw TCP {mbs(raw)}", goal=">= 0.25", verdict=f"FAILED: {why_not}"))
            rows.extend(Row(n, verdict=f"FAILED: {why_not}") for n in lat_names + multi_names)
        else:
            try:
                run_p2pfs(args, lab, p2p, work, lo, reader, links, raw, one_raw, rtt,
                          rows, notes, cold_name, multi_names, lat_names)
            except (LabError, subprocess.TimeoutExpired, OSError) as exc:  # the shared set-up failed
                text = str(exc).strip() or type(exc).__name__
                rows.extend(Row(n, verdict=f"FAILED: {text.splitlines()[0]}")
                            for n in [cold_name] + lat_names + multi_names)
                notes.append(text)

    print()
    print_table(rows)
    for note in notes:
        print(f"note: {note}")
    failed = [r.name for r in rows if r.verdict.startswith("FAILED")]
    if failed:
        raise RuntimeError(f"bench net: {len(failed)} row(s) failed: {'; '.join(failed)}")


def run_p2pfs(args, lab: Lab, p2p: P2pfs, work: Path, lo: Netns, reader: Netns, links, raw: float,
              one_raw: float, rtt: float, rows: list[Row], notes: list[str],
              cold_name: str, multi_names: list[str], lat_names: list[str]) -> None:
    # The shared test tree, made once per run and removed with the temp dir.
    src = work / "src"
    small = b"p2pfs latency probe\n" * 50
    write_random(src / "big.bin", args.size * MiB)
    write_random(src / "mid.bin", args.multi_size * MiB)
    (src / "small.txt").write_bytes(small)
    for i in range(20):
        (src / "docs" / f"f{i:02}.txt").parent.mkdir(exist_ok=True)
        (src / "docs" / f"f{i:02}.txt").write_text(f"file {i}\n")
    seed_home = work / "seed-home"
    seed_home.mkdir()
    key, create_s = p2p.create(lo, seed_home, src)
    notes.append(f"p2pfs create of the {args.size + args.multi_size} MiB tree took {create_s:.1f} s "
                 f"({(args.size + args.multi_size) * MiB / create_s / 1e6:,.0f} MB/s)")
    ls_expect = lab.run(lo, p2p.argv(seed_home, "ls", key, "/docs"), capture_output=True, timeout=60)
    p2p.check(ls_expect, "p2pfs ls (seeder's own home)")

    # Every group gets fresh seeders, so that one seeder's failure shows in
    # the seeder row and does not skew the other groups' figures.
    cold_rate: list[float] = []

    def cold() -> list[Row]:
        # p2pfs and Hyperdrive alternate, each from a fresh seeder per run,
        # medians of `cold_runs`: the machine is shared and drifts.
        walls, readers, seeders_cpu, hyper, why_no_hyper = [], [], [], [], hyperlab.missing()
        floors: list[float] = []
        hyper_store = hyper_key = None
        if why_no_hyper is None:
            hyper_store = work / "hyperdrive-seed"
            only = work / "hyper-src"
            only.mkdir()
            os.link(src / "big.bin", only / "big.bin")
            try:
                _put_s, hyper_key = hyperlab.put(only, hyper_store)
            except LabError as exc:  # the baseline failing does not fail p2pfs's rows
                why_no_hyper = str(exc)
        for i in range(args.cold_runs):
            with p2p.seeders(key, seed_home, [(lo, "127.0.0.1")]) as (seeder,):
                before = seeder.cpu_seconds()
                run = p2p.timed_read(lo, key, ["cat", key, "/big.bin"], [seeder])
                seeders_cpu.append(seeder.cpu_seconds() - before)
            walls.append(run.wall)
            readers.append(run.cpu)
            floors.append(store_alone(work / f"store-alone{i}", args.size * MiB))
            if hyper_key is not None and why_no_hyper is None:
                try:
                    server = hyperlab.serve(lab, lo, hyper_store)
                    try:
                        wall, _cpu, got = hyperlab.fetch(lab, lo, work / f"hyperdrive-read{i}", hyper_key,
                                                         server, "/big.bin")
                    finally:
                        server.stop()
                    if got != args.size * MiB:
                        raise LabError(f"hyperdrive fetch read {got} bytes, not {args.size * MiB}")
                    hyper.append(wall)
                except LabError as exc:
                    why_no_hyper = str(exc)
        wall = statistics.median(walls)
        rate = args.size * MiB / wall
        cold_rate.append(rate)
        gib = args.size / 1024
        rows = [Row(cold_name, mbs(rate), f"raw TCP {mbs(raw)}", f"{rate / raw:.3f}", ">= 0.25",
                    judge(rate / raw, 0.25))]
        if hyper and why_no_hyper is None:
            h = statistics.median(hyper)
            rows.append(Row("  same vs Hyperdrive 13 (corestore replicate over TCP)", mbs(rate),
                            f"hyperdrive {mbs(args.size * MiB / h)}", f"{h / wall:.2f}x", ">= 8x",
                            judge(h / wall, 8)))
        else:
            notes.append(f"no Hyperdrive row: {why_no_hyper}")
        floor = args.size * MiB / statistics.median(floors)
        rows.append(Row("  same vs the store alone (its blocks put, no network)", mbs(rate),
                        f"store alone {mbs(floor)}", f"{rate / floor:.2f}", goal="report"))
        rows.append(Row(cpu_names[0], f"{statistics.median(readers) / gib:.2f} / "
                        f"{statistics.median(seeders_cpu) / gib:.2f} CPU s/GiB",
                        f"{cores(statistics.median(readers), wall)} / "
                        f"{cores(statistics.median(seeders_cpu), wall)} cores, {wall:.1f} s wall",
                        goal="report"))
        return rows

    cpu_names = ["  CPU of reader / seeder", f"  CPU of reader / {args.seeders} seeders"]
    guarded(rows, notes, [cold_name, cpu_names[0]], [">= 0.25", "report"], cold)

    def latency(names: list[str], cmd: list[str], expect: bytes) -> list[Row]:
        long_rtt = args.count_rtt_ms / 1000
        with p2p.seeders(key, seed_home, [(lo, "127.0.0.1")]) as (seeder,):
            proxy = lab.delay_proxy(lo, seeder.addr, rtt)
            slow = lab.delay_proxy(lo, seeder.addr, long_rtt)
            try:
                direct, delayed, slowed = [], [], []
                for i in range(args.runs):  # interleaved, so drift hits all alike
                    direct.append(p2p.timed_read(lo, key, cmd, [seeder], expect=expect, timeout=120).wall)
                    delayed.append(p2p.timed_read(lo, key, cmd, [proxy], expect=expect, timeout=120).wall)
                    # every run at the long RTT too: it is the count a goal is judged on
                    slowed.append(p2p.timed_read(lo, key, cmd, [slow], expect=expect, timeout=120).wall)
            finally:
                proxy.stop()
                slow.stop()
        d, w, v = (statistics.median(x) for x in (direct, delayed, slowed))
        return [Row(names[0], f"{w:.3f} s = {w / rtt:.1f} RTT", f"{d:.3f} s without proxy",
                    f"{(w - d) / rtt:.1f} round trips", "report"),
                Row(names[1], f"{v:.3f} s = {v / long_rtt:.1f} RTT", f"{d:.3f} s without proxy",
                    f"{(v - d) / long_rtt:.1f} round trips", "report")]

    guarded(rows, notes, lat_names[0:2], ["report"] * 2,
            lambda: latency(lat_names[0:2], ["cat", key, "/small.txt"], small))
    guarded(rows, notes, lat_names[2:4], ["report"] * 2,
            lambda: latency(lat_names[2:4], ["ls", key, "/docs"], ls_expect.stdout))
    notes.append("round trips = (median wall time through the delay proxy - without it) / RTT, in fresh "
                 "homes; the proxy charges the TCP handshake too (1 RTT); the count at the long RTT "
                 "is the less noisy one (process start-up varies by tens of ms here)")

    # 2: several seeders behind rate-limited links, one reader.
    def multi() -> list[Row]:
        def measure(peers: list[Service]) -> tuple[float, float, Run, float]:
            """(wall of the big read, median wall of a small cat, the big Run, seeders' CPU)"""
            start = statistics.median(p2p.timed_read(reader, key, ["cat", key, "/small.txt"], peers,
                                                     expect=small, timeout=120).wall for _ in range(3))
            seeders_cpu = cpu_of(peers)
            run = p2p.timed_read(reader, key, ["cat", key, "/mid.bin"], peers)
            return run.wall, start, run, cpu_of(peers) - seeders_cpu

        with p2p.seeders(key, seed_home, [(links[0].a, links[0].a_ip)]) as peers:
            one, start_one, _, _ = measure(peers)
        with p2p.seeders(key, seed_home, [(l.a, l.a_ip) for l in links]) as peers:
            before = [lab.counters(l.a, l.a_dev)["tx_bytes"] for l in links]
            many, start_many, many_run, many_seeders_cpu = measure(peers)
            sent = [lab.counters(l.a, l.a_dev)["tx_bytes"] - b for l, b in zip(links, before)]
        size = args.multi_size * MiB
        r1, rn = size / one, size / many
        t1, tn = size / max(one - start_one, 1e-9), size / max(many - start_many, 1e-9)
        goal = 3.5 * args.seeders / 4
        if cold_rate and rn > 0.8 * cold_rate[0]:
            notes.append(f"the {args.seeders}-seeder read ({mbs(rn)}) is near p2pfs's own loopback speed "
                         f"({mbs(cold_rate[0])}): it is bound by the reader, not by the links; "
                         f"a lower --rate measures the spreading")
        return [
            Row(multi_names[0], mbs(rn), mbs(r1), f"{rn / r1:.2f}x", f">= {goal:.2f}x", judge(rn / r1, goal)),
            Row(multi_names[1], mbs(tn), mbs(t1), f"{tn / t1:.2f}x", f">= {goal:.2f}x", judge(tn / t1, goal)),
            Row(multi_names[2], mbs(r1), f"raw TCP {mbs(one_raw)}", f"{r1 / one_raw:.2f}", "report"),
            Row(multi_names[3], " / ".join(f"{100 * b / max(sum(sent), 1):.0f}" for b in sent) + " %",
                f"{sum(sent) / MiB:,.0f} MiB sent", f"{sum(sent) / size:.2f} of file", "report"),
            Row(cpu_names[1], f"{cores(many_run.cpu, many)} / {cores(many_seeders_cpu, many)} cores",
                f"{many:.1f} s wall", goal="report"),
        ]

    guarded(rows, notes, multi_names + cpu_names[1:], [">= 3.5x", ">= 3.5x", "report", "report", "report"], multi)

    ok = p2p.seeds - len(p2p.faults)
    first = p2p.faults[0].splitlines()[0] if p2p.faults else ""
    rows.append(Row("seeders: no crash when readers leave, clean stop on SIGTERM", f"{ok}/{p2p.seeds} seeders",
                    goal="all", verdict=f"FAILED: {first}" if p2p.faults else "ok"))
    notes.extend(p2p.faults)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (RuntimeError, LabError) as exc:
        print(f"bench_net: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
