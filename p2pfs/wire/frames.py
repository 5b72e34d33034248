"""Length-prefixed frames: ``u32le length || payload``, bounded.

Every byte on a p2pfs connection is inside a frame: the three Noise
handshake messages, then one transport ciphertext (message || 16-byte
tag) per message.  `length` counts the payload only.
A length above the decoder's `max_size` is refused before any of the
payload is buffered, so a peer can make us hold at most one maximum-size
frame plus one read's worth of bytes.
"""

from __future__ import annotations

import struct

from ..errors import ProtocolError, TruncatedError

PREFIX = struct.Struct("<I")
PREFIX_BYTES = PREFIX.size
# The largest message (`messages.MAX_MESSAGE`: 1 MiB of blocks, their leaves
# and proof) and its 16-byte tag.
MAX_FRAME = (1 << 20) + (64 << 10) + 16
# A frame in progress with at least this much still to come is read exactly
# into place by `FrameDecoder.get_buffer`.
LARGE_FRAME = 64 << 10
READ_ROOM = 1 << 20   # a read's worth, past a whole frame, before the buffer stops doubling


def encode_frame(payload: bytes, max_size: int = MAX_FRAME) -> bytes:
    """``u32le len(payload) || payload``.  Our own oversized frame is a bug (ValueError)."""
    if len(payload) > max_size:
        raise ValueError(f"frame of {len(payload)} bytes exceeds the {max_size}-byte limit")
    return PREFIX.pack(len(payload)) + payload


class FrameDecoder:
    """Feed bytes in any pieces; take whole frame payloads out.

    `feed(b"")` marks end of input; `next_frame()` then raises ProtocolError
    if a partial frame is left over.  Oversized frames raise ProtocolError.

    The buffer is kept for the decoder's life (at most about one frame plus
    one read): freeing and reallocating a megabyte per frame costs more
    than the cipher (the allocator returns it to the kernel and faults it
    back in).  `get_buffer` / `buffer_updated` let a driver read straight
    into it (``recv_into``), a large frame's rest exactly into place, so
    its bytes are never copied again before they are decrypted.
    """

    __slots__ = ("_buf", "_start", "_end", "max_size", "_eof")

    def __init__(self, max_size: int = MAX_FRAME):
        self._buf = bytearray()
        self._start = 0   # first byte not yet taken
        self._end = 0     # end of the bytes received
        self.max_size = max_size
        self._eof = False

    def _room(self, n: int) -> None:
        """Make `n` bytes writable at `_end` (never resizes the bytearray in
        place, so a driver's stale view of it cannot get in the way)."""
        if self._start == self._end:
            self._start = self._end = 0
        if self._end + n <= len(self._buf):
            return
        pending = self._end - self._start
        if pending + n <= len(self._buf):  # move the partial frame to the front
            self._buf[:pending] = self._buf[self._start:self._end]
        else:  # grow by doubling, up to a frame and a read
            cap = self.max_size + PREFIX_BYTES + READ_ROOM
            grown = bytearray(max(pending + n, min(2 * len(self._buf), cap)))
            grown[:pending] = memoryview(self._buf)[self._start:self._end]
            self._buf = grown
        self._start, self._end = 0, pending

    def feed(self, data) -> None:
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("data fed after end of input")
        n = len(data)
        self._room(n)
        self._buf[self._end:self._end + n] = data
        self._end += n

    def get_buffer(self, sizehint: int) -> memoryview:
        """A writable view for the next read: `sizehint` bytes, exactly the
        rest of a large frame in progress, or (a frame's last bytes due) at
        most that rest and LARGE_FRAME more.  Call `buffer_updated` with the
        number of bytes read into it before anything else."""
        if self._eof:
            raise RuntimeError("read after end of input")
        n = sizehint
        have = self._end - self._start
        if have >= PREFIX_BYTES:
            (size,) = PREFIX.unpack_from(self._buf, self._start)
            rest = PREFIX_BYTES + size - have
            if rest >= LARGE_FRAME and size <= self.max_size:
                n = rest
            elif rest > 0:
                # the end of a frame and at most LARGE_FRAME of the next: a
                # full read would take most of the next large frame too, and
                # that frame, begun late in the buffer, would then be moved
                # to the front to make room for its rest (measured: 0.66
                # bytes moved, twice, per byte fetched)
                n = min(n, rest + LARGE_FRAME)
        self._room(n)
        return memoryview(self._buf)[self._end:self._end + n]

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were read into the view `get_buffer` gave (0 is not end of
        input: use `feed(b"")` for that)."""
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise ValueError(f"{nbytes} bytes do not fit the buffer given")
        self._end += nbytes

    @property
    def buffered(self) -> int:
        return self._end - self._start

    @property
    def ready(self) -> int:
        """The bytes buffered if the first of them is a whole frame, else 0."""
        avail = self._end - self._start
        if avail < PREFIX_BYTES:
            return 0
        (size,) = PREFIX.unpack_from(self._buf, self._start)
        return avail if avail >= PREFIX_BYTES + size else 0

    def next_frame(self, transform=bytes):
        """The next whole payload, or None if more bytes are needed (or at a clean EOF).

        The payload is passed to `transform` as a memoryview of the buffer
        (default: copied out as bytes); `transform` must not keep the view
        (a decryptor returns its own plaintext), and sees it before any
        further bytes arrive.  Its exceptions propagate."""
        avail = self._end - self._start
        if avail >= PREFIX_BYTES:
            (size,) = PREFIX.unpack_from(self._buf, self._start)
            if size > self.max_size:
                raise ProtocolError(f"peer sent a {size}-byte frame; the limit is {self.max_size}")
            if avail >= PREFIX_BYTES + size:
                start = self._start + PREFIX_BYTES
                self._start = start + size
                with memoryview(self._buf) as view, view[start:self._start] as frame:
                    return transform(frame)
        if self._eof and avail:
            raise TruncatedError("peer closed the connection in the middle of a frame")
        return None
