"""The owner's writable mount (issue 10), each figure beside the same work
done in a native directory on the same disk, in the same run.

1. `dd if=/dev/zero bs=1M count=N conv=fsync` into the mount (the fsync
   commits: the figure includes sealing and signing the version) against a
   native file.  Goal >= 0.5.
2. Untar of a tree of N small files (made here: 100 directories, sizes
   0-2 KiB) into the mount, until the commit after it is durable (a
   directory fsync), against native untar plus `sync -f`.  Goal >= 0.3.
   Then `git status` in a repository of that tree, mount against native.
3. fio 4 KiB random writes (psync, 64 MiB file, 20 s) IOPS, mount against
   native.

Run as root: `scripts/bench rw` or `.venv/bin/python -m bench.bench_rw
[--dd-mib N] [--files N] [--fio-seconds N]`.  Everything runs in a
loopback-only namespace and is removed on exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.bench_mount import (MiB, Table, mounted, scratch_table, p2pfs, rate, rerun_in_loopback_namespace,
                                run)


def timed(cmd, **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    return time.perf_counter() - t


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_tree_tar(work: Path, files: int) -> Path:
    tree = work / "tree"
    for d in range(100):
        (tree / f"dir{d:02d}").mkdir(parents=True)
    for i in range(files):
        (tree / f"dir{i % 100:02d}" / f"f{i}.c").write_bytes(b"x" * (i * 37 % 2048))
    tar = work / "tree.tar"
    subprocess.run(["tar", "-C", str(work), "-cf", str(tar), "tree"], check=True)
    shutil.rmtree(tree)
    return tar


def bench_dd(table: Table, native: Path, mnt: Path, mib: int) -> None:
    def dd(target: Path) -> float:
        seconds = timed(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}",
                         "conv=fsync"])
        target.unlink()
        return seconds
    n, m = dd(native / "dd.bin"), dd(mnt / "dd.bin")
    table.add(f"dd {mib} MiB conv=fsync", rate(mib * MiB, m), rate(mib * MiB, n), n / m, ">= 0.5")


def bench_untar(table: Table, native: Path, mnt: Path, tar: Path, files: int) -> None:
    def untar(target: Path) -> float:
        t = time.perf_counter()
        subprocess.run(["tar", "-C", str(target), "-xf", str(tar)], check=True)
        fsync_dir(target)  # the mount: its commit; native: flushed like it
        subprocess.run(["sync", "-f", str(target)], check=True)
        return time.perf_counter() - t
    n, m = untar(native), untar(mnt)
    table.add(f"untar {files:,} files", f"{m:.1f} s", f"{n:.1f} s", n / m, ">= 0.3")
    git = ["git", "-c", "core.untrackedCache=false"]
    env = dict(os.environ, GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@example.invalid",
               GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@example.invalid")
    for target in (native, mnt):
        repo = target / "tree"
        subprocess.run(git + ["init", "-q", str(repo)], check=True, env=env)
        subprocess.run(git + ["-C", str(repo), "add", "-A"], check=True, env=env)
        subprocess.run(git + ["-C", str(repo), "commit", "-q", "-m", "tree"], check=True, env=env)

    def status(target: Path) -> float:
        cmd = git + ["-C", str(target / "tree"), "status", "--porcelain"]
        timed(cmd, env=env)  # warm: the second run is what a person waits for
        return min(timed(cmd, env=env) for _ in range(3))
    n, m = status(native), status(mnt)
    table.add("git status (warm)", f"{m * 1000:.0f} ms", f"{n * 1000:.0f} ms", n / m)


def bench_fio(table: Table, native: Path, mnt: Path, seconds: int) -> None:
    def iops(target: Path) -> float:
        out = subprocess.run(
            ["fio", "--name=rand", f"--directory={target}", "--size=64M", "--bs=4k",
             "--rw=randwrite", "--ioengine=psync", f"--runtime={seconds}", "--time_based",
             "--output-format=terse", "--terse-version=3"],
            check=True, capture_output=True, text=True).stdout
        return float(out.strip().splitlines()[-1].split(";")[48])  # write iops
    n, m = iops(native), iops(mnt)
    table.add("fio 4 KiB random writes", f"{m:,.0f} IOPS", f"{n:,.0f} IOPS", m / n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench_rw")
    ap.add_argument("--dd-mib", type=int, default=1024, help="MiB dd writes (default 1024)")
    ap.add_argument("--files", type=int, default=70_000, help="files in the tar (default 70000)")
    ap.add_argument("--fio-seconds", type=int, default=20, help="fio's run time (default 20)")
    args = ap.parse_args(argv if argv is not None else [])
    if rerun_in_loopback_namespace("bench.bench_rw", argv):
        return
    for tool in ("dd", "tar", "git", "fio"):
        if shutil.which(tool) is None:
            print(f"  bench_rw needs {tool} (scripts/setup-env.sh installs it)")
            return
    with scratch_table("rw") as (table, work):
        home, src, native, mnt = work / "home", work / "src", work / "native", work / "mnt"
        for d in (src, native):
            d.mkdir()
        key = run(p2pfs(home, "create", "-q", src)).stdout.decode().split()[-1]
        tar = make_tree_tar(work, args.files)
        with mounted(home, key, mnt, "--rw"):
            bench_dd(table, native, mnt, args.dd_mib)
            bench_untar(table, native, mnt, tar, args.files)
            bench_fio(table, native, mnt, args.fio_seconds)
        log = run(p2pfs(home, "log", key)).stdout.decode().splitlines()
        print(f"  {len(log)} versions committed; newest: {log[0] if log else '-'}")


if __name__ == "__main__":
    main(sys.argv[1:])
