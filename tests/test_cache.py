"""The cache of drives a home neither owns nor pins (issue 12, acceptance 3):
a cap, least-recently-read eviction, pin / unpin / gc / forget.

Real seeders and mounts in separate homes over loopback: run under
`unshare -n` (as scripts/test does).  Every process is stopped in a `finally`.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading

import pytest

from helpers import create, file_digest, make_tree, run_cli, write_random
from test_mount import mounted
from test_mount_net import seeding

MiB = 1 << 20
GiB = 1 << 30


def info(home, key) -> dict:
    return json.loads(run_cli(home, "info", key, "--json").out)


def du(path) -> int:
    """Bytes the tree takes on disk, as `du` counts them."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


class Sampler:
    """The largest value of `measure()` seen, sampled from a thread until stopped."""

    def __init__(self, measure, interval: float = 0.05):
        self.measure = measure
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure())


def capped_read(tmp_path, home, home2, size: int, cap: str, limit_of) -> None:
    """`cat` a file of `size` bytes through a mount of a remote drive capped
    at `cap`: `limit_of(sampler peak)` is checked while it runs; the bytes are
    right, and a second read refetches what was evicted.  Drives home2 owns
    or pins keep every block."""
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", size, seed=12)
    (src / "small.txt").write_text("small\n")
    key = create(home, src)
    # home2 also owns a drive and pins another: neither may lose a block
    own_src = make_tree(tmp_path / "own", files=30, big=3 * MiB)
    own = create(home2, own_src)
    pin_src = make_tree(tmp_path / "pinned", files=30, big=3 * MiB, seed=5)
    pinned = create(home, pin_src)
    mnt = tmp_path / "mnt"
    with seeding(home, key) as addr:
        run_cli(home2, "pin", pinned, "--peer", addr)
        kept = {k: info(home2, k)["bytes_held"] for k in (own, pinned)}
        assert kept[pinned] >= 3 * MiB
        with mounted(home2, key, mnt, "--peer", addr, "--cache-size", cap):
            with Sampler(lambda: du(home2)) as disk, \
                    Sampler(lambda: info(home2, key)["bytes_held"], 0.2) as held:
                assert file_digest(mnt / "big.bin") == file_digest(src / "big.bin")
            limit_of(disk.peak, held.peak)
            after_first = info(home2, key)
            assert after_first["bytes_held"] < size // 2, after_first
            assert after_first["state"] == "cache"
            # again: what was evicted comes back from the peer, verified
            assert file_digest(mnt / "big.bin") == file_digest(src / "big.bin")
            print(f"cat of {size >> 20} MiB capped at {cap}: du of the home peaked at "
                  f"{disk.peak / 1e6:.1f} MB ({disk.samples} samples), the drive held at most "
                  f"{held.peak / 1e6:.1f} MB")
        for k, nbytes in kept.items():
            got = info(home2, k)
            assert got["bytes_held"] == nbytes and got["bytes_cached"] == 0, (k, got)
        assert info(home2, pinned)["state"] == "pinned" and info(home2, own)["state"] == "owned"


def test_a_capped_cache_stays_under_its_cap_and_refetches(tmp_path, home, home2):
    def check(disk, held):
        # the drive's blocks: the cap plus what is in flight (the fetcher's and
        # the mount's read-ahead, about 20 MiB), never the whole 96 MiB file
        assert held < 8 * MiB + 28 * MiB, held
    capped_read(tmp_path, home, home2, 96 * MiB, "8M", check)


@pytest.mark.slow
def test_cat_of_1gib_through_a_mount_capped_at_100m(tmp_path, home, home2):
    """Acceptance 3 as written: du of the home stays under 120 MB."""
    def check(disk, held):
        assert disk < 120_000_000, f"du of the home reached {disk / 1e6:.1f} MB"
    capped_read(tmp_path, home, home2, GiB, "100M", check)


def fetched_copy(tmp_path, home, home2):
    """A drive in `home` with two folders, seeded; yields (key, addr, src)."""
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "other").mkdir()
    write_random(src / "keep" / "a.bin", 3 * 65536 + 5, seed=1)
    write_random(src / "other" / "b.bin", 4 * 65536, seed=2)
    (src / "top.txt").write_text("top\n")
    return src, create(home, src)


def test_pin_a_folder_gc_and_unpin(tmp_path, home, home2):
    src, key = fetched_copy(tmp_path, home, home2)
    with seeding(home, key) as addr:
        out = run_cli(home2, "pin", key, "/keep", "--peer", addr).out
        assert "pinned /keep of drive" in out and "4 content blocks" in out
        got = info(home2, key)
        assert got["state"] == "folders" and got["pinned_paths"] == ["/keep"]
        assert got["bytes_pinned"] == 3 * 65536 + 5
        # read the rest: it is cache
        assert run_cli(home2, "cat", key, "/other/b.bin", "--peer", addr).stdout == \
            (src / "other" / "b.bin").read_bytes()
        assert info(home2, key)["bytes_cached"] >= 4 * 65536
    # offline now: gc evicts the cache, never the pinned folder
    out = run_cli(home2, "gc").out
    assert "evicted" in out
    got = info(home2, key)
    assert got["bytes_cached"] == 0 and got["bytes_pinned"] == 3 * 65536 + 5
    assert run_cli(home2, "cat", key, "/keep/a.bin").stdout == (src / "keep" / "a.bin").read_bytes()
    r = run_cli(home2, "cat", key, "/other/b.bin", check=False)
    assert r.returncode == 1 and re.search("not (held|available)", r.stderr) and not r.stdout
    # the pinned folder was read again: still not evictable
    run_cli(home2, "gc")
    assert info(home2, key)["bytes_pinned"] == 3 * 65536 + 5
    r = run_cli(home2, "unpin", key, "/other", check=False)
    assert r.returncode == 2 and "not pinned" in r.stderr
    r = run_cli(home2, "unpin", f"{key}@1", "/keep", check=False)  # was taken as KEY
    assert r.returncode == 2 and "without @VERSION" in r.stderr and len(r.stderr.splitlines()) == 1
    assert info(home2, key)["state"] == "folders"
    assert "unpinned /keep" in run_cli(home2, "unpin", key, "/keep").out
    assert info(home2, key)["state"] == "cache"
    run_cli(home2, "cat", key, "/keep/a.bin")  # read once more: now it is cache
    run_cli(home2, "gc")
    assert run_cli(home2, "cat", key, "/keep/a.bin", check=False).returncode == 1


def mib_files(tmp_path, home, n: int):
    """A drive in `home` of `n` files of 1 MiB, /f0.bin ...: (src, key)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n):
        write_random(src / f"f{i}.bin", MiB, seed=i)
    return src, create(home, src)


def test_gc_keeps_the_cap_and_the_most_recently_read(tmp_path, home, home2):
    src, key = mib_files(tmp_path, home, 4)
    with seeding(home, key) as addr:
        for i in (0, 1, 2, 3, 1):  # f1 read last
            run_cli(home2, "cat", key, f"/f{i}.bin", "--peer", addr)
    assert info(home2, key)["bytes_cached"] == 4 * MiB
    out = run_cli(home2, "gc", "--cache-size", "2.5M").out
    assert "cap 2.5 MiB" in out
    assert run_cli(home2, "cat", key, "/f1.bin").stdout == (src / "f1.bin").read_bytes()
    assert run_cli(home2, "cat", key, "/f3.bin").stdout == (src / "f3.bin").read_bytes()
    for i in (0, 2):  # least recently read: gone
        assert run_cli(home2, "cat", key, f"/f{i}.bin", check=False).returncode == 1
    assert info(home2, key)["bytes_held"] <= 2.5 * MiB


def test_forget_asks_then_drops_the_drive(tmp_path, home, home2):
    src, key = fetched_copy(tmp_path, home, home2)
    with seeding(home, key) as addr:
        run_cli(home2, "pin", key, "--peer", addr)
    r = run_cli(home2, "forget", key, check=False)  # no terminal to ask on: refused
    assert r.returncode == 2 and "--yes" in r.stderr
    assert info(home2, key)["bytes_held"] > 0
    r = run_cli(home, "forget", key, "--yes", check=False)
    assert r.returncode == 2 and "owned" in r.stderr  # the owner's only copy is never dropped
    out = run_cli(home2, "forget", key, "--yes").out
    assert out.startswith(f"forgot drive {key}")
    assert key not in run_cli(home2, "drives").out
    r = run_cli(home2, "info", key, "--no-lan", "--no-dht", check=False)
    assert r.returncode == 1 and "unknown drive" in r.stderr
    r = run_cli(home2, "forget", key, "--yes", check=False)
    assert r.returncode == 1


def test_forget_on_a_terminal_asks(tmp_path, home, home2):
    src, key = fetched_copy(tmp_path, home, home2)
    with seeding(home, key) as addr:
        run_cli(home2, "pin", key, "--peer", addr)
    from helpers import cli_command, cli_env, REPO
    import shlex
    cmd = " ".join(shlex.quote(c) for c in cli_command(home2, "forget", key))
    no = subprocess.run(["script", "-qec", cmd, "/dev/null"], input=b"n\n", capture_output=True,
                        env=cli_env(), cwd=REPO, timeout=60)
    assert no.returncode == 1 and b"[y/N]" in no.stdout
    assert info(home2, key)["bytes_held"] > 0
    yes = subprocess.run(["script", "-qec", cmd, "/dev/null"], input=b"y\n", capture_output=True,
                         env=cli_env(), cwd=REPO, timeout=60)
    assert yes.returncode == 0 and b"forgot drive" in yes.stdout
    assert run_cli(home2, "info", key, "--no-lan", "--no-dht", check=False).returncode == 1


def test_cache_size_in_the_configuration_file(tmp_path, home, home2):
    _src, key = mib_files(tmp_path, home, 3)
    config = tmp_path / "config.toml"
    config.write_text('bootstrap = []\ncache_size = "1M"\n')
    with seeding(home, key) as addr:
        env = {"P2PFS_CONFIG": str(config)}
        for i in range(3):
            run_cli(home2, "cat", key, f"/f{i}.bin", "--peer", addr, env=env)
    assert info(home2, key)["bytes_held"] <= MiB + 65536  # the index and at most the cap
    config.write_text('cache_size = "lots"\n')
    r = run_cli(home2, "gc", env={"P2PFS_CONFIG": str(config)}, check=False)
    assert r.returncode == 2 and "cache_size" in r.stderr


def test_a_full_disk_does_not_end_a_read_of_held_blocks(tmp_path, home, small_disk):
    """The cache's bookkeeping of what was read cannot be written (the disk
    holding the home is full): the read still succeeds, with one warning."""
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "a.bin", 3 * MiB // 2, seed=4)
    key = create(home, src, "--block-size", "4096")  # many blocks: many records to write
    home2 = small_disk / "home2"
    with seeding(home, key) as addr:
        run_cli(home2, "pin", key, "--peer", addr, "--no-lan", "--no-dht")
    run_cli(home2, "unpin", key)  # held whole, a cache drive, nothing read yet
    with open(small_disk / "filler", "wb") as f:
        with pytest.raises(OSError, match="No space left"):
            while True:
                f.write(bytes(1 << 16))
                f.flush()
    r = run_cli(home2, "cat", key, "/a.bin", "--no-lan", "--no-dht")
    assert r.stdout == (src / "a.bin").read_bytes()
    warnings = r.stderr.splitlines()
    assert len(warnings) == 1 and "bookkeeping was not written" in warnings[0] \
        and "is full" in warnings[0], r.stderr


def test_touches_ride_on_the_block_writes_of_a_fetch(tmp_path):
    """While a fetch's writer stores a drive's blocks (Cache.riding), the
    touches of what was read wait for its next transaction (Cache.take,
    Store.put_block_items(touches=...)) instead of a commit of their own;
    once it is idle, or when very many gathered, flush writes them itself."""
    import os
    from types import SimpleNamespace

    from p2pfs import cache as cache_mod
    from p2pfs.store import Store

    key = os.urandom(32)
    block = os.urandom(65536)
    drive = SimpleNamespace(key=key, block_size=len(block))
    with Store(tmp_path / "home") as store:
        store.put_block_items(key, [(i, block) for i in range(4)])
        cache = cache_mod.Cache(store, None)
        cache.riding = True
        cache.touched(drive, [0, 1])
        cache.flush()
        assert store.cached(key) == (0, 0)  # left for the writer
        touches = cache.take(key)
        assert touches is not None and touches[0] == [0, 1]
        assert cache.take(key) is None
        store.put_block_items(key, [(4, block)], touches=touches)
        assert store.cached(key) == (2, 2 * len(block))
        # touches of 64 MiB while riding (blocks not held are skipped): the
        # reader flushes them itself, as when nobody flushed for long
        not_held = range(100, 100 + cache_mod.SYNC_FLUSH_BYTES // len(block))
        cache.touched(drive, [2, 3, *not_held])
        assert store.cached(key) == (4, 4 * len(block))
        # idle again: flush writes at once
        cache.riding = False
        cache.touched(drive, [4])
        cache.flush()
        assert store.cached(key) == (5, 5 * len(block))
        assert cache.take(key) is None


def test_a_block_read_many_times_counts_once_towards_a_flush(tmp_path):
    """Small reads touch one block many times: only blocks new to the
    pending set count towards FLUSH_BYTES (each wake costs a commit)."""
    import os
    from types import SimpleNamespace

    from p2pfs import cache as cache_mod
    from p2pfs.store import Store

    drive = SimpleNamespace(key=os.urandom(32), block_size=65536)
    wakes = []
    with Store(tmp_path / "home") as store:
        cache = cache_mod.Cache(store, None)
        cache.wake = lambda: wakes.append(1)
        for _ in range(2 * cache_mod.FLUSH_BYTES // drive.block_size):
            cache.touched(drive, [7])  # 4 KiB reads of one 64 KiB block
        assert wakes == []
        cache.touched(drive, range(100, 100 + cache_mod.FLUSH_BYTES // drive.block_size))
        assert wakes == [1]


def test_an_eviction_leaves_its_pages_to_the_next_write(tmp_path):
    """LMDB reuses the pages a commit freed only from the commit after the
    next one: `evict` commits once more (Store.settle), so the first write
    after an eviction reuses the evicted blocks' pages instead of growing
    the store file by its own size."""
    import os
    from types import SimpleNamespace

    from p2pfs import cache as cache_mod
    from p2pfs.store import Store
    from p2pfs.types import Head

    key = os.urandom(32)
    size = 65536
    n = 320  # 20 MiB
    drive = SimpleNamespace(key=key, block_size=size)
    with Store(tmp_path / "home") as store:
        store.put_head(key, Head(1, bytes(32), bytes(64)))  # a cache drive: known, not kept
        store.put_block_items(key, [(i, os.urandom(size)) for i in range(n)])
        cache = cache_mod.Cache(store, None)
        cache.touched(drive, range(n))
        cache.flush()
        blocks, freed = cache_mod.evict(store, 0)
        assert (blocks, freed) == (n, n * size)
        before = store.env.info()["last_pgno"]
        store.put_block_items(key, [(n + i, os.urandom(size)) for i in range(n)])
        grown = (store.env.info()["last_pgno"] - before) * 4096
        assert grown < 2 << 20, f"the write after an eviction grew the store by {grown} bytes"


def test_a_capped_fetch_stores_in_steps_of_the_cap():
    """The fetcher's writer stores a capped cache drive's blocks in runs of
    at most Cache.step() bytes (one block at least), everything at once
    without a cap."""
    from p2pfs import cache as cache_mod
    from p2pfs.net.fetcher import _steps

    items = [(i, b"x" * 65536) for i in range(100)]
    assert list(_steps(items, None)) == [items]
    assert list(_steps([], 1 << 20)) == [[]]
    runs = list(_steps(items, 1 << 20))
    assert [len(r) for r in runs] == [16] * 6 + [4]
    assert [b for r in runs for b, _d in r] == list(range(100))
    assert [len(r) for r in _steps(items[:3], 1000)] == [1, 1, 1]  # a block bigger than a step
    assert cache_mod.Cache(None, None).step() is None
    assert cache_mod.Cache(None, 100_000_000).step() == 12_500_000
    assert cache_mod.Cache(None, 1000).step() == cache_mod.MIN_STEP
