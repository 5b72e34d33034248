"""Drive views: reading at block boundaries, versions, and a drive fed by a peer
(an in-process BlockSource that serves another store's blocks with proofs)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from p2pfs import crypto
from p2pfs.drive import Drive, verify_drive
from p2pfs.publish import create_drive, import_directory
from p2pfs.errors import (BlockUnavailableError, ForkError, NotFoundError, UsageError,
                          VerificationError)
from p2pfs.store import Store
from p2pfs.types import Head, Node

from helpers import REPO, cli_env, make_tree, run_cli

BS = 4096


class PeerSource:
    """A BlockSource backed by another node's Drive: requests exactly what the
    receiving drive asks for and hands the answers to accept_block."""

    def __init__(self, remote: Drive, tamper=None):
        self.remote = remote
        self.tamper = tamper
        self.fetched: list[int] = []
        self.path_requests: list[bytes] = []

    async def fetch(self, drive, blocks):
        for b in blocks:
            siblings, peaks = drive.proof_request(b)
            proof = self.remote.make_proof(b, drive.head.length, siblings, peaks)
            data = self.remote.get_block(b)
            if self.tamper:
                data, proof = self.tamper(b, data, proof)
            drive.accept_block(b, data, proof)
            self.fetched.append(b)

    async def fetch_verified(self, drive, blocks):
        await self.fetch(drive, blocks)  # stores them: none is left in memory
        return {}

    async def fetch_path(self, drive, path):
        self.path_requests.append(path)

    def reading(self, drive, blocks):
        pass  # every block is fetched on demand: no read-ahead to move


@pytest.fixture
def owner(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(5)
    for name, size in [("zero", 0), ("one", 1), ("bm1", BS - 1), ("b", BS), ("bp1", BS + 1),
                       ("many", 10 * BS + 17)]:
        (src / name).write_bytes(rnd.randbytes(size))
    (src / "dir").mkdir()
    (src / "dir" / "x").write_bytes(b"x")
    os.symlink("b", src / "link")
    store = Store(home)
    result = create_drive(store, src, block_size=BS)
    yield store, result.key, src
    store.close()


async def _open(store, key, version=None, source=None):
    return await Drive(store, key, source).open(version)


async def test_read_boundaries(owner):
    store, key, src = owner
    d = await _open(store, key)
    for name in ["zero", "one", "bm1", "b", "bp1", "many"]:
        data = (src / name).read_bytes()
        e = await d.lookup("/" + name)
        assert e.size == len(data)
        assert await d.read(e, 0, len(data) + 100) == data
        for off in {0, 1, BS - 1, BS, BS + 1, len(data) - 1, len(data)}:
            for size in (1, BS - 1, BS, BS + 1, 3 * BS):
                assert await d.read(e, off, size) == data[off:off + size], (name, off, size)
    assert [n for n, _ in await d.listdir("/")] == sorted(os.listdir(os.fsencode(src)))
    assert (await d.lookup("/link")).target == b"b"
    with pytest.raises(NotFoundError):
        await d.lookup("/nope")
    with pytest.raises(UsageError):
        await d.listdir("/b")


async def test_versions_and_fixed_views(owner):
    store, key, src = owner
    d = Drive(store, key)
    (src / "one").write_bytes(b"changed")
    r = import_directory(d, src, message="v2")
    assert r.version == 2 and r.new_content_blocks == 1
    v1 = await _open(store, key, 1)
    v2 = await _open(store, key)
    assert await v1.read(await v1.lookup("/one"), 0, 10) != b"changed"
    assert await v2.read(await v2.lookup("/one"), 0, 10) == b"changed"
    with pytest.raises(NotFoundError, match="no version 3"):
        await _open(store, key, 3)
    assert verify_drive(Drive(store, key)) == []


async def test_remote_drive_lazy_and_verified(owner, home2):
    store, key, src = owner
    remote = await _open(store, key)
    with Store(home2) as store2:
        d = Drive(store2, key)
        assert d.head is None and not d.writable
        seen = []
        d.subscribe(seen.append)
        assert d.accept_head(remote.head) is True
        assert seen == [remote.head] and d.accept_head(remote.head) is False
        source = PeerSource(remote)
        d.source = source
        await d.open()
        data = (src / "many").read_bytes()
        e = await d.lookup("/many")
        assert await d.read(e, 2 * BS, BS) == data[2 * BS:3 * BS]
        fetched = set(source.fetched)
        content = set(b for s, n in e.extents for b in range(s, s + n))
        assert len(fetched & content) == 1  # only the block the read touched
        assert await d.read(e, 0, len(data)) == data
        # a second, local-only view of the same store reads what was fetched, not more
        local = await Drive(store2, key).open()
        assert await local.read(await local.lookup("/many"), 0, len(data)) == data
        with pytest.raises(BlockUnavailableError, match="--peer"):
            await local.read(await local.lookup("/bp1"), 0, 10)
        assert verify_drive(Drive(store2, key)) == []


async def test_peer_lies_are_rejected(owner, home2):
    store, key, src = owner
    remote = await _open(store, key)

    def flip_data(b, data, proof):
        return bytes([data[0] ^ 1]) + data[1:], proof

    def flip_proof(b, data, proof):
        if not proof:
            return data, proof
        n = proof[0]
        return data, [Node(n.index, bytes([n.hash[0] ^ 1]) + n.hash[1:], n.size)] + proof[1:]

    for tamper in (flip_data, flip_proof):
        with Store(home2) as store2:
            d = Drive(store2, key, PeerSource(remote, tamper))
            d.accept_head(remote.head)
            with pytest.raises(VerificationError):
                await d.open()
            assert store2.held(key) == (0, 0)


async def test_heads_forks_and_refresh(owner, home2):
    store, key, src = owner
    remote = Drive(store, key)
    first = remote.head
    with Store(home2) as store2:
        d = Drive(store2, key, PeerSource(remote))
        d.accept_head(first)
        await d.open()
        assert await d.refresh() is False
        (src / "new").write_bytes(b"new")
        import_directory(remote, src)
        assert d.accept_head(remote.head) is True
        assert d.accept_head(first) is False  # never backward
        assert await d.refresh() is True and d.version == 2
        assert await d.read(await d.lookup("/new"), 0, 3) == b"new"
        # a bad signature
        with pytest.raises(VerificationError):
            d.accept_head(Head(first.length, first.root, b"\x00" * 64))
        # a second signed root for a length already held: fork, evidence kept
        seed = store.load_secret(crypto.encode_key(key))
        other = b"\x09" * 32
        forged = Head(first.length, other, crypto.sign_head(seed, key, first.length, other))
        with pytest.raises(ForkError):
            d.accept_head(forged)
        assert store2.forks(key) == [forged]


async def test_import_reuses_blocks_and_detects_renames(owner):
    store, key, src = owner
    d = Drive(store, key)
    os.rename(src / "many", src / "many-renamed")
    r = import_directory(d, src)
    assert r.new_content_blocks == 0 and r.reused_blocks == 11
    with open(src / "many-renamed", "r+b") as f:
        f.seek(5 * BS + 3)
        f.write(b"!")
    r = import_directory(d, src, checksum=True)
    assert r.new_content_blocks == 1
    v = await _open(store, key)
    assert await v.read(await v.lookup("/many-renamed"), 0, 11 * BS) == \
        (src / "many-renamed").read_bytes()


async def test_interrupted_write_garbage_is_ignored_then_cleaned(owner):
    store, key, src = owner
    d = Drive(store, key)
    length = d.head.length
    store.put_blocks(key, length, [b"garbage"] * 3)  # as if killed before signing
    assert verify_drive(Drive(store, key)) == []
    v = await _open(store, key)
    assert v.length == length
    (src / "later").write_bytes(b"later")
    import_directory(Drive(store, key), src)
    assert store.get_block(key, length) != b"garbage"
    assert verify_drive(Drive(store, key)) == []


async def test_hard_links_share_blocks(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(3 * BS))
    os.link(src / "a", src / "b")
    with Store(home) as store:
        r = create_drive(store, src, block_size=BS)
        assert r.new_content_blocks == 3
        d = await _open(store, r.key)
        a, b = await d.lookup("/a"), await d.lookup("/b")
        assert a.extents == b.extents and await d.read(b, 0, 3 * BS) == (src / "a").read_bytes()
        with open(src / "a", "r+b") as f:
            f.write(b"changed")
        r2 = import_directory(Drive(store, r.key), src)
        assert r2.new_content_blocks == 1
        d = await _open(store, r.key)
        a, b = await d.lookup("/a"), await d.lookup("/b")
        assert a.extents == b.extents and await d.read(b, 0, 7) == b"changed"


def test_create_discards_killed_creates_only(tmp_path, home):
    src = make_tree(tmp_path / "src", files=5)
    dead, busy = b"\x01" * 32, b"\x02" * 32
    with Store(home) as store:
        store.put_blocks(dead, 0, [b"x"] * 4)
        store.put_blocks(busy, 0, [b"y"] * 4)
        with store.writer_lock(busy):  # held as if by a create running elsewhere
            code = ("import sys\nfrom p2pfs.store import Store\nfrom p2pfs.publish import create_drive\n"
                    f"s = Store({str(home)!r})\ncreate_drive(s, {str(src)!r})\n")
            subprocess.run([sys.executable, "-c", code], check=True, env=cli_env(), cwd=REPO)
        assert store.held(dead) == (0, 0)
        assert store.held(busy) == (4, 4)


def test_concurrent_import_is_refused(owner):
    store, key, src = owner
    with store.writer_lock(key):
        r = run_cli(store.home, "import", crypto.encode_key(key), src, check=False)
        assert r.returncode == 1 and "another p2pfs process is writing" in r.stderr


async def test_a_source_that_stores_nothing_cannot_loop_forever(owner, home2):
    store, key, src = owner

    class Empty:
        calls = 0

        async def fetch(self, drive, blocks):
            Empty.calls += 1

        async def fetch_verified(self, drive, blocks):
            await self.fetch(drive, blocks)
            return {}

        async def fetch_path(self, drive, path):
            pass

        def reading(self, drive, blocks):
            pass

    with Store(home2) as store2:
        d = Drive(store2, key, Empty())
        d.accept_head(Drive(store, key).head)
        with pytest.raises(BlockUnavailableError, match="could not be fetched"):
            await d.open()
        assert Empty.calls == 1


async def test_a_read_keeps_the_blocks_it_waits_for_from_the_cap(owner, home2):
    """A capped cache evicts while a read's fetch is still running: the
    fetcher's writer keeps the cap after each step it stores, and a
    read-ahead may have touched the very blocks the read waits for.  Those
    are spared (Cache.reading) until the read has them: it returns the
    bytes, where it used to fail with "could not be fetched" (seen in CI:
    cat through a mount capped at 8M)."""
    from p2pfs.cache import Cache

    store, key, src = owner
    want = (src / "many").read_bytes()

    class Evicting(PeerSource):
        async def fetch(self, drive, blocks):
            await super().fetch(drive, blocks)
            if drive.cache is not None:
                drive.cache.touched(drive, blocks)  # as the read-ahead does
                drive.cache.flush()  # and the cap kept, as after a writer's step

    with Store(home2) as store2:
        d = Drive(store2, key, Evicting(Drive(store, key)))
        d.accept_head(Drive(store, key).head)
        v = await d.open()
        entry = await v.lookup("/many")  # the index is held from here on
        v.cache = Cache(store2, 0)  # evict every cache block at each flush
        assert await v.read(entry, 0, len(want)) == want
        assert v.cache.evicted_blocks == 0
        # once read, they are cache like any other: the next flush evicts them
        v.cache.flush()
        assert v.cache.evicted_blocks == len(want) // BS + 1
        assert store2.held(key)[1] < len(want)


async def test_a_read_from_a_source_that_stores_nothing_fails(owner, home2):
    """A source that says yes and stores nothing: the read fails after
    READ_FETCHES fetches (room for another process's eviction), no more."""
    from p2pfs.drive import READ_FETCHES

    store, key, src = owner

    class Forgetful(PeerSource):
        calls = 0

        async def fetch(self, drive, blocks):
            if Forgetful.calls == 0:
                await super().fetch(drive, blocks)  # the index, as for open
            else:
                Forgetful.calls += 1

    with Store(home2) as store2:
        d = Drive(store2, key, Forgetful(Drive(store, key)))
        d.accept_head(Drive(store, key).head)
        v = await d.open()
        entry = await v.lookup("/many")
        Forgetful.calls = 1
        with pytest.raises(BlockUnavailableError, match="could not be fetched"):
            await v.read(entry, 0, 100)
        assert Forgetful.calls == 1 + READ_FETCHES
