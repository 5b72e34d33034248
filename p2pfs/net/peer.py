"""One connected peer: a trio driver around a sans-IO `wire.Connection`.

Theory of operation
-------------------
Three tasks share a peer and end together:

* the reader reads at most `RECV_SIZE` bytes at a time, feeds the
  Connection, and hands each event to the host (synchronously: verifying
  and storing a block happens there, so a peer's next bytes are not read
  before its last block is dealt with); once a read leaves at least
  `DECRYPT_IN_THREAD` bytes buffered that begin with a whole frame, they
  are first decrypted in a worker thread
  (`Connection.decrypt_ahead`: the cipher drops the GIL), so the other tasks
  of the node run meanwhile;
* the server answers the peer's requests one by one, in order;
* the writer owns the socket's sending side and writes whatever the other
  two queued, in the order they queued it (each `Connection.send` returns
  ciphertext that must leave in order, so nothing else may write), in
  pieces of at most `SEND_PIECE` bytes so that its progress can be watched.

The peer knows nothing of drives, fetching or other peers: it reports to
its `PeerHost` (the swarm) through a narrow interface and the host answers
requests.

Costs a peer can cause are bounded here:

* input: at most one frame (`MAX_FRAME`) plus one read buffered;
* output: above `HIGH_WATER` bytes queued (`START_WATER` until the peer has
  read `READER_PROVEN` bytes, `BLOCKED_WATER` once its socket has taken
  nothing for `SLOW_SEND`), neither the reader nor the server goes on until
  the writer has drained it; the host's `output_room` bounds the bytes queued by all
  peers together;
* requests: at most `wire.connection.MAX_REQUESTS` outstanding, served in
  order;
* announcements: Head and Have messages beyond `ANNOUNCE_RATE` per second
  (burst `ANNOUNCE_BURST`) drop the peer; a Head equal to the last one it
  sent for a drive is ignored before any signature check;
* time: the handshake within `HANDSHAKE_TIMEOUT`; the host's janitor closes
  idle peers and peers whose socket takes no bytes (`send_blocked_since`).

`run` never raises for peer trouble: it returns a `PeerEnd` saying why the
connection ended and whether the peer was at fault (broke the protocol,
lied, flooded) — a dialled peer at fault is not dialled again.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

import trio

from .. import tree
from ..errors import ProtocolError, TruncatedError, VerificationError
from ..types import Head, Node
from ..wire import messages as m
from ..wire.connection import (
    ChannelClosed, ChannelOpened, Connection, EndOfStream, HandshakeComplete, Received,
)

RECV_SIZE = 1 << 20
IDLE_RECV_SIZE = 16 << 10
HIGH_WATER = 2 << 20       # output queued per peer before its server waits: two 1 MiB replies ...
START_WATER = 256 << 10    # ... once it has read READER_PROVEN bytes; until then this
READER_PROVEN = 16 << 20   # (more than kernel buffers hold: a peer that never reads never gets there)
BLOCKED_WATER = 64 << 10   # ... once its socket has taken nothing for SLOW_SEND
SLOW_SEND = 0.05
SEND_PIECE = 128 << 10
# Whole frames this big are decrypted, decoded and their runs' blocks hashed in one
# worker thread hop (the AEAD and blake3 drop the GIL), leaving the main
# thread to verification, scheduling and a mount's reads: a megabyte's
# AES-GCM and BLAKE3 (0.5-0.9 ms here) cost far more than the hop (~0.05 ms).
DECRYPT_IN_THREAD = 256 << 10
HANDSHAKE_TIMEOUT = 10.0
MAX_HAVE_RANGES_KEPT = 1 << 16
ANNOUNCE_RATE = 20.0   # Head + Have messages per second a peer may send, sustained ...
ANNOUNCE_BURST = 200   # ... after a burst of this many


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


def _hash_run(msg: m.Message) -> list[Node] | None:
    """`Connection.decrypt_ahead`'s prepare, in the worker thread: the leaf
    of each block of a Data reply, so its verification hashes nothing."""
    if type(msg) is not m.Data:
        return None
    start = msg.start
    return [tree.leaf_node(start + i, block) for i, block in enumerate(msg.blocks)]


class PeerDropped(Exception):
    """Raised inside a peer's tasks (or by its host) to disconnect it.

    str() says why; `fault` says whether the peer misbehaved (then it is
    not dialled again) or is merely not wanted (a duplicate, idle, us)."""

    def __init__(self, reason: str, *, fault: bool = True):
        super().__init__(reason)
        self.fault = fault


@dataclass(frozen=True, slots=True)
class PeerEnd:
    """Why a connection ended."""

    reason: str
    fault: bool = False  # broke the protocol, sent data failing verification, flooded


# what a misbehaving or vanishing peer can cause, most telling first
_PEER_TROUBLE = (PeerDropped, VerificationError, ProtocolError,
                 trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class PeerHost(Protocol):
    """What a Peer reports to (the swarm).  Every method but the two `*_room`
    ones is synchronous and quick; any may raise PeerDropped."""

    node_key: bytes

    def lookup_key(self, discovery_key: bytes) -> bytes | None: ...
    def on_connected(self, peer: "Peer") -> None: ...
    def on_channel_opened(self, peer: "Peer", key: bytes) -> None: ...
    def on_channel_closed(self, peer: "Peer", key: bytes, rejected: bool) -> None: ...
    def on_head(self, peer: "Peer", key: bytes, head: Head, dht_signature: bytes) -> None: ...
    def on_have(self, peer: "Peer", key: bytes) -> None: ...
    def on_reply(self, peer: "Peer", inf: "Inflight", msg, leaves: "list[Node] | None") -> None: ...
    def after_input(self, peer: "Peer") -> None: ...
    def answer(self, peer: "Peer", key: bytes, msg, send: Callable[[m.Message], None]) -> None: ...
    def output_changed(self, delta: int) -> None: ...
    async def input_room(self) -> None: ...
    async def output_room(self, peer: "Peer") -> None: ...


class Inflight:
    """A request we sent and have not had answered: the run ``[start,
    start+count)`` of version `length`, or (with `path`) an index lookup."""

    __slots__ = ("key", "start", "count", "length", "sent", "path", "done")

    def __init__(self, key: bytes, start: int, count: int, length: int, sent: float,
                 path: bytes | None = None):
        self.key = key
        self.start = start
        self.count = count
        self.length = length
        self.sent = sent
        self.path = path
        self.done: trio.Event | None = trio.Event() if path is not None else None

    @property
    def blocks(self) -> range:
        return range(self.start, self.start + self.count)


class Peer:
    def __init__(self, host: PeerHost, stream: trio.abc.Stream, initiator: bool, address: str):
        self.host = host
        self.stream = stream
        self.address = address
        self.initiator = initiator
        self.conn = Connection(initiator, host.node_key, host.lookup_key)
        self.remote_key: bytes | None = None
        self.version: int | None = None   # protocol version and cipher the handshake agreed
        self.cipher: str | None = None
        self.source = "static" if initiator else "incoming"  # where its address came from
        self.heads: dict[bytes, Head] = {}
        self.haves: dict[bytes, list[tuple[int, int]]] = {}
        self.announced: set[bytes] = set()   # drives whose first Have arrived
        self.inflight: dict[int, Inflight] = {}
        self.stalled = False
        self.stalls = 0              # stall periods in a row without a completed reply
        self.paused = False
        now = trio.current_time()
        self.started = now
        self.last_reply = now        # the last completed reply to one of our requests
        self.stall_mark = now        # when the fetcher last judged it (see fetcher.watch)
        self.last_active = now       # the last message on an open channel, either way
        self.connected = trio.Event()
        self.closed = False
        self.blocks_received = 0
        self.blocks_sent = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.send_blocked_since: float | None = None
        self._drop: PeerDropped | None = None
        self._cancel = trio.CancelScope()
        self._announce_tokens = float(ANNOUNCE_BURST)
        self._announce_time = now
        self._next_id = 0
        self._out: deque = deque()   # pieces to write, in order
        self._out_bytes = 0
        self._out_event = trio.Event()
        self._drained = trio.Event()
        self._serve: deque = deque()
        self._serve_event = trio.Event()

    def __repr__(self) -> str:
        return f"<Peer {self.address}>"

    # --- control -----------------------------------------------------------------

    def drop(self, reason: str, *, fault: bool = True) -> None:
        """Disconnect from outside the peer's tasks (the janitor, a duplicate)."""
        if self._drop is None:
            self._drop = PeerDropped(reason, fault=fault)
        self._cancel.cancel()

    def abort(self, reason: str) -> None:
        """Drop the peer and release its descriptor now (not when its tasks
        next run): room for another connection at once."""
        self.drop(reason, fault=False)
        sock = getattr(self.stream, "socket", None)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    @property
    def holds_descriptor(self) -> bool:
        """Its socket is still open (a peer that ended keeps it for up to a
        second while its refusal is sent); a stream without a socket (tests:
        memory streams) counts as holding one."""
        sock = getattr(self.stream, "socket", None)
        return sock is None or sock.fileno() != -1

    @property
    def has_channels(self) -> bool:
        return bool(self.conn.open_drives())

    @property
    def serving(self) -> bool:
        """Requests of the peer's are waiting for our answer."""
        return bool(self._serve)

    # --- output ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if data and not self.closed:
            self._out.append(data)
            self._out_bytes += len(data)
            self.host.output_changed(len(data))
            self._out_event.set()

    @property
    def queued_output(self) -> int:
        return self._out_bytes

    def _behind(self) -> bool:
        """Too much queued: above HIGH_WATER, or above BLOCKED_WATER while the
        socket takes nothing (a peer that does not read costs little)."""
        high = HIGH_WATER if self.bytes_sent >= READER_PROVEN else START_WATER
        return self._out_bytes > high or (self._out_bytes > BLOCKED_WATER and self.slow)

    @property
    def slow(self) -> bool:
        """Its socket has taken nothing for SLOW_SEND seconds while we had output."""
        since = self.send_blocked_since
        return since is not None and trio.current_time() - since > SLOW_SEND

    async def _wait_writable(self) -> None:
        while self._behind():
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
            # Small pieces (many messages) are joined into one write; a large
            # one (a run of blocks) is written as it is, never copied again.
            batch: list = []
            size = 0
            while self._out and (not batch or size + len(self._out[0]) <= SEND_PIECE):
                piece = self._out.popleft()
                batch.append(piece)
                size += len(piece)
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            del batch
            with memoryview(data) as view:
                for start in range(0, len(data), SEND_PIECE):
                    piece = view[start:start + SEND_PIECE]
                    self.send_blocked_since = trio.current_time()
                    await self.stream.send_all(piece)
                    self.send_blocked_since = None
                    self._out_bytes -= len(piece)
                    self.bytes_sent += len(piece)
                    self.host.output_changed(-len(piece))
                    self._drained.set()  # waiters look again
            del data

    def _release_output(self) -> None:
        if self._out_bytes:
            self.host.output_changed(-self._out_bytes)
            self._out_bytes = 0
        self._out.clear()

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

    def _new_request_id(self) -> int:
        if not self.inflight:
            self.stall_mark = trio.current_time()  # a stall is judged from the first request
        rid = self._next_id
        self._next_id += 1
        return rid

    def request_run(self, key: bytes, start: int, count: int, length: int, nodes: list[int]) -> None:
        """Ask for blocks ``[start, start+count)`` of version `length` with the proof `nodes`."""
        rid = self._new_request_id()
        ch = self.conn.local_channel(key)
        self.write(self.conn.send(m.Request(ch, rid, start, count, length, nodes)))
        self.inflight[rid] = Inflight(key, start, count, length, trio.current_time())

    def request_path(self, key: bytes, path: bytes, length: int, content_bytes: int = 0) -> Inflight:
        """Ask for what a lookup of `path` in version `length` (0: the peer's
        newest) reads, and the first `content_bytes` of it if it is a file."""
        rid = self._new_request_id()
        ch = self.conn.local_channel(key)
        self.write(self.conn.send(m.IndexRequest(ch, rid, path, length, content_bytes)))
        inf = self.inflight[rid] = Inflight(key, -1, 0, length, trio.current_time(), path)
        return inf

    def cancel(self, rid: int) -> Inflight | None:
        """Give up request `rid`: forget it and tell the peer (its reply is dropped)."""
        inf = self.inflight.pop(rid, None)
        if inf is not None and not self.closed and self.conn.can_send:
            ch = self.conn.local_channel(inf.key)
            if ch is not None:
                self.write(self.conn.send(m.Cancel(ch, rid)))
        return inf

    def _merge_have(self, key: bytes, ranges: list[tuple[int, int]]) -> None:
        """Add ranges to what the peer holds: a linear merge of two sorted lists."""
        new = sorted(tuple(r) for r in ranges)
        old = self.haves.get(key, [])
        out: list[tuple[int, int]] = []
        i = j = 0
        while i < len(old) or j < len(new):
            if j == len(new) or (i < len(old) and old[i] < new[j]):
                a, b = old[i]
                i += 1
            else:
                a, b = new[j]
                j += 1
            if out and a <= out[-1][1]:
                if b > out[-1][1]:
                    out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        if len(out) > MAX_HAVE_RANGES_KEPT:
            raise ProtocolError("peer announced too many separate block ranges")
        self.haves[key] = out

    def _count_announcement(self) -> None:
        now = trio.current_time()
        self._announce_tokens = min(float(ANNOUNCE_BURST),
                                    self._announce_tokens + (now - self._announce_time) * ANNOUNCE_RATE)
        self._announce_time = now
        self._announce_tokens -= 1
        if self._announce_tokens < 0:
            raise PeerDropped(f"flooded us with announcements (more than {ANNOUNCE_RATE:g} "
                              "Head/Have messages a second)")

    # --- running -------------------------------------------------------------------

    async def run(self) -> PeerEnd:
        """Serve the connection until it ends; returns why (never raises for
        peer trouble; cancellation from outside propagates)."""
        end = PeerEnd("disconnected")
        try:
            try:
                with self._cancel:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._writer)
                        nursery.start_soon(self._server)
                        nursery.start_soon(self._handshake_watchdog)
                        self.write(self.conn.data_to_send())
                        await self._reader()
                        end = PeerEnd("closed the connection")
                        nursery.cancel_scope.cancel()
                if self._drop is not None:
                    raise self._drop
            except BaseExceptionGroup as group:
                # reader and writer may fail together (a reset): report the
                # most telling one; anything else is a bug and propagates
                leaves = _leaves(group)
                if leaves and all(isinstance(e, _PEER_TROUBLE) for e in leaves):
                    for kind in _PEER_TROUBLE:
                        for exc in leaves:
                            if isinstance(exc, kind):
                                raise exc from None
                raise_single(group)
        except PeerDropped as exc:
            end = PeerEnd(str(exc), exc.fault)
        except TruncatedError as exc:
            end = PeerEnd(f"connection lost ({exc})")
        except ProtocolError as exc:
            end = PeerEnd(str(exc), True)
        except VerificationError as exc:
            end = PeerEnd(f"sent data that fails verification: {exc}", True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            end = PeerEnd(f"connection lost ({getattr(exc, 'strerror', None) or exc or type(exc).__name__})")
        finally:
            self.closed = True
            self._release_output()
            self._serve.clear()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    try:
                        if not self.connected.is_set():
                            # a handshake we refused: the refusal says why
                            refusal = self.conn.data_to_send()
                            if refusal:
                                await self.stream.send_all(refusal)
                        await self.stream.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
        return end

    async def _handshake_watchdog(self) -> None:
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            await self.connected.wait()
            return
        raise PeerDropped("no Noise handshake within %g s" % HANDSHAKE_TIMEOUT, fault=False)

    async def _reader(self) -> None:
        host = self.host
        conn = self.conn
        while True:
            self.paused = True  # not reading on our account: the peer is not stalling
            await self._wait_writable()
            await host.input_room()
            self.paused = False
            n = await self._receive()
            self.bytes_received += n
            if conn.ready_bytes >= DECRYPT_IN_THREAD and conn.can_decrypt_ahead:
                # the cipher and the hashing drop the GIL: our other tasks run meanwhile
                await trio.to_thread.run_sync(conn.decrypt_ahead, _hash_run)
            while True:
                ev = conn.next_event()
                if ev is None:
                    break
                if isinstance(ev, Received):
                    self._received(ev.drive_key, ev.message, ev.prepared)
                elif isinstance(ev, EndOfStream):
                    self._serve.clear()  # void: nobody will read the replies
                    return
                elif isinstance(ev, HandshakeComplete):
                    self.remote_key = ev.remote_static
                    self.version, self.cipher = ev.version, ev.cipher
                    self.connected.set()
                    host.on_connected(self)
                elif isinstance(ev, ChannelOpened):
                    self.last_active = trio.current_time()
                    host.on_channel_opened(self, ev.drive_key)
                elif isinstance(ev, ChannelClosed):
                    self.haves.pop(ev.drive_key, None)
                    self.heads.pop(ev.drive_key, None)
                    self.announced.discard(ev.drive_key)
                    host.on_channel_closed(self, ev.drive_key, ev.rejected)
            self.write(conn.data_to_send())
            host.after_input(self)
            if not n:
                return

    async def _receive(self) -> int:
        """Read once into the connection (0: end of input).  From a socket the
        bytes go straight into the frame buffer (`recv_into`), not copied."""
        sock = getattr(self.stream, "socket", None)
        if sock is None:
            data = await self.stream.receive_some(RECV_SIZE)
            self.conn.receive_data(data)
            return len(data)
        # a large read only when a reply is due: an idle connection keeps a small buffer
        view = self.conn.get_buffer(RECV_SIZE if self.conn.expects_data else IDLE_RECV_SIZE)
        try:
            n = await sock.recv_into(view)  # OSError (a reset) ends the peer as a lost connection
        finally:
            view.release()
        if n:
            self.conn.buffer_updated(n)
        else:
            self.conn.receive_data(b"")
        return n

    def _received(self, key: bytes, msg, leaves: list[Node] | None = None) -> None:
        host = self.host
        now = trio.current_time()
        self.last_active = now
        if isinstance(msg, (m.Data, m.IndexData, m.NoData)):
            inf = self.inflight.pop(msg.id, None)
            if inf is not None:
                self.last_reply = now
                self.stalled = False
                self.stalls = 0
                host.on_reply(self, inf, msg, leaves)
        elif isinstance(msg, (m.Request, m.IndexRequest)):
            self._serve.append((key, msg))
            self._serve_event.set()
        elif isinstance(msg, m.Head):
            self._count_announcement()
            head = Head(msg.length, msg.root, msg.signature)
            if self.heads.get(key) == head:
                return  # the same bytes again: nothing to check
            host.on_head(self, key, head, msg.dht_signature)
        elif isinstance(msg, m.Have):
            self._count_announcement()
            self._merge_have(key, msg.ranges)
            self.announced.add(key)
            host.on_have(self, key)

    def _send_reply(self, reply: m.Message) -> None:
        """Encrypt and queue a reply at once (a Data's blocks are valid only now)."""
        if isinstance(reply, m.Data):
            self.blocks_sent += len(reply.blocks)
        self.write(self.conn.send(reply))

    async def _server(self) -> None:
        host = self.host
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
            host.answer(self, key, msg, self._send_reply)
            await self._wait_writable()
            await host.output_room(self)
            await trio.lowlevel.checkpoint()
