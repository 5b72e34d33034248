"""Wire messages: frozen, tagged, array-like msgspec structs (MessagePack).

Each message is encoded as a MessagePack array whose first element is a
small integer tag, followed by the fields in the order declared here.
Schema evolution: fields are only ever appended, always with a default, so
an older decoder's extra-field tolerance and a newer decoder's defaults
keep both sides talking.  Tags are never reused.

Every field carries its value limit (`msgspec.Meta`) and is validated
while decoding; cross-field rules (a `Have` range must not be empty) are
checked in `__post_init__`.  `decode` turns every failure into
`ProtocolError`; it is the only door through which peer bytes become
objects.

`channel` is always the *sender's* local channel id (see `connection`);
request ids are chosen by the requester and unique per connection and
direction while the request is outstanding.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

from ..errors import ProtocolError
from ..types import Node

U64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Channel = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
Key32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Signature = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]

MAX_BLOCK_DATA = (1 << 20) - (64 << 10)  # a block's bytes; 64 KiB blocks fit 15 times
MAX_PROOF_NODES = 128          # 64 sibling levels + 64 peaks is the most a u64 log needs
MAX_PATH_BYTES = 4096
MAX_HAVE_RANGES = 4096
MAX_INDEX_BLOCKS = 16          # blocks in one IndexData reply
MAX_REPLY_DATA = (1 << 20) - (64 << 10)  # total block bytes in one IndexData reply

ProofNode = tuple[U64, Key32, U64]  # (flat-tree index, BLAKE3 hash, bytes covered)
Proof = Annotated[list[ProofNode], msgspec.Meta(max_length=MAX_PROOF_NODES)]
BlockBytes = Annotated[bytes, msgspec.Meta(max_length=MAX_BLOCK_DATA)]

class Open(msgspec.Struct, tag=1, array_like=True, frozen=True):
    """Open my channel `channel` for the drive whose discovery key is given.

    `capability` = keyed BLAKE2b of (role, drive key) under the Noise
    handshake hash (`connection.capability`): proves I know the drive key.
    """

    channel: Channel
    discovery_key: Key32
    capability: Key32


class Close(msgspec.Struct, tag=2, array_like=True, frozen=True):
    """I close my channel `channel`; requests on it are void."""

    channel: Channel


class Reject(msgspec.Struct, tag=3, array_like=True, frozen=True):
    """I refuse your channel `channel` (unknown drive or bad capability; not told apart)."""

    channel: Channel


class Head(msgspec.Struct, tag=4, array_like=True, frozen=True):
    """My latest signed head of the channel's drive."""

    channel: Channel
    length: U64
    root: Key32
    signature: Signature


class Have(msgspec.Struct, tag=5, array_like=True, frozen=True):
    """Block ranges I hold, ``[start, end)`` pairs; they add to earlier Haves."""

    channel: Channel
    ranges: Annotated[list[tuple[U64, U64]], msgspec.Meta(max_length=MAX_HAVE_RANGES)]

    def __post_init__(self):
        for start, end in self.ranges:
            if start >= end:
                raise ValueError("empty or reversed range")


class Request(msgspec.Struct, tag=6, array_like=True, frozen=True):
    """Send block `block` with `siblings` proof siblings (and the other peaks if
    `peaks`) for the signed version of `length` blocks."""

    channel: Channel
    id: U64
    block: U64
    siblings: Annotated[int, msgspec.Meta(ge=0, le=64)]
    peaks: bool
    length: U64

    def __post_init__(self):
        if self.block >= self.length:
            raise ValueError("block past the version length")


class IndexRequest(msgspec.Struct, tag=7, array_like=True, frozen=True):
    """Send every index block a lookup of `path` visits in version `length`,
    each with a proof against that version's peaks."""

    channel: Channel
    id: U64
    path: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_PATH_BYTES)]
    length: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]


class Data(msgspec.Struct, tag=8, array_like=True, frozen=True):
    """Block `block` of the requested version with its proof nodes."""

    channel: Channel
    id: U64
    block: U64
    data: BlockBytes
    proof: Proof

    @property
    def nodes(self) -> list[Node]:
        return [Node(*p) for p in self.proof]


class BlockItem(msgspec.Struct, array_like=True, frozen=True):
    """One block inside an IndexData reply (untagged)."""

    block: U64
    data: BlockBytes
    proof: Proof

    @property
    def nodes(self) -> list[Node]:
        return [Node(*p) for p in self.proof]


class IndexData(msgspec.Struct, tag=9, array_like=True, frozen=True):
    """The reply to an IndexRequest: index blocks root to leaf (maybe a prefix)."""

    channel: Channel
    id: U64
    blocks: Annotated[list[BlockItem], msgspec.Meta(max_length=MAX_INDEX_BLOCKS)]

    def __post_init__(self):
        if sum(len(b.data) for b in self.blocks) > MAX_REPLY_DATA:
            raise ValueError("index reply too large")


class NoData(msgspec.Struct, tag=10, array_like=True, frozen=True):
    """I will not answer request `id` (don't have it, or it was cancelled)."""

    channel: Channel
    id: U64


class Cancel(msgspec.Struct, tag=11, array_like=True, frozen=True):
    """I no longer want request `id`; you answer it with NoData if not yet answered."""

    channel: Channel
    id: U64


Message = Union[Open, Close, Reject, Head, Have, Request, IndexRequest, Data, IndexData, NoData, Cancel]
MESSAGE_TYPES = (Open, Close, Reject, Head, Have, Request, IndexRequest, Data, IndexData, NoData, Cancel)
REPLY_TYPES = (Data, IndexData, NoData)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """One message from a frame payload.  Anything malformed -> ProtocolError."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"peer sent a malformed message: {exc}") from None
