"""A seeder under attack (issue 7): an honest reader's throughput with the
attackers of acceptance 3 connected, as a ratio to the same read without
them, in the same run (goal >= 0.7).

The seeder is a `p2pfs seed` process limited to 256 descriptors; the
attackers (`bench.peers.attack`: 500 idle connections, 300 requesters that
never read, a Head flood) and the honest reader (`p2pfs cat` from a fresh
home) run on loopback.  Reads without and with the attack alternate; each
figure is the median of `--runs` pairs.  Also shown: the seeder's peak RSS
during the attack and its RSS after the attackers left, beside its
baseline.

`scripts/bench attack`, or `.venv/bin/python -m bench.bench_attack [--size MIB] [--runs N]`.
Only 127.0.0.1 is used; homes and files live in a temp dir removed on exit.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench.peers import attack, signed_head
from p2pfs import crypto

REPO = Path(__file__).resolve().parent.parent


def _cli(home, *args) -> list[str]:
    return [sys.executable, "-m", "p2pfs", "--home", str(home), *map(str, args)]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _rss(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes; RssAnon leaves out the store's mapped file pages (the
    drive's page cache, which the kernel reclaims at will)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _start_seeder(home: Path, key_text: str) -> tuple[subprocess.Popen, str]:
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    proc = subprocess.Popen(_cli(home, "seed", key_text, "--listen", "127.0.0.1:0"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(),
                            cwd=REPO, preexec_fn=limit)
    line = b""
    deadline = time.monotonic() + 30
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        ch = os.read(proc.stdout.fileno(), 1) if ready else b""
        if not ch:
            proc.kill()
            raise RuntimeError("the seeder did not start")
        line += ch
    return proc, line.split()[-1].decode()


async def _read(work: Path, n: int, key_text: str, address: str, size: int) -> float:
    home = work / f"reader{n}"
    started = time.perf_counter()
    res = await trio.run_process(_cli(home, "cat", key_text, "/big.bin", "--peer", address,
                                      "--timeout", "60"),
                                 capture_stdout=True, capture_stderr=True, check=False,
                                 env=_env(), cwd=REPO)
    elapsed = time.perf_counter() - started
    shutil.rmtree(home, ignore_errors=True)
    if res.returncode != 0 or len(res.stdout) != size:
        raise RuntimeError(f"honest read failed: {res.stderr.decode().strip()[-300:]}")
    return size / elapsed


async def _run(size_mib: int, runs: int, idle: int = 500, non_readers: int = 300,
               flooders: int = 1) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 8192), max(hard, 8192)))
    work = Path(tempfile.mkdtemp(prefix="p2pfs-bench-attack."))
    proc = None
    try:
        src = work / "src"
        src.mkdir()
        with open(src / "big.bin", "wb") as f:
            f.write(os.urandom(size_mib << 20))
        home = work / "owner"
        key_text = subprocess.run(_cli(home, "create", "-q", src), capture_output=True,
                                  check=True, env=_env(), cwd=REPO).stdout.decode().split()[-1]
        key = crypto.decode_key(key_text)
        head = signed_head(home, key)
        proc, address = _start_seeder(home, key_text)
        size = size_mib << 20
        await _read(work, 0, key_text, address, size)  # warm the seeder's page cache
        await trio.sleep(6)
        baseline = _rss(proc.pid)
        anon_baseline = _rss(proc.pid, "RssAnon")
        quiet, attacked, peaks, anon_peaks, after = [], [], [], [], []
        for n in range(runs):
            quiet.append(await _read(work, 1, key_text, address, size))
            peak = anon_peak = 0
            async with attack(address, key, head, idle=idle, non_readers=non_readers,
                              flooders=flooders):
                await trio.sleep(3)
                async with trio.open_nursery() as nursery:
                    async def sample():
                        nonlocal peak, anon_peak
                        while True:
                            peak = max(peak, _rss(proc.pid))
                            anon_peak = max(anon_peak, _rss(proc.pid, "RssAnon"))
                            await trio.sleep(0.1)
                    nursery.start_soon(sample)
                    attacked.append(await _read(work, 2, key_text, address, size))
                    nursery.cancel_scope.cancel()
            peaks.append(peak)
            anon_peaks.append(anon_peak)
            await trio.sleep(8)  # the janitor gives memory back every 5 s
            after.append(_rss(proc.pid))
        q, a = statistics.median(quiet), statistics.median(attacked)
        mib = 1 << 20
        print(f"{'figure':58} {'value':>14} {'baseline':>16} {'ratio':>7}")
        print(f"{'honest cat of ' + str(size_mib) + ' MiB, attackers connected (median of ' + str(runs) + ')':58} "
              f"{a / mib:10.0f} MiB/s {q / mib:10.0f} MiB/s {a / q:7.2f}   goal >= 0.7")
        print(f"{'seeder peak RSS during the attack (max)':58} {max(peaks) / mib:10.0f} MiB "
              f"{baseline / mib:12.0f} MiB {max(peaks) / baseline:7.2f}   goal < 200 MiB")
        print(f"{'  of it anonymous (RssAnon, no mapped store pages)':58} {max(anon_peaks) / mib:10.0f} MiB "
              f"{anon_baseline / mib:12.0f} MiB {max(anon_peaks) / anon_baseline:7.2f}")
        print(f"{'seeder RSS 8 s after the attackers left (max)':58} {max(after) / mib:10.0f} MiB "
              f"{baseline / mib:12.0f} MiB {max(after) / baseline:7.2f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_attack")
    parser.add_argument("--size", type=int, default=256, help="MiB read by the honest reader")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=int, default=500, help="idle attacking connections")
    parser.add_argument("--non-readers", type=int, default=300, help="requesters that never read")
    parser.add_argument("--flooders", type=int, default=1, help="Head flooders")
    args = parser.parse_args(argv if argv is not None else [])
    trio.run(_run, args.size, args.runs, args.idle, args.non_readers, args.flooders)


if __name__ == "__main__":
    main(sys.argv[1:])
