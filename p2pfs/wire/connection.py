"""One p2pfs connection as a sans-IO state machine: bytes in, events and bytes out.

Theory of operation
-------------------
The driver (`p2pfs.net`) owns the socket.  It passes every chunk it reads to
`receive_data` (``b""`` at end of input), then calls `next_event` until it
returns None, then writes `data_to_send()`.  Everything the application
wants to say goes through `open_channel`, `close_channel` and `send`, which
return the bytes to write (including any protocol replies queued before, so
that ciphertexts always leave in order).  Any ProtocolError raised by
`next_event` is final: the connection is dead and must be dropped.  Once
open, a driver may call `decrypt_ahead` (in a worker thread) between
`receive_data` and `next_event`: it decrypts the buffered frames in order
and touches only the receiving half.

Phases::

    HANDSHAKE   Noise XX, three frames (initiator writes 1 and 3).
    HEADERS     each side sends one frame: stream id (32) || secretstream
                header (24), the stream id binding the header to this
                handshake and to the sender's role.  A side may send
                messages right after its own header.
    OPEN        one secretstream ciphertext per frame, one message each.

Channels.  Each side numbers the channels it opens (`Open.channel`, never
reused) and every message carries the *sender's* number, so no number is
ever negotiated.  A channel for a drive is open when both sides have sent
`Open` for its discovery key.  `Open` carries a capability: keyed BLAKE2b
under the handshake hash of the sender's role and the drive key.  It proves
that the sender knows the drive key, it cannot be replayed on another
connection (other handshake hash) or reflected (other role).  When a valid
`Open` arrives for a drive we know (our own open channel or `lookup_key`),
we answer with our own `Open` if we have not sent one; for an unknown
discovery key and for a known one with a wrong capability alike we answer
`Reject` and keep nothing, so a peer without the key learns nothing about
what we hold.  Messages on channel numbers we do not have open are ignored
(they may be in flight across a Close).

Requests.  Every `Request`/`IndexRequest` gets exactly one reply (`Data`,
`IndexData` or `NoData`); `Cancel` turns a pending one into `NoData` at once.
At most `MAX_REQUESTS` may be outstanding per direction; a peer that sends
more, replies with the wrong kind or block, or repeats an id, breaks the
protocol.  Replies to requests we no longer track (cancelled, channel
closed) are dropped without an event.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .. import crypto
from ..errors import ProtocolError
from . import messages as m
from .frames import MAX_FRAME, PREFIX as FRAME_PREFIX, FrameDecoder, encode_frame
from .noise import Handshake

PROLOGUE = b"p2pfs/noise/v1"
MAX_HANDSHAKE_FRAME = 4096
MAX_REQUESTS = 256        # outstanding requests per direction per connection
MAX_CHANNELS = 4096       # channels the peer may have open on one connection
STREAM_ID_BYTES = 32
HEADER_FRAME_BYTES = STREAM_ID_BYTES + crypto.SECRETSTREAM_HEADER_BYTES


def capability(handshake_hash: bytes, initiator: bool, drive_key: bytes) -> bytes:
    """The proof that the side with role `initiator` knows `drive_key`."""
    role = b"\x01" if initiator else b"\x02"
    return hashlib.blake2b(b"p2pfs/capability/v1" + role + drive_key, key=handshake_hash, digest_size=32).digest()


def _stream_id(handshake_hash: bytes, initiator: bool) -> bytes:
    role = b"\x01" if initiator else b"\x02"
    return hashlib.blake2b(b"p2pfs/stream/v1" + role, key=handshake_hash, digest_size=STREAM_ID_BYTES).digest()


# --- events ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """We may send from now on; `remote_static` is the peer's X25519 node key."""

    remote_static: bytes


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    """Both sides have opened the drive `drive_key` on this connection."""

    drive_key: bytes


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """The peer closed (or, if `rejected`, refused) the channel; its requests are void."""

    drive_key: bytes
    rejected: bool


@dataclass(frozen=True, slots=True)
class Received:
    """A message on an open channel: Head, Have, Request, IndexRequest, Data, IndexData, NoData."""

    drive_key: bytes
    message: m.Message


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer closed its side cleanly."""


Event = HandshakeComplete | ChannelOpened | ChannelClosed | Received | EndOfStream


class _Channel:
    __slots__ = ("drive_key", "discovery_key", "local", "remote")

    def __init__(self, drive_key: bytes, discovery_key: bytes):
        self.drive_key = drive_key
        self.discovery_key = discovery_key
        self.local: int | None = None
        self.remote: int | None = None


_HANDSHAKE, _HEADERS, _OPEN, _CLOSED, _ERROR = range(5)


class Connection:
    """One side of a connection.  `lookup_key(discovery_key)` returns the drive
    key if we serve or want that drive, else None (it must be quick and must
    not block: it runs inside `next_event`)."""

    def __init__(
        self,
        initiator: bool,
        static_private: bytes,
        lookup_key: Callable[[bytes], bytes | None] = lambda dk: None,
        *,
        ephemeral_private: bytes | None = None,
        max_frame: int = MAX_FRAME,
    ):
        self.initiator = initiator
        self._lookup_key = lookup_key
        self._hs = Handshake(initiator, static_private, PROLOGUE, ephemeral_private)
        self._frames = FrameDecoder(MAX_HANDSHAKE_FRAME)
        self._max_frame = max_frame
        self._state = _HANDSHAKE
        self._error: ProtocolError | None = None
        self._out: list[bytes] = []   # queued output pieces, joined once by data_to_send
        self._events: deque[Event] = deque()
        self._plain: deque[bytes] = deque()  # decrypted by decrypt_ahead, not yet handled
        self._plain_error: ProtocolError | None = None  # met by decrypt_ahead after _plain
        self._encryptor: crypto.StreamEncryptor | None = None
        self._decryptor: crypto.StreamDecryptor | None = None
        self.handshake_hash: bytes | None = None
        self.remote_static: bytes | None = None
        self._by_dk: dict[bytes, _Channel] = {}
        self._by_local: dict[int, _Channel] = {}
        self._by_remote: dict[int, _Channel] = {}
        self._next_local = 0
        # id -> (channel, the request) for requests we sent; value[2] = cancelled
        self._pending: dict[int, list] = {}
        # id -> channel for requests the peer sent and we have not answered
        self._remote_pending: dict[int, _Channel] = {}
        if initiator:
            self._out.append(encode_frame(self._hs.write_message(), MAX_HANDSHAKE_FRAME))

    # --- state -------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        return self._encryptor is not None and self._state not in (_CLOSED, _ERROR)

    @property
    def requests_in_flight(self) -> int:
        return len(self._pending)

    def local_channel(self, drive_key: bytes) -> int | None:
        """Our channel number for the drive, if we opened it."""
        ch = self._by_dk.get(crypto.discovery_key(drive_key))
        return None if ch is None else ch.local

    def is_open(self, drive_key: bytes) -> bool:
        ch = self._by_dk.get(crypto.discovery_key(drive_key))
        return ch is not None and ch.local is not None and ch.remote is not None

    def open_drives(self) -> list[bytes]:
        return [c.drive_key for c in self._by_dk.values() if c.local is not None and c.remote is not None]

    # --- output ------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes queued by the protocol itself (handshake, replies); write them out."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def _queue(self, message: m.Message) -> None:
        ciphertext = self._encryptor.encrypt(m.encode(message))
        if len(ciphertext) > self._max_frame:
            raise ValueError(f"message of {len(ciphertext)} bytes exceeds the frame limit")
        self._out.append(FRAME_PREFIX.pack(len(ciphertext)))
        self._out.append(ciphertext)

    def open_channel(self, drive_key: bytes) -> bytes:
        """Open the drive on this connection (no-op if already opened by us)."""
        self._check_can_send()
        dk = crypto.discovery_key(drive_key)
        ch = self._by_dk.get(dk)
        if ch is None:
            ch = self._by_dk[dk] = _Channel(drive_key, dk)
        if ch.local is None:
            self._open_local(ch)
        return self.data_to_send()

    def _open_local(self, ch: _Channel) -> None:
        ch.local = self._next_local
        self._next_local += 1
        self._by_local[ch.local] = ch
        cap = capability(self.handshake_hash, self.initiator, ch.drive_key)
        self._queue(m.Open(ch.local, ch.discovery_key, cap))

    def close_channel(self, drive_key: bytes) -> bytes:
        """Close the drive's channel: pending requests both ways are void."""
        self._check_can_send()
        ch = self._by_dk.get(crypto.discovery_key(drive_key))
        if ch is not None:
            if ch.local is not None:
                self._queue(m.Close(ch.local))
            self._drop_channel(ch)
        return self.data_to_send()

    def send(self, message: m.Message) -> bytes:
        """Encode and encrypt an application message; returns bytes to write.

        `message.channel` must be our number of a channel we opened.  Replies
        to requests that were cancelled or whose channel closed are dropped
        (only queued protocol bytes are returned).  Raises ValueError /
        RuntimeError on our own misuse.
        """
        self._check_can_send()
        if isinstance(message, (m.Open, m.Close, m.Reject)):
            raise ValueError("use open_channel/close_channel")
        ch = self._by_local.get(message.channel)
        if isinstance(message, m.REPLY_TYPES):
            owner = self._remote_pending.get(message.id)
            if owner is None or owner is not ch:
                return self.data_to_send()  # cancelled or closed meanwhile
            del self._remote_pending[message.id]
        elif ch is None:
            raise ValueError(f"channel {message.channel} is not open on our side")
        elif isinstance(message, (m.Request, m.IndexRequest)):
            if message.id in self._pending:
                raise ValueError(f"request id {message.id} is already in flight")
            if len(self._pending) >= MAX_REQUESTS:
                raise RuntimeError("too many requests in flight; wait for replies")
            self._pending[message.id] = [ch, message, False]
        elif isinstance(message, m.Cancel):
            pending = self._pending.get(message.id)
            if pending is None or pending[2]:
                return self.data_to_send()
            pending[2] = True
        self._queue(message)
        return self.data_to_send()

    def _check_can_send(self) -> None:
        if self._state == _ERROR:
            raise self._error
        if not self.can_send:
            raise RuntimeError("connection is not ready to send")

    # --- input -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the peer; b"" means the peer closed its side."""
        if self._state == _CLOSED:
            if data:
                raise RuntimeError("data received after end of stream")
            return
        self._frames.feed(data)

    @property
    def can_decrypt_ahead(self) -> bool:
        return self._state == _OPEN and self._plain_error is None

    def decrypt_ahead(self) -> None:
        """Decrypt every whole frame buffered, in order, for `next_event`.

        It touches only the receiving half (the frame buffer and the
        decryptor), so a driver may run it in a worker thread while its other
        tasks send; nothing may call `receive_data`/`next_event` meanwhile.
        A bad frame is kept and raised by `next_event` in its turn."""
        if not self.can_decrypt_ahead:
            return
        frames, decrypt, plain = self._frames, self._decryptor.decrypt, self._plain
        try:
            while (frame := frames.next_frame()) is not None:
                plain.append(decrypt(frame))
        except ProtocolError as exc:
            self._plain_error = exc

    def next_event(self) -> Event | None:
        """The next event, or None if more bytes are needed.  Raises ProtocolError."""
        if self._state == _ERROR:
            raise self._error
        try:
            while not self._events:
                if self._state == _CLOSED:
                    return None
                if self._plain:
                    self._handle_message(m.decode(self._plain.popleft()))
                    continue
                if self._plain_error is not None:
                    raise self._plain_error
                frame = self._frames.next_frame()
                if frame is None:
                    if self._frames._eof:
                        self._state = _CLOSED
                        self._pending.clear()
                        self._remote_pending.clear()
                        return EndOfStream()
                    return None
                self._handle_frame(frame)
        except ProtocolError as exc:
            self._state = _ERROR
            self._error = exc
            raise
        return self._events.popleft()

    def _handle_frame(self, frame: bytes) -> None:
        if self._state == _OPEN:
            self._handle_message(m.decode(self._decryptor.decrypt(frame)))
        elif self._state == _HANDSHAKE:
            self._handle_handshake(frame)
        else:
            self._handle_header(frame)

    def _handle_handshake(self, frame: bytes) -> None:
        self._hs.read_message(frame)  # the payload is ignored (reserved)
        if not self._hs.complete:
            self._out.append(encode_frame(self._hs.write_message(), MAX_HANDSHAKE_FRAME))
        if self._hs.complete:
            self.handshake_hash = self._hs.handshake_hash
            self.remote_static = self._hs.remote_static
            send_key, recv_key = self._hs.split()
            if not self.initiator:
                send_key, recv_key = recv_key, send_key
            self._recv_key = recv_key
            self._encryptor = crypto.StreamEncryptor(send_key)
            self._out.append(encode_frame(_stream_id(self.handshake_hash, self.initiator) + self._encryptor.header))
            self._state = _HEADERS
            self._frames.max_size = HEADER_FRAME_BYTES
            self._events.append(HandshakeComplete(self.remote_static))

    def _handle_header(self, frame: bytes) -> None:
        if len(frame) != HEADER_FRAME_BYTES:
            raise ProtocolError("peer sent a malformed secretstream header frame")
        expected = _stream_id(self.handshake_hash, not self.initiator)
        if not crypto.constant_time_equal(frame[:STREAM_ID_BYTES], expected):
            raise ProtocolError("peer's secretstream header belongs to another session")
        self._decryptor = crypto.StreamDecryptor(self._recv_key, frame[STREAM_ID_BYTES:])
        del self._recv_key
        self._frames.max_size = self._max_frame
        self._state = _OPEN

    def _handle_message(self, msg: m.Message) -> None:
        if isinstance(msg, m.Open):
            self._handle_open(msg)
            return
        if isinstance(msg, m.Reject):
            ch = self._by_local.get(msg.channel)
            if ch is not None:
                self._drop_channel(ch)
                self._events.append(ChannelClosed(ch.drive_key, True))
            return
        ch = self._by_remote.get(msg.channel)
        if ch is None:
            return  # not open (never, or closed meanwhile): ignore
        if isinstance(msg, m.Close):
            if ch.local is not None:
                self._queue(m.Close(ch.local))
            self._drop_channel(ch)
            self._events.append(ChannelClosed(ch.drive_key, False))
        elif isinstance(msg, (m.Request, m.IndexRequest)):
            if msg.id in self._remote_pending:
                raise ProtocolError(f"peer reused request id {msg.id} while it was in flight")
            if len(self._remote_pending) >= MAX_REQUESTS:
                raise ProtocolError(f"peer exceeded {MAX_REQUESTS} requests in flight")
            self._remote_pending[msg.id] = ch
            self._events.append(Received(ch.drive_key, msg))
        elif isinstance(msg, m.Cancel):
            if self._remote_pending.get(msg.id) is ch:
                del self._remote_pending[msg.id]
                self._queue(m.NoData(ch.local, msg.id))
        elif isinstance(msg, m.REPLY_TYPES):
            pending = self._pending.get(msg.id)
            if pending is None:
                return  # stale: its channel was closed
            if pending[0] is not ch:
                raise ProtocolError(f"peer answered request {msg.id} on the wrong channel")
            request = pending[1]
            if isinstance(msg, m.Data) and (not isinstance(request, m.Request) or msg.block != request.block):
                raise ProtocolError(f"peer answered request {msg.id} with the wrong block")
            if isinstance(msg, m.IndexData) and not isinstance(request, m.IndexRequest):
                raise ProtocolError(f"peer answered block request {msg.id} with index data")
            del self._pending[msg.id]
            if not pending[2]:
                self._events.append(Received(ch.drive_key, msg))
        else:  # Head, Have
            self._events.append(Received(ch.drive_key, msg))

    def _handle_open(self, msg: m.Open) -> None:
        if msg.channel in self._by_remote:
            raise ProtocolError(f"peer opened channel {msg.channel} twice")
        ch = self._by_dk.get(msg.discovery_key)
        drive_key = ch.drive_key if ch is not None else self._lookup_key(msg.discovery_key)
        if drive_key is None or not crypto.constant_time_equal(
            msg.capability, capability(self.handshake_hash, not self.initiator, drive_key)
        ):
            self._queue(m.Reject(msg.channel))
            return
        if ch is not None and ch.remote is not None:
            raise ProtocolError("peer opened one drive on two channels")
        if len(self._by_remote) >= MAX_CHANNELS:
            raise ProtocolError(f"peer opened more than {MAX_CHANNELS} channels")
        if ch is None:
            ch = self._by_dk[msg.discovery_key] = _Channel(drive_key, msg.discovery_key)
        ch.remote = msg.channel
        self._by_remote[msg.channel] = ch
        if ch.local is None:
            self._open_local(ch)
        self._events.append(ChannelOpened(drive_key))

    def _drop_channel(self, ch: _Channel) -> None:
        self._by_dk.pop(ch.discovery_key, None)
        if ch.local is not None:
            self._by_local.pop(ch.local, None)
        if ch.remote is not None:
            self._by_remote.pop(ch.remote, None)
        for rid in [i for i, p in self._pending.items() if p[0] is ch]:
            del self._pending[rid]
        for rid in [i for i, c in self._remote_pending.items() if c is ch]:
            del self._remote_pending[rid]
