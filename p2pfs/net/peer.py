"""One connected peer: a trio driver around a sans-IO `wire.Connection`.

Three tasks share a peer and end together:

* the reader reads at most `RECV_SIZE` bytes at a time, feeds the
  Connection, and hands each event to the swarm (synchronously: verifying
  and storing a block happens here, so a peer's next bytes are not read
  before its last block is dealt with); a read of at least
  `DECRYPT_IN_THREAD` bytes is first decrypted in a worker thread
  (`Connection.decrypt_ahead`: libsodium drops the GIL), so the other tasks
  of the node run meanwhile;
* the server answers the peer's requests one by one, in order;
* the writer owns the socket's sending side and writes whatever the other
  two queued, in the order they queued it (each `Connection.send` returns
  ciphertext that must leave in order, so nothing else may write).

Memory per connection is bounded: at most one frame (`MAX_FRAME`) plus one
read buffered on input, at most `MAX_REQUESTS` requests queued to serve,
and output above `HIGH_WATER` stops both the reader and the server until
the writer has drained it.  A peer that breaks the protocol or sends
anything that fails verification is disconnected (`run` reports why).
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import TYPE_CHECKING

import trio

from ..errors import ProtocolError, VerificationError
from ..types import Head
from ..wire import messages as m
from ..wire.connection import (
    ChannelClosed, ChannelOpened, Connection, EndOfStream, HandshakeComplete, Received,
)

if TYPE_CHECKING:
    from .swarm import Swarm

RECV_SIZE = 1 << 20
HIGH_WATER = 4 << 20
DECRYPT_IN_THREAD = 64 << 10  # a read this big is decrypted in a worker thread
HANDSHAKE_TIMEOUT = 10.0
MAX_HAVE_RANGES_KEPT = 1 << 16


def raise_single(group: BaseExceptionGroup):
    """Re-raise a nursery's lone exception as itself (Cancelled aside), else the group."""
    leaves = _leaves(group)
    if len(leaves) == 1:
        raise leaves[0] from None
    raise group


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        elif not isinstance(exc, trio.Cancelled):
            out.append(exc)
    return out


class PeerDropped(Exception):
    """Raised inside a peer's tasks to disconnect it; str() says why."""


# what a misbehaving or vanishing peer can cause, most telling first
_PEER_TROUBLE = (PeerDropped, VerificationError, ProtocolError,
                 trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Inflight:
    __slots__ = ("key", "block", "length", "sent", "path", "done")

    def __init__(self, key: bytes, block: int, length: int, sent: float, path: bytes | None = None):
        self.key = key
        self.block = block
        self.length = length
        self.sent = sent
        self.path = path
        self.done: trio.Event | None = trio.Event() if path is not None else None


class Peer:
    def __init__(self, swarm: "Swarm", stream: trio.abc.Stream, initiator: bool, address: str):
        self.swarm = swarm
        self.stream = stream
        self.address = address
        self.initiator = initiator
        self.conn = Connection(initiator, swarm.node_key, swarm.lookup_key)
        self.remote_key: bytes | None = None
        self.heads: dict[bytes, Head] = {}
        self.haves: dict[bytes, list[tuple[int, int]]] = {}
        self.announced: set[bytes] = set()   # drives whose first Have arrived
        self.inflight: dict[int, Inflight] = {}
        self.stalled = False
        self.paused = False
        self.last_progress = trio.current_time()
        self.connected = trio.Event()
        self.closed = False
        self.blocks_received = 0
        self._next_id = 0
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._out_event = trio.Event()
        self._drained = trio.Event()
        self._serve: deque = deque()
        self._serve_event = trio.Event()

    def __repr__(self) -> str:
        return f"<Peer {self.address}>"

    # --- output ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if data and not self.closed:
            self._out.append(data)
            self._out_bytes += len(data)
            self._out_event.set()

    async def _wait_writable(self) -> None:
        while self._out_bytes > HIGH_WATER:
            # the reader and the server may both wait: share one event
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()

    async def _writer(self) -> None:
        while True:
            if not self._out:
                self._out_event = trio.Event()
                await self._out_event.wait()
                continue
            pieces, self._out, self._out_bytes = self._out, [], 0
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            self._drained.set()
            await self.stream.send_all(data)

    # --- requests we make --------------------------------------------------------

    def has(self, key: bytes, block: int) -> bool:
        ranges = self.haves.get(key)
        if not ranges:
            return False
        i = bisect.bisect_right(ranges, (block, 2**63)) - 1
        return i >= 0 and ranges[i][0] <= block < ranges[i][1]

    def can_request(self, key: bytes) -> bool:
        return (self.connected.is_set() and not self.closed and self.conn.can_send
                and key in self.announced and self.conn.is_open(key))

    def request_block(self, key: bytes, block: int, length: int, siblings: int, peaks: bool) -> None:
        rid = self._next_id
        self._next_id += 1
        ch = self.conn.local_channel(key)
        self.write(self.conn.send(m.Request(ch, rid, block, siblings, peaks, length)))
        self.inflight[rid] = Inflight(key, block, length, trio.current_time())

    def request_path(self, key: bytes, path: bytes, length: int) -> Inflight:
        rid = self._next_id
        self._next_id += 1
        ch = self.conn.local_channel(key)
        self.write(self.conn.send(m.IndexRequest(ch, rid, path, length)))
        inf = self.inflight[rid] = Inflight(key, -1, length, trio.current_time(), path)
        return inf

    def _merge_have(self, key: bytes, ranges: list[tuple[int, int]]) -> None:
        merged = sorted(self.haves.get(key, []) + [tuple(r) for r in ranges])
        out: list[tuple[int, int]] = []
        for a, b in merged:
            if out and a <= out[-1][1]:
                if b > out[-1][1]:
                    out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        if len(out) > MAX_HAVE_RANGES_KEPT:
            raise ProtocolError("peer announced too many separate block ranges")
        self.haves[key] = out

    # --- running -------------------------------------------------------------------

    async def run(self) -> str:
        """Serve the connection until it ends; returns why it ended (never raises
        for peer trouble; cancellation propagates)."""
        reason = "disconnected"
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._server)
                    nursery.start_soon(self._handshake_watchdog)
                    self.write(self.conn.data_to_send())
                    await self._reader()
                    reason = "closed the connection"
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # reader and writer may fail together (a reset): report the
                # most telling one; anything else is a bug and propagates
                leaves = _leaves(group)
                for kind in _PEER_TROUBLE:
                    for exc in leaves:
                        if isinstance(exc, kind):
                            if all(isinstance(e, _PEER_TROUBLE) for e in leaves):
                                raise exc from None
                raise_single(group)
        except (ProtocolError, PeerDropped) as exc:
            reason = str(exc)
        except VerificationError as exc:
            reason = f"sent data that fails verification: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = f"connection lost ({getattr(exc, 'strerror', None) or exc or type(exc).__name__})"
        finally:
            self.closed = True
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    try:
                        await self.stream.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
        return reason

    async def _handshake_watchdog(self) -> None:
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            await self.connected.wait()
            return
        raise PeerDropped("no Noise handshake within %g s" % HANDSHAKE_TIMEOUT)

    async def _reader(self) -> None:
        swarm = self.swarm
        conn = self.conn
        while True:
            self.paused = True  # not reading on our account: the peer is not stalling
            await self._wait_writable()
            await swarm.input_room()
            self.paused = False
            data = await self.stream.receive_some(RECV_SIZE)
            self.last_progress = trio.current_time()
            conn.receive_data(data)
            if len(data) >= DECRYPT_IN_THREAD and conn.can_decrypt_ahead:
                # libsodium drops the GIL: our other tasks run meanwhile
                await trio.to_thread.run_sync(conn.decrypt_ahead)
            while True:
                ev = conn.next_event()
                if ev is None:
                    break
                if isinstance(ev, Received):
                    self._received(ev.drive_key, ev.message)
                elif isinstance(ev, EndOfStream):
                    self._serve.clear()  # void: nobody will read the replies
                    return
                elif isinstance(ev, HandshakeComplete):
                    self.remote_key = ev.remote_static
                    self.connected.set()
                    swarm.on_connected(self)
                elif isinstance(ev, ChannelOpened):
                    swarm.on_channel_opened(self, ev.drive_key)
                elif isinstance(ev, ChannelClosed):
                    self.haves.pop(ev.drive_key, None)
                    self.announced.discard(ev.drive_key)
                    swarm.on_channel_closed(self, ev.drive_key, ev.rejected)
            self.write(conn.data_to_send())
            swarm.after_input(self)
            if not data:
                return

    def _received(self, key: bytes, msg) -> None:
        swarm = self.swarm
        if isinstance(msg, (m.Data, m.IndexData, m.NoData)):
            inf = self.inflight.pop(msg.id, None)
            if inf is not None:
                swarm.on_reply(self, inf, msg)
        elif isinstance(msg, (m.Request, m.IndexRequest)):
            self._serve.append((key, msg))
            self._serve_event.set()
        elif isinstance(msg, m.Head):
            swarm.on_head(self, key, Head(msg.length, msg.root, msg.signature))
        elif isinstance(msg, m.Have):
            self._merge_have(key, msg.ranges)
            self.announced.add(key)
            swarm.on_have(self, key)

    async def _server(self) -> None:
        while True:
            if not self._serve:
                self._serve_event = trio.Event()
                await self._serve_event.wait()
                continue
            key, msg = self._serve.popleft()
            if not self.conn.can_send:
                # the peer ended its side (its requests are void) while we were
                # woken or at a checkpoint; the reader is ending the connection
                self._serve.clear()
                continue
            reply = self.swarm.answer(self, key, msg)
            self.write(self.conn.send(reply))
            await self._wait_writable()
            await trio.lowlevel.checkpoint()
