"""One p2pfs connection as a sans-IO state machine: bytes in, events and bytes out.

Theory of operation
-------------------
The driver (`p2pfs.net`) owns the socket.  It passes every chunk it reads to
`receive_data` (``b""`` at end of input) -- or reads straight into the
frame buffer with `get_buffer` / `buffer_updated` -- then calls
`next_event` until it returns None, then writes `data_to_send()`.  Everything the application
wants to say goes through `open_channel`, `close_channel` and `send`, which
return the bytes to write (including any protocol replies queued before, so
that ciphertexts always leave in order).  Any ProtocolError raised by
`next_event` is final: the connection is dead and must be dropped -- after
writing `data_to_send()`, which may still hold a refusal for the peer (the
second handshake message saying why we do not talk to it).  Once open, a
driver may call `decrypt_ahead` (in a worker thread) between `receive_data`
and `next_event`: it decrypts the buffered frames in order and touches only
the receiving half.

Phases::

    HANDSHAKE   Noise XX, three frames (initiator writes 1 and 3), whose
                payloads agree on the protocol version and the transport
                cipher (`negotiation`).
    OPEN        one transport ciphertext per frame, one message each.

First flight.  The initiator is OPEN as soon as it has read message 2: it
may open channels and send requests at once, and they leave in the same
write as message 3 (its `HandshakeComplete` comes before `data_to_send`).
The responder reads message 3 and those frames in one `receive_data`, so
its first frames can already answer them: a cold read's first byte
arrives two round trips after TCP connect.

Channels.  Each side numbers the channels it opens (`Open.channel`, never
reused) and every message carries the *sender's* number, so no number is
ever negotiated.  A channel for a drive is open when both sides have sent
`Open` for its discovery key; a side may send on its own number at once.
`Open` carries a capability: keyed BLAKE2b under the handshake hash of the
sender's role and the drive key.  It proves that the sender knows the drive
key, it cannot be replayed on another connection (other handshake hash) or
reflected (other role).  When a valid `Open` arrives for a drive we know
(our own open channel or `lookup_key`), we answer with our own `Open` if we
have not sent one; for an unknown discovery key and for a known one with a
wrong capability alike we answer `Reject` and keep nothing, so a peer
without the key learns nothing about what we hold.  Messages on channel
numbers we do not have open are ignored (they may be in flight across a
Close).

Requests.  Every `Request`/`IndexRequest` gets exactly one reply (`Data`,
`IndexData` or `NoData`); `Cancel` turns a pending one into `NoData` at once.
At most `MAX_REQUESTS` may be outstanding per direction; a peer that sends
more, repeats an id, or replies with the wrong kind, other blocks, other
proof nodes or (for an IndexRequest) another length breaks the protocol.
An IndexRequest for length 0 must be answered for the length of the last
Head the peer sent on that channel (it sends it first).  A reply's event
carries the request it answers.  Replies to requests we no longer track
(cancelled, channel closed) are dropped without an event.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from .. import crypto
from ..errors import ProtocolError
from . import messages as m
from . import negotiation
from .frames import MAX_FRAME, PREFIX as FRAME_PREFIX, PREFIX_BYTES, FrameDecoder, encode_frame
from .noise import Handshake

PROLOGUE = b"p2pfs/noise/v2"
V1_PROLOGUE = b"p2pfs/noise/v1"   # only to recognise a version-1 responder
MAX_HANDSHAKE_FRAME = 4096
MAX_REQUESTS = 256        # outstanding requests per direction per connection
MAX_CHANNELS = 4096       # channels the peer may have open on one connection
UNASKED_FRAME = 128 << 10  # the largest frame while no request of ours is out (every
                           # message but a reply is smaller: a full Have is about 78 KiB)


def capability(handshake_hash: bytes, initiator: bool, drive_key: bytes) -> bytes:
    """The proof that the side with role `initiator` knows `drive_key`."""
    role = b"\x01" if initiator else b"\x02"
    return hashlib.blake2b(b"p2pfs/capability/v1" + role + drive_key, key=handshake_hash, digest_size=32).digest()


# --- events ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """We may send from now on; `remote_static` is the peer's X25519 node key,
    `version` and `cipher` what the handshake agreed."""

    remote_static: bytes
    version: int
    cipher: str


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
    """A message on an open channel: Head, Have, Request, IndexRequest, Data,
    IndexData, NoData.  For a reply, `request` is the request it answers."""

    drive_key: bytes
    message: m.Message
    request: m.Request | m.IndexRequest | None = None
    prepared: object = None  # for a reply: what decrypt_ahead's `prepare` made of it


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer closed its side cleanly."""


Event = HandshakeComplete | ChannelOpened | ChannelClosed | Received | EndOfStream


class _Channel:
    __slots__ = ("drive_key", "discovery_key", "local", "remote", "head_length")

    def __init__(self, drive_key: bytes, discovery_key: bytes):
        self.drive_key = drive_key
        self.discovery_key = discovery_key
        self.local: int | None = None
        self.remote: int | None = None
        self.head_length: int | None = None  # of the last Head the peer sent


_HANDSHAKE, _OPEN, _CLOSED, _ERROR = range(4)


class Connection:
    """One side of a connection.  `lookup_key(discovery_key)` returns the drive
    key if we serve or want that drive, else None (it must be quick and must
    not block: it runs inside `next_event`).

    `ciphers` is this node's transport cipher preference (default
    `crypto.local_ciphers()`); `versions` the protocol versions it speaks
    (tests only); `ephemeral_private` only for test vectors."""

    def __init__(
        self,
        initiator: bool,
        static_private: bytes,
        lookup_key: Callable[[bytes], bytes | None] = lambda dk: None,
        *,
        ciphers: Sequence[str] | None = None,
        versions: tuple[int, int] = negotiation.VERSIONS,
        ephemeral_private: bytes | None = None,
        max_frame: int = MAX_FRAME,
    ):
        self.initiator = initiator
        self._lookup_key = lookup_key
        self._ciphers = tuple(crypto.local_ciphers() if ciphers is None else ciphers)
        if not self._ciphers or any(c not in crypto.TRANSPORT_CIPHERS for c in self._ciphers):
            raise ValueError(f"ciphers must be some of {crypto.TRANSPORT_CIPHERS}, not {self._ciphers}")
        self._versions = versions
        if ephemeral_private is None:
            ephemeral_private, _ = crypto.x25519_keypair()
        self._static = static_private
        self._hs = Handshake(initiator, static_private, PROLOGUE, ephemeral_private)
        self._frames = FrameDecoder(MAX_HANDSHAKE_FRAME)
        self._max_frame = max_frame
        self._state = _HANDSHAKE
        self._error: ProtocolError | None = None
        self._out: list = []   # queued output pieces, joined once by data_to_send
        self._events: deque[Event] = deque()
        # decrypted by decrypt_ahead, not yet handled: plaintexts, or (message,
        # what `prepare` made of it) when decrypt_ahead decoded them too
        self._plain: deque = deque()
        self._plain_error: ProtocolError | None = None  # met by decrypt_ahead after _plain
        self._encryptor: crypto.TransportEncryptor | None = None
        self._decryptor: crypto.TransportDecryptor | None = None
        self._agreement: negotiation.Agreement | None = None
        self.version: int | None = None
        self.cipher: str | None = None
        self.handshake_hash: bytes | None = None
        self.remote_static: bytes | None = None
        self._by_dk: dict[bytes, _Channel] = {}
        self._by_local: dict[int, _Channel] = {}
        self._by_remote: dict[int, _Channel] = {}
        self._next_local = 0
        # id -> [channel, the request, cancelled] for requests we sent
        self._pending: dict[int, list] = {}
        # id -> channel for requests the peer sent and we have not answered
        self._remote_pending: dict[int, _Channel] = {}
        self._first: tuple[bytes, bytes] | None = None  # initiator: (ephemeral, offer) until message 2
        if initiator:
            offer = negotiation.offer(versions, self._ciphers)
            self._first = (ephemeral_private, offer)
            self._out.append(encode_frame(self._hs.write_message(offer), MAX_HANDSHAKE_FRAME))

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

    def data_to_send(self) -> bytes | bytearray:
        """Bytes queued by the protocol itself (handshake, replies); write them out.

        Still callable after a ProtocolError: a refusal may be queued."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def _queue(self, message: m.Message) -> None:
        # Encoded once into the frame's own buffer, allocated once (room for
        # the message and its tag: encode_into trims the rest, and the tag
        # then fits without a reallocation), sealed in place there.
        buf = bytearray(PREFIX_BYTES + m.size_hint(message) + crypto.TRANSPORT_TAG_BYTES)
        m.encode_into(message, buf, PREFIX_BYTES)
        size = len(buf) - PREFIX_BYTES + crypto.TRANSPORT_TAG_BYTES
        if size > self._max_frame:
            raise ValueError(f"message of {size} bytes exceeds the frame limit")
        self._encryptor.seal(buf, PREFIX_BYTES)
        FRAME_PREFIX.pack_into(buf, 0, size)
        self._out.append(buf)

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
        elif isinstance(message, m.REQUEST_TYPES):
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

    def _limit_frames(self) -> None:
        """A peer may send frames of up to `max_frame` only while it owes us a
        reply: otherwise `UNASKED_FRAME`, so a connection that is asked
        nothing makes us buffer little."""
        if self._state == _OPEN:
            self._frames.max_size = self._max_frame if self._pending else min(self._max_frame, UNASKED_FRAME)

    @property
    def expects_data(self) -> bool:
        """Whether a reply of ours is outstanding (large frames may come)."""
        return bool(self._pending)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Instead of `receive_data`: a view to read up to `sizehint` bytes into
        (``sock.recv_into``), exactly the rest of a large frame in progress, or
        the last bytes of one and at most LARGE_FRAME more; then call
        `buffer_updated` with the count read (a read of 0 bytes is end of
        input: call ``receive_data(b"")``).  Saves the copy of every byte
        into the frame buffer."""
        if self._state == _CLOSED:
            raise RuntimeError("data received after end of stream")
        self._limit_frames()
        return self._frames.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were read into the view from `get_buffer`."""
        self._frames.buffer_updated(nbytes)

    @property
    def ready_bytes(self) -> int:
        """Bytes buffered, if they begin with a whole frame (else 0): what
        `decrypt_ahead` would have to work on."""
        return self._frames.ready

    @property
    def can_decrypt_ahead(self) -> bool:
        return self._state == _OPEN and self._plain_error is None

    def decrypt_ahead(self, prepare: Callable[[m.Message], object] | None = None) -> None:
        """Decrypt every whole frame buffered, in order, for `next_event`.

        It touches only the receiving half (the frame buffer and the
        decryptor), so a driver may run it in a worker thread while its other
        tasks send; nothing may call `receive_data`, `get_buffer`,
        `buffer_updated` or `next_event` meanwhile.
        With `prepare`, each message is decoded here too and `prepare(message)`
        called on it (in the same thread: the driver's per-byte work, such as
        hashing a run's blocks); a reply's Received event carries what it
        returned as `prepared`.  `prepare` sees a message before it is
        checked against its request, and must not raise.
        A bad frame (or message) is kept and raised by `next_event` in its turn."""
        if not self.can_decrypt_ahead:
            return
        frames, decrypt, plain = self._frames, self._decryptor.decrypt, self._plain
        try:
            while (plaintext := frames.next_frame(decrypt)) is not None:
                if prepare is None:
                    plain.append(plaintext)
                else:
                    msg = m.decode(plaintext)
                    plain.append((msg, prepare(msg)))
        except ProtocolError as exc:
            self._plain_error = exc

    def next_event(self) -> Event | None:
        """The next event, or None if more bytes are needed.  Raises ProtocolError."""
        if self._state == _ERROR:
            raise self._error
        self._limit_frames()
        try:
            while not self._events:
                if self._state == _CLOSED:
                    return None
                if self._plain:
                    item = self._plain.popleft()
                    if type(item) is tuple:
                        self._handle_message(*item)
                    else:
                        self._handle_message(m.decode(item))
                    continue
                if self._plain_error is not None:
                    raise self._plain_error
                if self._state == _OPEN:
                    plaintext = self._frames.next_frame(self._decryptor.decrypt)
                    if plaintext is not None:
                        self._handle_message(m.decode(plaintext))
                        continue
                else:
                    frame = self._frames.next_frame()
                    if frame is not None:
                        self._handle_handshake(frame)
                        continue
                if self._frames._eof:
                    self._state = _CLOSED
                    self._pending.clear()
                    self._remote_pending.clear()
                    return EndOfStream()
                return None
        except ProtocolError as exc:
            self._state = _ERROR
            self._error = exc
            raise
        return self._events.popleft()

    # --- the handshake -------------------------------------------------------

    def _handle_handshake(self, frame: bytes) -> None:
        if self.initiator:  # message 2: the responder's choice (or refusal)
            try:
                payload = self._hs.read_message(frame)
            except ProtocolError:
                if self._speaks_v1(frame):
                    raise ProtocolError(negotiation.version_error((1, 1), self._versions)) from None
                raise
            self._first = None
            agreement = negotiation.accept(payload, self._versions, self._ciphers)
            self._write_handshake(negotiation.confirm(agreement))
            self._complete(agreement)
        elif self._agreement is None:  # message 1: the initiator's offer
            payload = self._hs.read_message(frame)
            reply, outcome = negotiation.respond(payload, self._versions, self._ciphers)
            self._write_handshake(reply)
            if isinstance(outcome, ProtocolError):
                raise outcome  # the refusal is queued in data_to_send
            self._agreement = outcome
        else:  # message 3: the initiator confirms
            negotiation.check_confirm(self._hs.read_message(frame), self._agreement)
            self._complete(self._agreement)

    def _write_handshake(self, payload: bytes) -> None:
        self._out.append(encode_frame(self._hs.write_message(payload), MAX_HANDSHAKE_FRAME))

    def _speaks_v1(self, message2: bytes) -> bool:
        """True if a responder of protocol version 1 wrote `message2`: it
        authenticates under the old prologue (which ignored our offer)."""
        ephemeral, offer = self._first
        old = Handshake(True, self._static, V1_PROLOGUE, ephemeral)
        old.write_message(offer)
        try:
            old.read_message(message2)
        except ProtocolError:
            return False
        return True

    def _complete(self, agreement: negotiation.Agreement) -> None:
        self.handshake_hash = self._hs.handshake_hash
        self.remote_static = self._hs.remote_static
        to_responder, to_initiator = self._hs.split()
        send, recv = (to_responder, to_initiator) if self.initiator else (to_initiator, to_responder)
        cipher = agreement.cipher
        self._encryptor = crypto.TransportEncryptor(cipher, crypto.transport_key(send, cipher))
        self._decryptor = crypto.TransportDecryptor(cipher, crypto.transport_key(recv, cipher))
        self.version, self.cipher = agreement.version, cipher
        self._state = _OPEN
        self._limit_frames()
        self._events.append(HandshakeComplete(self.remote_static, agreement.version, cipher))

    # --- messages -------------------------------------------------------------

    def _handle_message(self, msg: m.Message, prepared: object = None) -> None:
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
        elif isinstance(msg, m.REQUEST_TYPES):
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
            if isinstance(msg, m.Data):
                _check_data(msg, request)
            elif isinstance(msg, m.IndexData):
                _check_index_data(msg, request, ch)
            del self._pending[msg.id]
            if not pending[2]:
                self._events.append(Received(ch.drive_key, msg, request, prepared))
        else:  # Head, Have
            if isinstance(msg, m.Head):
                ch.head_length = msg.length
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


def _check_data(msg: m.Data, request: m.Message) -> None:
    """A Data reply carries exactly the run and the proof nodes asked for."""
    if not isinstance(request, m.Request):
        raise ProtocolError(f"peer answered index request {msg.id} with block data")
    if msg.start != request.start or len(msg.blocks) != request.count:
        raise ProtocolError(
            f"peer answered request {msg.id} for blocks {request.start}+{request.count}"
            f" with blocks {msg.start}+{len(msg.blocks)}")
    if sorted(p[0] for p in msg.proof) != request.nodes:
        raise ProtocolError(f"peer answered request {msg.id} with other proof nodes than asked for")


def _check_index_data(msg: m.IndexData, request: m.Message, ch: _Channel) -> None:
    """An IndexData reply is for the length asked, or (0) the peer's last Head."""
    if not isinstance(request, m.IndexRequest):
        raise ProtocolError(f"peer answered block request {msg.id} with index data")
    want = request.length or ch.head_length
    if msg.length != want:
        raise ProtocolError(
            f"peer answered index request {msg.id} for length {msg.length}, not {want}"
            + ("" if request.length else " (its last Head)"))
