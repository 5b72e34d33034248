"""Length-prefixed frames: ``u32le length || payload``, bounded.

Every byte on a p2pfs connection is inside a frame: the three Noise
handshake messages, then each side's secretstream header, then one
secretstream ciphertext per message.  `length` counts the payload only.
A length above the decoder's `max_size` is refused before any of the
payload is buffered, so a peer can make us hold at most one maximum-size
frame plus one read's worth of bytes.
"""

from __future__ import annotations

import struct

from ..errors import ProtocolError, TruncatedError

PREFIX = struct.Struct("<I")
PREFIX_BYTES = PREFIX.size
# One 64 KiB block with its proof in a message fits many times over; an
# index lookup reply packs several index blocks up to `messages.MAX_REPLY_DATA`.
MAX_FRAME = 1 << 20


def encode_frame(payload: bytes, max_size: int = MAX_FRAME) -> bytes:
    """``u32le len(payload) || payload``.  Our own oversized frame is a bug (ValueError)."""
    if len(payload) > max_size:
        raise ValueError(f"frame of {len(payload)} bytes exceeds the {max_size}-byte limit")
    return PREFIX.pack(len(payload)) + payload


class FrameDecoder:
    """Feed bytes in any pieces; take whole frame payloads out.

    `feed(b"")` marks end of input; `next_frame()` then raises ProtocolError
    if a partial frame is left over.  Oversized frames raise ProtocolError.
    """

    __slots__ = ("_buf", "_pos", "max_size", "_eof")

    def __init__(self, max_size: int = MAX_FRAME):
        self._buf = bytearray()
        self._pos = 0
        self.max_size = max_size
        self._eof = False

    def feed(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("data fed after end of input")
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> bytes | None:
        """The next whole payload, or None if more bytes are needed (or at a clean EOF)."""
        avail = len(self._buf) - self._pos
        if avail >= PREFIX_BYTES:
            (size,) = PREFIX.unpack_from(self._buf, self._pos)
            if size > self.max_size:
                raise ProtocolError(f"peer sent a {size}-byte frame; the limit is {self.max_size}")
            if avail >= PREFIX_BYTES + size:
                start = self._pos + PREFIX_BYTES
                self._pos = start + size
                with memoryview(self._buf) as view:  # one copy, not two
                    payload = bytes(view[start:self._pos])
                if self._pos == len(self._buf):
                    self._buf.clear()
                    self._pos = 0
                return payload
        if self._eof and avail:
            raise TruncatedError("peer closed the connection in the middle of a frame")
        return None
