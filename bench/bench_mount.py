"""Mount benchmark (issue 4), each figure beside a baseline from the same run.

1. Sequential read through the mount of a fully local 1 GiB file against
   `cat` of the same bytes from the native file: cold (page cache dropped
   with `echo 3 > /proc/sys/vm/drop_caches` before each run) and warm.
   Goals: >= 0.5 cold, >= 0.9 warm.
2. `ls -lR` and `find -printf '%p %s %m'` over 10,000 entries through the
   mount, attributes cached (second and later runs), against the native tree.
3. With a seeder (when the CLI has `seed`): cold remote read through the
   mount against `p2pfs cat` of the same file from the same seeder (goal >=
   0.8), and the mount's read with read-ahead against without it
   (P2PFS_READAHEAD=0 in the mount's environment), on loopback and through
   `bench.netlab`'s delay proxy (50 ms RTT).

Run as root: `scripts/bench mount` or `.venv/bin/python -m bench.bench_mount
[--size MIB] [--entries N] [--runs N]`.  Every mount is unmounted and the
temp dir (files, homes) removed on exit; network parts run in a loopback-only
namespace (`unshare -n`).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
RTT = 0.05  # s added by the delay proxy for the read-ahead row
DELAYED_BYTES = 256 * MiB  # read through the proxy (the link is slow)


def p2pfs(home, *args) -> list[str]:
    return [sys.executable, "-m", "p2pfs", "--home", str(home), *map(str, args)]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("P2PFS_HOME", None)
    return e


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, env=env(), cwd=REPO, **kw)


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(cmd, cold: bool) -> float:
    if cold:
        drop_caches()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env(), cwd=REPO)
    return time.perf_counter() - t


def best(cmd, runs: int, cold: bool = False, warmup: bool = False) -> float:
    if warmup:
        timed(cmd, False)
    return min(timed(cmd, cold) for _ in range(runs))


@contextmanager
def mounted(home, key, mnt: Path, *extra, environ=None):
    mnt.mkdir(exist_ok=True)
    e = env()
    e.update(environ or {})
    res = subprocess.run(p2pfs(home, "mount", key, mnt, "--daemon", *extra), env=e, cwd=REPO,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"mount failed: {res.stderr}")
    pid = int(re.search(r"\(pid (\d+)\)", res.stderr).group(1))
    try:
        yield pid
    finally:
        subprocess.run(["fusermount3", "-u", "-z", "-q", str(mnt)], capture_output=True)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, what: str, figure: str, baseline: str, ratio: float | None, goal: str = ""):
        verdict = ""
        if ratio is not None and goal:
            verdict = "ok" if ratio >= float(goal.lstrip(">= ")) else "below goal"
        self.rows.append((what, figure, baseline, f"{ratio:.2f}" if ratio is not None else "",
                          f"{goal} {verdict}".strip()))
        print(f"  {what}: {figure} vs {baseline}" + (f" -> {ratio:.2f}" if ratio else ""), flush=True)

    def show(self) -> None:
        head = ("what", "mount", "baseline", "ratio", "goal")
        widths = [max(len(r[i]) for r in self.rows + [head]) for i in range(5)]
        for r in [head] + self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def rate(size: int, seconds: float) -> str:
    return f"{size / seconds / MiB:,.0f} MiB/s"


def bench_sequential(table: Table, work: Path, size: int, runs: int) -> None:
    src = work / "seq"
    src.mkdir()
    big = src / "big.bin"
    rnd = random.Random(1)
    with open(big, "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(rnd.randbytes(8 * MiB))
    home = work / "home-seq"
    t = time.perf_counter()
    key = run(p2pfs(home, "create", "-q", src)).stdout.decode().strip().splitlines()[-1]
    print(f"  (create of {size // MiB} MiB: {time.perf_counter() - t:.1f} s)", flush=True)
    mnt = work / "mnt-seq"
    target = str(mnt / "big.bin")
    can_drop = drop_caches()
    if can_drop:
        # Truly cold: a fresh mount process each run (LMDB pages mapped by a
        # running mount survive drop_caches), then every cache dropped.
        native = best(["cat", str(big)], runs, cold=True)
        cold = []
        for _ in range(runs):
            with mounted(home, key, mnt):
                cold.append(timed(["cat", target], True))
        table.add(f"sequential read {size // MiB} MiB, cold", rate(size, min(cold)),
                  f"native cat {rate(size, native)}", native / min(cold), ">= 0.5")
    else:
        print("  (not root: cannot drop the page cache; cold rows skipped)")
    with mounted(home, key, mnt):
        native = best(["cat", str(big)], runs, warmup=True)
        warm = best(["cat", target], runs, warmup=True)
        table.add(f"sequential read {size // MiB} MiB, warm", rate(size, warm),
                  f"native cat {rate(size, native)}", native / warm, ">= 0.9")
        if can_drop:
            # Page cache dropped, store pages still mapped by the mount: the
            # cost of FUSE plus verification alone, and the kernel read size.
            dev = os.stat(mnt).st_dev
            ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
            tuned = ra.read_text().strip()
            fast = best(["cat", target], runs, cold=True)
            table.add("read, kernel cache dropped, store mapped", rate(size, fast),
                      f"native cat {rate(size, native)} (warm)", native / fast)
            if ra.exists():
                ra.write_text("128")
                slow = best(["cat", target], runs, cold=True)
                ra.write_text(tuned)
                table.add(f"same, read_ahead_kb {tuned} vs 128", rate(size, fast),
                          rate(size, slow), slow / fast)


def bench_listing(table: Table, work: Path, entries: int, runs: int) -> None:
    src = work / "tree"
    per_dir = 100
    for d in range(entries // per_dir):
        sub = src / f"dir{d:04d}"
        sub.mkdir(parents=True)
        for i in range(per_dir - 1):
            (sub / f"file{i:04d}.txt").write_bytes(b"x" * (i % 50))
    home = work / "home-tree"
    key = run(p2pfs(home, "create", "-q", src)).stdout.decode().strip().splitlines()[-1]
    mnt = work / "mnt-tree"
    count = sum(1 for _ in src.rglob("*"))
    with mounted(home, key, mnt):
        for name, cmd in (("ls -lR", lambda root: ["ls", "-lR", str(root)]),
                          ("find -printf", lambda root: ["find", str(root), "-printf",
                                                         "%p %s %m\n"])):
            first = timed(cmd(mnt), False)
            native = best(cmd(src), runs, warmup=True)
            cached = best(cmd(mnt), runs)
            table.add(f"{name} {count:,} entries, cached", f"{cached * 1000:.0f} ms",
                      f"native {native * 1000:.0f} ms (first through mount {first * 1000:.0f} ms)",
                      native / cached)


def has_seed() -> bool:
    res = subprocess.run(p2pfs("/nonexistent", "seed", "--help"), capture_output=True, env=env(),
                         cwd=REPO)
    return res.returncode == 0


def listening_address(log, what: str, wait: float = 30) -> str:
    """The HOST:PORT a process prints as 'listening on HOST:PORT' in `log`."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        # a file description of our own: seeking the one the process writes
        # through would move its offset, and a write between our seek and read
        # would land over the start of the log
        m = re.search(r"listening on ([0-9.]+:\d+)", Path(log.name).read_text(errors="replace"))
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


def bench_remote(table: Table, work: Path, size: int, runs: int) -> None:
    """Seeder and reader on loopback (inside this process's namespace)."""
    seed_home = work / "home-seq"
    key = run(p2pfs(seed_home, "drives")).stdout.decode().split()[0]
    log = open(work / "seed.log", "w+")
    seeder = subprocess.Popen(p2pfs(seed_home, "seed", key, "--listen", "127.0.0.1:0"),
                              stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
    try:
        addr = listening_address(log, "seeder")

        def cold_home(name):
            home = work / name
            shutil.rmtree(home, ignore_errors=True)
            return home

        def cat_once() -> float:
            home = cold_home("home-cat")
            t = time.perf_counter()
            subprocess.run(p2pfs(home, "cat", key, "/big.bin", "--peer", addr), check=True,
                           stdout=subprocess.DEVNULL, env=env(), cwd=REPO)
            return time.perf_counter() - t

        def mount_once(environ) -> float:
            home = cold_home("home-mnt")
            mnt = work / "mnt-remote"
            with mounted(home, key, mnt, "--peer", addr, environ=environ):
                t = time.perf_counter()
                subprocess.run(["cat", str(mnt / "big.bin")], check=True, stdout=subprocess.DEVNULL)
                return time.perf_counter() - t

        # Interleaved, best of `runs`: the machine is shared and loopback noisy.
        cats, ahead, none = [], [], []
        for _ in range(runs):
            cats.append(cat_once())
            ahead.append(mount_once({}))
            none.append(mount_once({"P2PFS_READAHEAD": "0"}))
        cat_s = min(cats)
        results = {"read-ahead": min(ahead), "no read-ahead": min(none)}
        # The same through a delay proxy: where read-ahead should pay.
        proxy_log = open(work / "proxy.log", "w+")
        proxy = subprocess.Popen([sys.executable, "-m", "bench.netlab", "proxy", "--listen",
                                  "127.0.0.1:0", "--target", addr, "--rtt", str(RTT)],
                                 stdout=proxy_log, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
        try:
            paddr = listening_address(proxy_log, "delay proxy")
            part = min(size, DELAYED_BYTES)

            def delayed_once(environ) -> float:
                home = cold_home("home-mnt")
                mnt = work / "mnt-remote"
                with mounted(home, key, mnt, "--peer", paddr, environ=environ):
                    t = time.perf_counter()
                    with open(mnt / "big.bin", "rb") as f:
                        left = part
                        while left > 0:
                            n = len(f.read(min(left, 1 << 20)))
                            if not n:
                                break
                            left -= n
                    return time.perf_counter() - t

            lat_ahead, lat_none = [], []
            for _ in range(runs):
                lat_ahead.append(delayed_once({}))
                lat_none.append(delayed_once({"P2PFS_READAHEAD": "0"}))
        finally:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
            proxy_log.close()
        table.add(f"cold remote read {size // MiB} MiB via mount", rate(size, results["read-ahead"]),
                  f"p2pfs cat {rate(size, cat_s)}", cat_s / results["read-ahead"], ">= 0.8")
        table.add("remote mount read, read-ahead vs none", rate(size, results["read-ahead"]),
                  rate(size, results["no read-ahead"]), results["no read-ahead"] / results["read-ahead"])
        table.add(f"same, {part // MiB} MiB at {RTT * 1000:.0f} ms RTT (proxy)",
                  rate(part, min(lat_ahead)), rate(part, min(lat_none)),
                  min(lat_none) / min(lat_ahead))
    finally:
        seeder.send_signal(signal.SIGTERM)
        try:
            seeder.wait(10)
        except subprocess.TimeoutExpired:
            seeder.kill()
        log.close()


def terminate(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def in_workdir(name: str, body) -> None:
    """`body(table, work)` in a fresh temp dir (removed after), then the table."""
    table = Table()
    work = Path(tempfile.mkdtemp(prefix=f"p2pfs-bench-{name}-", dir=os.environ.get("TMPDIR", "/tmp")))
    try:
        body(table, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    table.show()


def rerun_in_loopback_namespace(module: str, argv: list[str] | None) -> bool:
    """Run `python -m module argv` again inside a loopback-only network
    namespace (no packet can leave) unless already there; True if it did."""
    if os.environ.get("P2PFS_BENCH_NETNS") == "1" or not shutil.which("unshare") \
            or os.geteuid() != 0:
        return False
    cmd = ["unshare", "-n", "--", "bash", "-c", 'ip link set lo up && exec "$@"', "bench",
           sys.executable, "-m", module, *(argv or [])]
    subprocess.run(cmd, check=True, env={**env(), "P2PFS_BENCH_NETNS": "1"}, cwd=REPO)
    return True


@contextmanager
def scratch_table(name: str) -> Iterator[tuple[Table, Path]]:
    """A Table and a fresh work directory (under $TMPDIR) for one benchmark:
    the directory is removed and the table printed when the block ends."""
    table = Table()
    work = Path(tempfile.mkdtemp(prefix=f"p2pfs-bench-{name}-", dir=os.environ.get("TMPDIR", "/tmp")))
    try:
        yield table, work
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    table.show()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench_mount")
    ap.add_argument("--size", type=int, default=1024, help="MiB of the big file (default 1024)")
    ap.add_argument("--entries", type=int, default=10_000, help="entries of the listing tree")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (best is kept)")
    ap.add_argument("--no-remote", action="store_true", help="skip the seeder rows")
    args = ap.parse_args(argv if argv is not None else [])
    if rerun_in_loopback_namespace("bench.bench_mount", argv):
        return
    size = args.size * MiB
    with scratch_table("mount") as (table, work):
        bench_sequential(table, work, size, args.runs)
        bench_listing(table, work, args.entries, args.runs)
        if args.no_remote:
            pass
        elif has_seed():
            try:
                bench_remote(table, work, size, args.runs)
            except (subprocess.CalledProcessError, RuntimeError) as exc:
                # Keep the local rows; say which remote step failed.
                table.rows.append(("remote rows", "FAILED", str(exc)[:100], "", ""))
                print(f"  remote rows FAILED: {exc}", flush=True)
                # the seeder says why it dropped peers (or how it crashed)
                seed_log = work / "seed.log"
                if seed_log.exists():
                    tail = seed_log.read_text(errors="replace").splitlines()[-30:]
                    print("  seeder's log, last lines:\n" + "\n".join(f"    {t}" for t in tail),
                          flush=True)
        else:
            print("  (no `p2pfs seed` in this build: remote rows skipped)")


if __name__ == "__main__":
    main(sys.argv[1:])
