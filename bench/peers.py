"""Hostile peers for tests, built as an attacker would: the real wire protocol
(`p2pfs.wire.Connection`) over real sockets, misbehaving on purpose.

`WirePeer` drives one Connection over a trio stream by hand; `HostileSeeder`
listens and plays a seeder of a drive that misbehaves in a chosen way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from p2pfs import crypto
from p2pfs.store import Store
from p2pfs.types import Head
from p2pfs.wire import messages as m
from p2pfs.wire.connection import ChannelOpened, Connection, HandshakeComplete, Received


class WirePeer:
    """One side of a real connection, driven by hand."""

    def __init__(self, stream: trio.abc.Stream, conn: Connection):
        self.stream = stream
        self.conn = conn
        self.received: list = []   # (drive key, message) of every Received event

    @classmethod
    async def dial(cls, address: str, known: dict[bytes, bytes] | None = None) -> "WirePeer":
        host, port = address.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        known = known or {}
        self = cls(stream, Connection(True, crypto.x25519_keypair()[0], known.get))
        await self.flush()
        await self.until(lambda ev: isinstance(ev, HandshakeComplete))
        return self

    @classmethod
    async def accept(cls, stream: trio.abc.Stream, known: dict[bytes, bytes]) -> "WirePeer":
        self = cls(stream, Connection(False, crypto.x25519_keypair()[0], known.get))
        await self.until(lambda ev: isinstance(ev, HandshakeComplete))
        return self

    async def flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            await self.stream.send_all(out)

    async def send(self, msg) -> None:
        await self.stream.send_all(self.conn.send(msg))

    async def until(self, pred, timeout: float = 10.0):
        """Read and handle input until an event satisfies `pred`; returns it."""
        with trio.fail_after(timeout):
            while True:
                while (ev := self.conn.next_event()) is not None:
                    if isinstance(ev, Received):
                        self.received.append((ev.drive_key, ev.message))
                    if pred(ev):
                        await self.flush()
                        return ev
                await self.flush()
                data = await self.stream.receive_some(1 << 16)
                self.conn.receive_data(data)
                if not data:
                    raise trio.BrokenResourceError("peer closed the connection")

    async def open(self, key: bytes) -> int:
        """Open a channel for the drive; our channel number once both sides opened."""
        await self.stream.send_all(self.conn.open_channel(key))
        await self.until(lambda ev: isinstance(ev, ChannelOpened) and ev.drive_key == key)
        return self.conn.local_channel(key)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


def signed_head(home, key: bytes) -> Head:
    """The newest signed head of a drive held in `home` (a valid one to replay)."""
    with Store(home) as st:
        return st.latest_head(key)


Behaviour = Callable[[WirePeer, int, Head], Awaitable[None]]


class HostileSeeder:
    """A listener on 127.0.0.1 that opens the drive like a seeder, announces a
    valid signed head and every block, then runs `behaviour(peer, channel,
    head)` for each connection.  `accepted` counts connections."""

    def __init__(self, key: bytes, head: Head, behaviour: Behaviour):
        self.key = key
        self.head = head
        self.behaviour = behaviour
        self.accepted = 0
        self.address = ""

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream) -> None:
        self.accepted += 1
        known = {crypto.discovery_key(self.key): self.key}
        try:
            peer = await WirePeer.accept(stream, known)
            await peer.until(lambda ev: isinstance(ev, ChannelOpened))
            ch = peer.conn.local_channel(self.key)
            h = self.head
            await peer.send(m.Head(ch, h.length, h.root, h.signature))
            await peer.send(m.Have(ch, [(0, h.length)]))
            await self.behaviour(peer, ch, h)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass
        except Exception:  # a ProtocolError from the reader hanging up mid-frame
            pass
        finally:
            await stream.aclose()


async def never_answer(peer: WirePeer, ch: int, head: Head) -> None:
    """Read requests, answer none, and send a Have every second (looks alive)."""
    async def keep_reading():
        await peer.until(lambda ev: False, timeout=3600)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_reading)
        while True:
            await trio.sleep(1.0)
            await peer.send(m.Have(ch, [(0, head.length)]))


async def drip(peer: WirePeer, ch: int, head: Head) -> None:
    """Answer nothing; trickle one byte of a never-finished frame every 0.2 s."""
    async def keep_reading():
        await peer.until(lambda ev: False, timeout=3600)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_reading)
        await peer.stream.send_all((1 << 19).to_bytes(4, "little"))  # a 512 KiB frame ...
        while True:
            await trio.sleep(0.2)
            await peer.stream.send_all(b"\x00")  # ... that never ends


async def wrong_block(peer: WirePeer, ch: int, head: Head) -> None:
    """Answer every block request with a different block's number (a protocol
    violation the reader's Connection detects)."""
    while True:
        ev = await peer.until(lambda ev: isinstance(ev, Received)
                              and isinstance(ev.message, (m.Request, m.IndexRequest)), timeout=3600)
        req = ev.message
        if isinstance(req, m.IndexRequest):
            await peer.send(m.NoData(ch, req.id))
            continue
        other = (req.start + 1) % head.length  # another run than the one asked for
        peer.conn._queue(m.Data(ch, req.id, other, [b"x"], [(bytes(32), 1)], []))  # bypass our checks
        await peer.flush()


async def head_flood(peer: WirePeer, ch: int, head: Head) -> None:
    """Replay the valid signed head and a large Have as fast as the socket takes them."""
    have = m.Have(ch, [(2 * i, 2 * i + 1) for i in range(min(head.length, m.MAX_HAVE_RANGES))])
    msg = m.Head(ch, head.length, head.root, head.signature)
    while True:
        for _ in range(50):
            peer.conn._queue(msg)
        peer.conn._queue(have)
        await peer.flush()
        await trio.sleep(0)


@asynccontextmanager
async def attack(address: str, key: bytes, head: Head, *, idle: int = 500,
                 non_readers: int = 300, flooders: int = 1) -> AsyncIterator[dict]:
    """Attack the seeder at `address` for the life of the block: `idle`
    connections that say nothing, `non_readers` that open the drive, ask for
    256 blocks and never read, and `flooders` that replay its valid head as
    fast as the socket takes it (reconnecting when dropped).  Yields counters."""
    known = {crypto.discovery_key(key): key}
    host, port = address.rsplit(":", 1)
    stop = trio.Event()
    counts = {"idle": 0, "non_readers": 0, "floods": 0, "errors": []}

    async def idle_connection():
        try:
            stream = await trio.open_tcp_stream(host, int(port))
        except OSError:
            return
        counts["idle"] += 1
        async with stream:
            await stop.wait()

    async def non_reader():
        try:
            peer = await WirePeer.dial(address, known)
            ch = await peer.open(key)
            for rid in range(256):
                peer.conn._queue(m.Request(ch, rid, rid % head.length, 1, head.length, []))
            await peer.flush()
            counts["non_readers"] += 1
            await stop.wait()  # and never read
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception as exc:  # noqa: BLE001 - kept for the caller to look at
            counts["errors"].append(repr(exc))

    async def flooder():
        while not stop.is_set():
            try:
                peer = await WirePeer.dial(address, known)
                ch = await peer.open(key)
                counts["floods"] += 1
                msg = m.Head(ch, head.length, head.root, head.signature)
                while not stop.is_set():
                    for _ in range(100):
                        peer.conn._queue(msg)
                    await peer.flush()
                    await trio.sleep(0)
            except Exception:  # noqa: BLE001 - dropped by the seeder: come back
                await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        for _ in range(idle):
            nursery.start_soon(idle_connection)
        for _ in range(non_readers):
            nursery.start_soon(non_reader)
        for _ in range(flooders):
            nursery.start_soon(flooder)
        try:
            yield counts
        finally:
            stop.set()
            nursery.cancel_scope.cancel()


def serving(home, key: bytes, *, flip_first_run_at: int | None = None,
            requested: list | None = None) -> Behaviour:
    """A behaviour that serves the drive honestly from `home`'s store, with the
    real serving code (every run with its leaves and proof), recording each
    block it is asked for in `requested`.  With `flip_first_run_at`, the
    first run it sends that is longer than that has one byte flipped in its
    block at that position (the leaves and proof stay honest: only that
    block fails).  `requested` gets (start, count) of every run it sends."""
    from p2pfs.drive import Drive
    from p2pfs.net.fetcher import NodeCaches
    from p2pfs.net.serving import Server

    async def behaviour(peer: WirePeer, ch: int, head: Head) -> None:
        store = Store(home)
        try:
            drive = Drive(store, key)
            server = Server(store, NodeCaches(store), lambda k: drive if k == key else None)
            flipped = flip_first_run_at is None
            while True:
                ev = await peer.until(lambda ev: isinstance(ev, Received)
                                      and isinstance(ev.message, (m.Request, m.IndexRequest)), timeout=3600)
                req = ev.message
                for reply in server.answer(ch, key, req):
                    if isinstance(reply, m.Data):
                        if requested is not None:
                            requested.append((reply.start, len(reply.blocks)))
                        if not flipped and len(reply.blocks) > flip_first_run_at:
                            flipped = True
                            blocks = [bytes(b) for b in reply.blocks]
                            bad = bytearray(blocks[flip_first_run_at])
                            bad[len(bad) // 2] ^= 0x01
                            blocks[flip_first_run_at] = bytes(bad)
                            reply = m.Data(reply.channel, reply.id, reply.start, blocks, reply.leaves,
                                           reply.proof)
                    await peer.send(reply)
        finally:
            store.close()
    return behaviour
