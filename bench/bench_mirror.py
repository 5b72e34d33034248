"""Mirror benchmark (issue 12), each figure beside a baseline from the same run.

1. `p2pfs seed KEY --peer A` of a drive of many files (default 1 GiB in
   1,000 files) from one seeder on loopback, from start until it reports the
   copy complete, against `p2pfs cat` of one file of the same size from the
   same seeder (the fastest way the same bytes come over the same path):
   goal >= 0.9.  And against Holepunch Hyperdrive 13 `drive.download('/')`
   of the same files in the same run: put.mjs makes the drive (not timed),
   serve.mjs serves it over plain TCP on 127.0.0.1, download.mjs copies it
   into a fresh corestore from the TCP connect until download() is done
   (bench/hyperlab.py: `npm ci` in bench/hyperdrive when node_modules is
   missing, before entering the namespace; no hyperswarm or DHT).
2. `p2pfs mirror` of a drive of many small files (default 10,000) into an
   empty directory, against `cp -a` of the same tree out of a mount of it
   (page cache dropped before each); then an incremental `mirror` after 10
   files changed, against the full one (goal: proportional to the changes,
   not the tree).

Run as root: `scripts/bench mirror` or `.venv/bin/python -m bench.bench_mirror
[--mib N] [--files N] [--small N] [--runs N]`; a short run on a shared
machine: `--mib 256 --small 10000 --runs 1`.  Network parts run in a
loopback-only namespace (`unshare -n`); the temp dir is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import hyperlab
from bench.bench_mount import (REPO, MiB, Table, drop_caches, env, in_workdir, listening_address,
                               mounted, p2pfs, rate, rerun_in_loopback_namespace, terminate)

LOCAL = ("--no-lan", "--no-dht")


def make_files(root: Path, files: int, size: int, seed: int) -> int:
    """`files` random files totalling about `size` bytes, 100 per directory."""
    rnd = random.Random(seed)
    each = size // files
    total = 0
    for i in range(files):
        d = root / f"d{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(rnd.randbytes(each))
        total += each
    return total


def create(home: Path, directory: Path) -> str:
    out = subprocess.run(p2pfs(home, "create", "-q", directory), check=True, capture_output=True,
                         text=True, env=env(), cwd=REPO)
    return out.stdout.strip().splitlines()[-1]


class Seeder:
    def __init__(self, home: Path, keys: list[str], log: Path):
        self.log = open(log, "w+")
        self.proc = subprocess.Popen(p2pfs(home, "seed", *keys, "--listen", "127.0.0.1:0", *LOCAL),
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
        self.address = listening_address(self.log, "seeder")

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()


def seed_once(work: Path, key: str, addr: str) -> float:
    """Seconds from starting `seed KEY` in an empty home until it reports complete."""
    home = work / "home-seed-copy"
    shutil.rmtree(home, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.Popen(p2pfs(home, "seed", key, "--peer", addr, "--listen", "127.0.0.1:0",
                                  "--json", *LOCAL), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env(), cwd=REPO, text=True)
    try:
        for line in proc.stdout:
            if json.loads(line)["event"] == "complete":
                return time.perf_counter() - t
        raise RuntimeError(f"seed exited {proc.wait()} before completing")
    finally:
        terminate(proc)


def cat_once(work: Path, key: str, addr: str) -> float:
    home = work / "home-cat"
    shutil.rmtree(home, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(p2pfs(home, "cat", key, "/one.bin", "--peer", addr, *LOCAL), check=True,
                   stdout=subprocess.DEVNULL, env=env(), cwd=REPO)
    return time.perf_counter() - t


def hyperdrive_download(work: Path, directory: Path, runs: int) -> list[float]:
    """Seconds of each of `runs` cold `download('/')` of `directory` as a
    Hyperdrive, from a serve.mjs seeder on loopback ([] if Hyperdrive cannot
    run here: said why)."""
    why = os.environ.get("P2PFS_BENCH_NO_HYPERDRIVE") or hyperlab.missing()
    if why:
        print(f"  (no Hyperdrive row: {why})", flush=True)
        return []
    storage = work / "corestore-owner"
    _put_s, key = hyperlab.put(directory, storage)
    with open(work / "hyperdrive-serve.log", "w+") as log:
        server = subprocess.Popen(["node", str(hyperlab.HYPERDRIVE / "serve.mjs"), str(storage)],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=hyperlab.HYPERDRIVE)
        try:
            port = listening_address(log, "hyperdrive serve.mjs", 60).rpartition(":")[2]
            took = []
            for i in range(runs):
                copy = work / f"corestore-copy{i}"
                out = subprocess.run(["node", str(hyperlab.HYPERDRIVE / "download.mjs"), str(copy),
                                      key, port], capture_output=True, text=True,
                                     cwd=hyperlab.HYPERDRIVE, timeout=3600)
                shutil.rmtree(copy, ignore_errors=True)
                if out.returncode != 0:
                    print(f"  hyperdrive download.mjs failed: {out.stderr.strip()[-300:]}", flush=True)
                    return []
                took.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
            return took
        finally:
            terminate(server)
            shutil.rmtree(storage, ignore_errors=True)


def bench_seed(table: Table, work: Path, size: int, files: int, runs: int) -> None:
    many = work / "many"
    total = make_files(many, files, size, seed=1)
    one = work / "one"
    one.mkdir()
    with open(one / "one.bin", "wb") as f:
        rnd = random.Random(2)
        left = total
        while left:
            n = min(left, 8 * MiB)
            f.write(rnd.randbytes(n))
            left -= n
    owner = work / "home-owner"
    key_many, key_one = create(owner, many), create(owner, one)
    seeder = Seeder(owner, [key_many, key_one], work / "seeder.log")
    try:
        seeds, cats = [], []
        for _ in range(runs):  # interleaved, best of: the machine is shared
            seeds.append(seed_once(work, key_many, seeder.address))
            cats.append(cat_once(work, key_one, seeder.address))
    finally:
        seeder.stop()
    seed_s, cat_s = min(seeds), min(cats)
    label = f"seed of {total // MiB} MiB in {files:,} files"
    table.add(label, rate(total, seed_s), f"p2pfs cat {rate(total, cat_s)}", cat_s / seed_s, ">= 0.9")
    hyper = hyperdrive_download(work, many, runs)
    if hyper:
        table.add("  vs Hyperdrive 13 download('/') over loopback TCP", rate(total, seed_s),
                  f"hyperdrive {rate(total, min(hyper))}", min(hyper) / seed_s)
    print(f"  seconds: seed {fmt(seeds)}, cat {fmt(cats)}, hyperdrive {fmt(hyper)}", flush=True)
    shutil.rmtree(work / "home-seed-copy", ignore_errors=True)
    shutil.rmtree(work / "home-cat", ignore_errors=True)


def fmt(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}" for t in times) + "]"


def timed_mirror(home: Path, key: str, out: Path) -> tuple[float, dict]:
    drop_caches()
    t = time.perf_counter()
    res = subprocess.run(p2pfs(home, "mirror", key, out, "--json", *LOCAL), check=True,
                         capture_output=True, text=True, env=env(), cwd=REPO)
    took = time.perf_counter() - t
    events = [json.loads(line) for line in res.stdout.splitlines() if line]
    return took, [e for e in events if e["event"] == "version"][-1]


def bench_export(table: Table, work: Path, small: int, runs: int) -> None:
    src = work / "small"
    rnd = random.Random(5)
    for i in range(small):
        d = src / f"d{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(rnd.randbytes(rnd.randrange(0, 4097)))
    home = work / "home-export"
    key = create(home, src)
    fulls, cps = [], []
    mnt = work / "mnt-export"
    for _ in range(runs):
        out = work / "out-mirror"
        shutil.rmtree(out, ignore_errors=True)
        took, _ev = timed_mirror(home, key, out)
        fulls.append(took)
        dest = work / "out-cp"
        shutil.rmtree(dest, ignore_errors=True)
        with mounted(home, key, mnt, *LOCAL):
            drop_caches()
            t = time.perf_counter()
            subprocess.run(["cp", "-a", f"{mnt}/.", str(dest)], check=True)
            cps.append(time.perf_counter() - t)
    full, cp = min(fulls), min(cps)
    table.add(f"mirror of {small:,} files into an empty DIR", f"{full:.2f} s",
              f"cp -a from a mount {cp:.2f} s", cp / full, ">= 1")
    # 10 files changed: the incremental run costs what changed (plus the start-up
    # every run pays: the no-change run)
    incs, noops = [], []
    for r in range(runs):
        for i in range(10):
            j = (i * 997 + r * 13) % small
            (src / f"d{j // 100:03d}" / f"f{j:05d}").write_bytes(rnd.randbytes(1000 + i))
        subprocess.run(p2pfs(home, "import", "-q", key, src), check=True, env=env(), cwd=REPO,
                       capture_output=True)
        took, ev = timed_mirror(home, key, work / "out-mirror")
        assert ev["written"] == 10, ev
        incs.append(took)
        noops.append(timed_mirror(home, key, work / "out-mirror")[0])
    inc, noop = min(incs), min(noops)
    print(f"  seconds: mirror {fmt(fulls)}, cp -a {fmt(cps)}, incremental {fmt(incs)}, "
          f"nothing changed {fmt(noops)}", flush=True)
    table.add("incremental mirror after 10 changed files", f"{inc:.2f} s (10 written)",
              f"full mirror {full:.2f} s", full / inc)
    table.add("  the same with nothing changed (start-up, open, diff)", f"{noop:.2f} s",
              f"10 changed {inc:.2f} s", inc / noop)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench_mirror")
    ap.add_argument("--mib", type=int, default=1024, help="MiB of the seeded drive (default 1024)")
    ap.add_argument("--files", type=int, default=1000, help="files of the seeded drive (1,000)")
    ap.add_argument("--small", type=int, default=10_000, help="files of the mirrored drive (10,000)")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (best is kept)")
    ap.add_argument("--no-seed", action="store_true", help="only the mirror rows")
    args = ap.parse_args(argv if argv is not None else [])
    if not args.no_seed and os.environ.get("P2PFS_BENCH_NETNS") != "1":
        why = hyperlab.missing()  # npm ci (if needed) here: the namespace has no network
        if why:
            os.environ["P2PFS_BENCH_NO_HYPERDRIVE"] = why
    if rerun_in_loopback_namespace("bench.bench_mirror", argv):
        return

    def body(table: Table, work: Path) -> None:
        if not args.no_seed:
            bench_seed(table, work, args.mib * MiB, args.files, args.runs)
        bench_export(table, work, args.small, args.runs)

    in_workdir("mirror", body)


if __name__ == "__main__":
    main(sys.argv[1:])
