"""The swarm and peer drivers over in-memory streams (no namespace).

Two real stores, a real owner drive, real swarms; the TCP socket is
replaced by `trio.testing.memory_stream_pair`, except in the one test of
reading from a socket (loopback TCP, `recv_into`).
"""

from __future__ import annotations

import contextlib

import trio
import trio.testing

from helpers import write_random
from p2pfs import crypto
from p2pfs.drive import Drive
from p2pfs.publish import create_drive
from p2pfs.net import peer as peer_mod
from p2pfs.net.swarm import open_swarm
from p2pfs.store import Store


def _owner(tmp_path, size):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "f.bin", size, seed=11)
    (src / "small.txt").write_bytes(b"small\n")
    store = Store(tmp_path / "a")
    result = create_drive(store, src)
    return store, result.key, (src / "f.bin").read_bytes()


async def _connect(nursery, server_swarm, client_swarm, address="memory:1"):
    a, b = trio.testing.memory_stream_pair()
    server_swarm.connections.attach(a, initiator=False, address="memory-client")
    client_swarm.connections.attach(b, initiator=True, address=address)


@contextlib.asynccontextmanager
async def _reader_of(tmp_path, size, connect=None):
    """An owner's swarm serving a drive with /f.bin of `size` random bytes, a
    reader's swarm connected to it (`connect(sa, sb)`, else memory streams),
    and the reader's opened Drive: yields (sa, sb, drive, data)."""
    store_a, key, data = _owner(tmp_path, size)
    store_b = Store(tmp_path / "b")
    try:
        async with open_swarm(store_a, crypto.x25519_keypair()[0], serve_all=True) as sa, \
                open_swarm(store_b, crypto.x25519_keypair()[0], timeout=10) as sb:
            drive = Drive(store_b, key, source=sb)
            sb.add_drive(drive)
            if connect is None:
                await _connect(sb._nursery, sa, sb)
            else:
                await connect(sa, sb)
            await sb.wait_for_peers(drive, 10)
            await drive.open()
            yield sa, sb, drive, data
    finally:
        store_a.close()
        store_b.close()


async def test_fetch_a_whole_file_between_two_swarms(tmp_path):
    await _fetch_whole_file(tmp_path)


async def test_fetch_with_a_node_cache_too_small_for_the_drive(tmp_path, monkeypatch):
    """Past MAX_CACHED_NODES both sides fall back to the store for nodes."""
    from p2pfs.net import fetcher
    monkeypatch.setattr(fetcher, "MAX_CACHED_NODES", 8)
    await _fetch_whole_file(tmp_path)


async def test_a_read_takes_verified_blocks_before_the_store_has_them(tmp_path):
    """A read wakes once its blocks are verified, not once the writer has
    committed them (the commits are never in its way): here the writer's
    thread is held back for the whole read.  Closing the swarm waits for
    the writer, so the blocks are stored all the same."""
    import threading

    gate = threading.Event()
    held_back = []
    try:
        async with _reader_of(tmp_path, 2 << 20) as (sa, sb, drive, data):
            store_b, key = drive.store, drive.key
            entry = await drive.lookup("/f.bin")  # the index is stored from here on
            before = store_b.held(key)[1]
            put = store_b.put_block_items

            def put_late(k, items, *args, **kwargs):
                if k == key:
                    held_back.append(len(items))
                    gate.wait(20)  # in the writer's worker thread, until the read is done
                return put(k, items, *args, **kwargs)

            store_b.put_block_items = put_late
            with trio.fail_after(15):
                assert await drive.read(entry, 0, entry.size) == data
            assert store_b.held(key)[1] == before  # nothing of it was committed
            gate.set()
        assert held_back  # stored by the writer, after the read
        with Store(tmp_path / "b") as store_b:
            assert store_b.held(key)[1] >= before + len(data)
    finally:
        gate.set()


async def _fetch_whole_file(tmp_path):
    store_a, key, data = _owner(tmp_path, 5 << 20)
    store_b = Store(tmp_path / "b")
    async with open_swarm(store_a, crypto.x25519_keypair()[0], serve_all=True) as sa, \
            open_swarm(store_b, crypto.x25519_keypair()[0], timeout=10) as sb:
        drive = Drive(store_b, key, source=sb)
        sb.add_drive(drive)
        await _connect(sb._nursery, sa, sb)
        await sb.wait_for_peers(drive, 10)
        assert drive.head == store_a.latest_head(key)
        await drive.open()
        entry = await drive.lookup("/f.bin")
        assert await drive.read(entry, 0, entry.size) == data
        assert await drive.read(await drive.lookup("/small.txt"), 0, 100) == b"small\n"
        [info] = sb.peer_info(key)
        assert info["blocks"] == drive.head.length and info["blocks_received"] > 80
        from p2pfs.net import fetcher
        small = fetcher.MAX_CACHED_NODES < 100
        assert sb.nodes.complete[key] is not small and sa.nodes.complete[key] is not small
    blocks, nbytes = store_b.held(key)
    assert nbytes >= len(data)
    store_a.close()
    store_b.close()


async def test_two_waiters_on_a_full_output_both_wake():
    """Regression: the reader and the server waiting on back-pressure together."""
    send_side, recv_side = trio.testing.memory_stream_pair()

    class _Swarm:
        node_key = crypto.x25519_keypair()[0]

        @staticmethod
        def lookup_key(dk):
            return None

        @staticmethod
        def output_changed(delta):
            pass

    p = peer_mod.Peer(_Swarm, send_side, True, "memory")
    woke = []

    async def waiter(name):
        await p._wait_writable()
        woke.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(p._writer)
        p.write(b"x" * (peer_mod.HIGH_WATER + 1))
        nursery.start_soon(waiter, "reader")
        nursery.start_soon(waiter, "server")
        await trio.testing.wait_all_tasks_blocked()
        p.write(b"y" * (peer_mod.HIGH_WATER + 1))  # refill while both wait
        got = 0
        with trio.fail_after(10):
            while len(woke) < 2:
                got += len(await recv_side.receive_some(1 << 20))
        assert sorted(woke) == ["reader", "server"]
        nursery.cancel_scope.cancel()


def test_every_process_is_a_node_of_its_own_and_addresses_parse():
    import pytest

    from p2pfs.errors import UsageError
    from p2pfs.net import transport

    a, b = transport.new_node_key(), transport.new_node_key()
    assert a != b and len(a) == len(b) == 32
    assert transport.parse_address("127.0.0.1:7") == ("127.0.0.1", 7)
    assert transport.parse_address("[::1]:8") == ("::1", 8)
    for bad in ("nonsense", "host:", ":5", "h:70000"):
        with pytest.raises(UsageError):
            transport.parse_address(bad)


async def _fetch_counting_commits(tmp_path, size, path):
    """Fetch `path` cold between two swarms; (its bytes, the reader's block
    commits as (blocks, trio time), the trio time of each verified reply)."""
    store_a, key, _data = _owner(tmp_path, size)
    store_b = Store(tmp_path / "b")
    commits, kept = [], []
    put = store_b.put_block_items

    def counting(k, items, *args, **kwargs):  # in the writer's worker thread
        commits.append((len(items), trio.from_thread.run_sync(trio.current_time)))
        return put(k, items, *args, **kwargs)

    store_b.put_block_items = counting
    try:
        async with open_swarm(store_a, crypto.x25519_keypair()[0], serve_all=True) as sa, \
                open_swarm(store_b, crypto.x25519_keypair()[0], timeout=10) as sb:
            keep = sb.fetcher._keep

            def keeping(*args):
                kept.append(trio.current_time())
                return keep(*args)

            sb.fetcher._keep = keeping
            drive = Drive(store_b, key, source=sb)
            sb.add_drive(drive)
            await _connect(sb._nursery, sa, sb)
            await sb.wait_for_peers(drive, 10)
            await drive.open()
            entry = await drive.lookup(path)
            commits.clear()
            kept.clear()
            got = await drive.read(entry, 0, entry.size)
            return got, commits, kept
    finally:
        store_a.close()
        store_b.close()


async def test_a_streamed_fetch_is_written_in_few_large_transactions(tmp_path):
    """While a stream goes on, the writer lets a batch grow (fetcher.GATHER_BYTES)
    instead of committing whatever arrived during the last commit: two
    flushes to disk per commit, whatever its size."""
    from p2pfs.net import fetcher
    size = 48 << 20
    got, commits, _kept = await _fetch_counting_commits(tmp_path, size, "/f.bin")
    assert len(got) == size
    assert sum(n for n, _t in commits) >= size // (64 << 10)
    # one per GATHER_BYTES, and a few short ones (the first, before the stream, and the last)
    assert len(commits) <= size // fetcher.GATHER_BYTES + 6, [n for n, _t in commits]


async def test_a_lone_read_is_written_without_waiting_to_gather(tmp_path, monkeypatch):
    """Nothing else in flight: the blocks of a small read, read right after
    the index lookup was written, are committed at once.  The gathering
    wait is set to 5 s here, so a writer that waited would show it."""
    from p2pfs.net import fetcher
    monkeypatch.setattr(fetcher, "GATHER_WAIT", 5.0)
    got, commits, kept = await _fetch_counting_commits(tmp_path, 1 << 20, "/small.txt")
    assert got == b"small\n"
    assert len(commits) == 1 and len(kept) == 1, (commits, kept)
    assert commits[0][1] - kept[0] < 2.5, (commits, kept)


def _count_waits(drive) -> list[int]:
    """The first block of every read of `drive` that had to fetch (and wait)."""
    waits = []
    fetch = drive._fetch

    async def counting(blocks, path=None):
        waits.append(blocks[0])
        await fetch(blocks, path)

    drive._fetch = counting
    return waits


async def test_a_reader_slower_than_the_network_waits_only_at_the_start(tmp_path):
    """Read-ahead moves on while a sequential reader reads blocks it already
    holds (Fetcher.reading), not only when it runs out of them: a reader
    slower than the network waits for the first blocks and (allowing for
    one hiccup of a busy machine) never again.  Moving the window only at a
    miss stalls it again and again (10 times here)."""
    size = 32 << 20
    async with _reader_of(tmp_path, size) as (_sa, _sb, drive, data):
        entry = await drive.lookup("/f.bin")
        waits = _count_waits(drive)
        chunk = 1 << 20
        for offset in range(0, size, chunk):
            assert await drive.read(entry, offset, chunk) == data[offset:offset + chunk]
            await trio.sleep(0.05)  # 20 MB/s: slower than two swarms in memory
        first_window = 2 * chunk // drive.block_size
        assert len([b for b in waits if b >= first_window]) <= 1, waits


async def test_over_a_socket_the_replies_are_decrypted_and_hashed_off_the_main_thread(tmp_path):
    """Reading from a socket, a read that ends a frame takes at most
    LARGE_FRAME of the next (FrameDecoder.get_buffer), so reads are often
    small; the worker-thread hop is judged by the whole frames buffered
    (Connection.ready_bytes), not by the read: every 1 MiB reply of a
    stream comes with its leaves hashed in the worker thread."""
    size = 24 << 20
    hashed, unhashed = [], []

    async def over_tcp(sa, sb):
        on_reply = sb.fetcher.on_reply

        def counting(peer, inf, msg, leaves=None):
            if type(msg).__name__ == "Data" and len(msg.blocks) >= 8:
                (hashed if leaves is not None else unhashed).append(msg.start)
            return on_reply(peer, inf, msg, leaves)

        sb.fetcher.on_reply = counting
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
        await listener.aclose()
        assert getattr(server, "socket", None) is not None  # the recv_into path
        sa.connections.attach(server, initiator=False, address="tcp-client")
        sb.connections.attach(client, initiator=True, address=f"127.0.0.1:{port}")

    async with _reader_of(tmp_path, size, over_tcp) as (_sa, _sb, drive, data):
        entry = await drive.lookup("/f.bin")
        assert await drive.read(entry, 0, entry.size) == data
    assert len(hashed) >= size // (1 << 20) - 2 and not unhashed, (len(hashed), unhashed)


async def test_the_read_ahead_window_is_bytes_per_peer_that_can_send(tmp_path, monkeypatch):
    """The window is READAHEAD_BYTES per peer able to send the drive (each
    needs replies of its own in flight), in bytes whatever the block size:
    16 blocks of 64 KiB here with one peer, 32 once a second one is open."""
    from p2pfs.net import fetcher
    monkeypatch.setattr(fetcher, "READAHEAD_BYTES", 1 << 20)
    size = 16 << 20
    async with _reader_of(tmp_path, size) as (sa, sb, drive, data):
        assert drive.block_size == 64 << 10
        entry = await drive.lookup("/f.bin")
        windows = []
        chunk = 8 * drive.block_size  # READAHEAD_MIN blocks a read

        async def read(lo, hi):
            for offset in range(lo, hi, chunk):
                assert await drive.read(entry, offset, chunk) == data[offset:offset + chunk]
                windows.append(sb.fetcher._fetches[drive.key].window)

        await read(0, size // 2)
        assert max(windows) == 16, windows
        async with open_swarm(sa.store, crypto.x25519_keypair()[0], serve_all=True) as second:
            await _connect(sb._nursery, second, sb, address="memory:2")
            with trio.fail_after(10):
                while sum(p.can_request(drive.key) for p in sb.fetcher._peers()) < 2:
                    await trio.sleep(0.01)
            windows.clear()
            await read(size // 2, size)
            assert max(windows) == 32, windows


async def test_read_ahead_starts_afresh_after_every_peer_was_lost(tmp_path):
    """A fetch that fails with no peer left to ask drops every queued want,
    read-ahead included; the window is dropped with them, so once a peer is
    back the reader gets read-ahead again instead of waiting at each read
    for the rest of the old window."""
    size = 24 << 20
    async with _reader_of(tmp_path, size) as (sa, sb, drive, data):
        entry = await drive.lookup("/f.bin")
        chunk = 1 << 20
        for offset in range(0, 4 * chunk, chunk):
            assert await drive.read(entry, offset, chunk) == data[offset:offset + chunk]
        f = sb.fetcher._fetches[drive.key]
        assert f.ahead_end > 4 * chunk // drive.block_size
        [peer] = sb.fetcher._peers()
        peer.drop("gone for the test", fault=False)
        with trio.fail_after(10):
            while sb.fetcher._peers() or f.wants:
                await trio.sleep(0.01)  # every want failed: no peer left to ask
        await _connect(sb._nursery, sa, sb, address="memory:2")
        await sb.wait_for_peers(drive, 10)
        waits = _count_waits(drive)
        start = 12 * chunk  # inside the old window, past what had arrived
        for offset in range(start, size, chunk):
            assert await drive.read(entry, offset, chunk) == data[offset:offset + chunk]
            await trio.sleep(0.05)
        first = start // drive.block_size
        assert len([b for b in waits if b >= first + 2 * chunk // drive.block_size]) <= 1, waits
