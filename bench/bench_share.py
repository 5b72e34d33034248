"""Share benchmark (issue 9), each figure beside a baseline from the same run.

1. First import by `p2pfs share DIR` (from start until it prints `listening
   on`: scan, read, hash, store, sign) of a tree of small files (default
   100,000 of 0-4 KiB in 1,000 directories) and of one file (default 1 GiB):
   files/s and MB/s, against reading and BLAKE3-hashing the same files in
   this process (the floor any importer pays; page cache warm for both).
2. Change-to-visible latency at a remote mount over loopback: `share` in one
   home, `mount --peer` in another; single-file edits (default 100), each
   timed from the end of the write until the mount returns the new bytes.
   Median and 95th percentile; goal: median <= 1.5 s with the default
   debounce (1 s).
3. Holepunch Hyperdrive 13 (bench/hyperlab.py: when `node` is there, its
   node_modules are installed with `npm ci` if missing): `put` of the
   same trees into a corestore on disk; ratio p2pfs / Hyperdrive (goal >= 3).
   Only corestore and hyperdrive run: no hyperswarm, nothing leaves the host.

Run as root: `scripts/bench share` or `.venv/bin/python -m bench.bench_share
[--files N] [--size MIB] [--edits N]`.  The network part runs in a
loopback-only namespace (`unshare -n`); the temp dir is removed on exit.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import blake3

from bench import hyperlab
from bench.bench_mount import (REPO, MiB, Table, env, scratch_table, listening_address, mounted, p2pfs,
                               rerun_in_loopback_namespace)
from bench.netlab import LabError

def make_small_tree(root: Path, files: int) -> int:
    rnd = random.Random(3)
    total = 0
    dirs = max(1, files // 100)
    for d in range(dirs):
        (root / f"d{d:04d}").mkdir(parents=True)
    for i in range(files):
        data = rnd.randbytes(rnd.randrange(0, 4097))
        (root / f"d{i % dirs:04d}" / f"f{i:06d}").write_bytes(data)
        total += len(data)
    return total


def make_big(root: Path, size: int) -> None:
    root.mkdir()
    rnd = random.Random(4)
    with open(root / "big.bin", "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(rnd.randbytes(8 * MiB))


def native_read(root: Path) -> float:
    """Seconds to walk, read and hash every file under root (one thread)."""
    t = time.perf_counter()
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for de in it:
                if de.is_dir(follow_symlinks=False):
                    stack.append(de.path)
                else:
                    h = blake3.blake3()
                    with open(de.path, "rb", buffering=0) as f:
                        while data := f.read(1 << 20):
                            h.update(data)
    return time.perf_counter() - t


class ShareProcess:
    def __init__(self, home: Path, directory: Path, log: Path, *extra: str):
        self.log = open(log, "w+")
        self.proc = subprocess.Popen(p2pfs(home, "share", directory, "--listen", "127.0.0.1:0",
                                           "-q", *extra), env=env(), cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def ready(self, what: str, wait: float = 600) -> tuple[str, str]:
        address = listening_address(self.log, what, wait)
        text = Path(self.log.name).read_text(errors="replace")  # see listening_address
        key = re.search(r"^([ybndrfg8ejkmcpqxot1uwisza345h769]{52})$", text, re.M)
        return key.group(1), address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def first_import(work: Path, name: str, directory: Path) -> float:
    """Seconds from starting `share` until it serves version 1."""
    t = time.perf_counter()
    share = ShareProcess(work / f"home-{name}", directory, work / f"share-{name}.log")
    try:
        share.ready(f"share of {name}")
        return time.perf_counter() - t
    finally:
        share.stop()


def hyperdrive_put(work: Path, name: str, directory: Path) -> float | None:
    """Seconds of Hyperdrive 13's import of `directory`, or None (said why)."""
    why = hyperlab.missing()
    if why is None:
        try:
            return hyperlab.put(directory, work / f"corestore-{name}")[0]
        except LabError as exc:
            why = str(exc)
    print(f"  (no Hyperdrive row: {why})", flush=True)
    return None


def bench_import(table: Table, work: Path, files: int, size: int) -> None:
    small = work / "small"
    nbytes = make_small_tree(small, files)
    big = work / "big"
    make_big(big, size)
    for name, directory, count, total in (("small", small, files, nbytes),
                                          ("big", big, 1, size)):
        native = native_read(directory)
        took = first_import(work, name, directory)
        label = f"{files:,} small files" if name == "small" else f"one {size // MiB} MiB file"
        if count > 1:
            table.add(f"share first import, {label}: files/s",
                      f"{count / took:,.0f} files/s", f"{count / native:,.0f} read+hash",
                      native / took)
        table.add(f"share first import, {label}: MB/s",
                  f"{total / took / 1e6:,.0f} MB/s", f"{total / native / 1e6:,.0f} read+hash",
                  native / took)
        hyper = hyperdrive_put(work, name, directory)
        if hyper is not None:
            table.add(f"  vs Hyperdrive 13 put, {label}", f"{took:.1f} s",
                      f"{hyper:.1f} s hyperdrive", hyper / took, ">= 3")
        shutil.rmtree(work / f"home-{name}", ignore_errors=True)


def bench_latency(table: Table, work: Path, edits: int) -> None:
    src = work / "live"
    src.mkdir()
    (src / "note.txt").write_text("edit -1\n")
    share = ShareProcess(work / "home-live", src, work / "share-live.log")
    try:
        key, address = share.ready("share")
        mnt = work / "mnt-live"
        with mounted(work / "home-mount", key, mnt, "--peer", address):
            target = mnt / "note.txt"
            times = []
            for i in range(edits):
                want = f"edit {i}\n"
                with open(src / "note.txt", "w") as f:
                    f.write(want)
                t = time.perf_counter()
                deadline = t + 30
                while True:
                    try:
                        if target.read_text() == want:
                            break
                    except OSError:
                        pass
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"edit {i} never showed in the mount")
                    time.sleep(0.005)
                times.append(time.perf_counter() - t)
                time.sleep(random.Random(i).uniform(0, 0.2))  # edits at uneven moments
    finally:
        share.stop()
    times.sort()
    median = statistics.median(times)
    p95 = times[min(len(times) - 1, round(0.95 * len(times)) - 1)]
    table.add(f"change to visible in a remote mount ({edits} edits), median",
              f"{median:.2f} s", "goal 1.5 s", 1.5 / median, ">= 1")
    table.add(f"change to visible in a remote mount ({edits} edits), p95", f"{p95:.2f} s",
              "debounce 1 s", None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench_share")
    ap.add_argument("--files", type=int, default=100_000, help="small files (default 100,000)")
    ap.add_argument("--size", type=int, default=1024, help="MiB of the big file (default 1024)")
    ap.add_argument("--edits", type=int, default=100, help="single-file edits timed (default 100)")
    ap.add_argument("--no-import", action="store_true", help="only the latency rows")
    args = ap.parse_args(argv if argv is not None else [])
    if rerun_in_loopback_namespace("bench.bench_share", argv):
        return
    with scratch_table("share") as (table, work):
        if not args.no_import:
            bench_import(table, work, args.files, args.size * MiB)
        if args.edits:
            bench_latency(table, work, args.edits)


if __name__ == "__main__":
    main(sys.argv[1:])
