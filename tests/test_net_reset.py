"""Readers that leave with requests still queued at the seeder.

Regression: a reader that sent requests and then closed its side cleanly
(FIN, nothing unread) made the seeder's server task answer a request after
the connection had seen end of stream: `Connection.send` raised
RuntimeError("connection is not ready to send"), which is not peer trouble,
so it crashed the whole seeder, and every reader connected at that moment
saw "Connection reset by peer" (the bench's mount that "got no signed
version within 30 s").
"""

from __future__ import annotations

import trio

from helpers import create
from p2pfs import crypto
from p2pfs.wire import messages as m
from p2pfs.wire.connection import capability
from test_net import RawPeer, drive_tree, seeders  # noqa: F401  (seeders is a fixture)


async def _opened_peer(address: str, key: bytes) -> tuple[RawPeer, m.Head]:
    """A raw reader with the drive's channel open; the seeder's Head."""
    peer = await RawPeer.connect(address)
    conn = peer.conn
    with trio.fail_after(5):
        while conn._decryptor is None:
            data = await peer.stream.receive_some(1 << 16)
            assert data, "the seeder closed the connection during the handshake"
            conn.receive_data(data)
            while conn.next_event() is not None:
                pass
    conn._queue(m.Open(0, crypto.discovery_key(key), capability(conn.handshake_hash, True, key)))
    await peer.stream.send_all(conn.data_to_send())
    got = []
    with trio.fail_after(5):
        while not any(isinstance(x, m.Have) for x in got):
            for frame in await peer.raw_frames():
                got.append(m.decode(conn._decryptor.decrypt(frame)))
    return peer, next(x for x in got if isinstance(x, m.Head))


async def test_readers_leaving_with_requests_queued_do_not_crash_the_seeder(tmp_path, seeders):
    a = tmp_path / "a"
    key_text = create(a, drive_tree(tmp_path / "src", big=8 << 20))
    key = crypto.decode_key(key_text)
    seeder = seeders(a, key_text)
    for round_ in range(20):
        peer, head = await _opened_peer(seeder.address, key)
        conn = peer.conn
        for i in range(200):
            conn._queue(m.Request(0, i, i % head.length, 1, head.length, []))
        await peer.stream.send_all(conn.data_to_send())
        if round_ % 2:  # half-close and read until the seeder ends too
            await peer.stream.send_eof()
            with trio.move_on_after(5):
                while await peer.stream.receive_some(1 << 20):
                    pass
        await peer.stream.aclose()  # else: leave at once, requests queued
    # the seeder still serves, and stops cleanly (no traceback)
    await (await _opened_peer(seeder.address, key))[0].stream.aclose()
    assert "Traceback" not in seeder.stop()
