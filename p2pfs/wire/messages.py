"""Wire messages of protocol version 2: frozen, tagged, array-like msgspec structs (MessagePack).

Each message is encoded as a MessagePack array whose first element is a
small integer tag, followed by the fields in the order declared here.
Schema evolution: fields are only ever appended, always with a default, so
an older decoder's extra-field tolerance and a newer decoder's defaults
keep both sides talking.  Tags are never reused within a protocol version
(version 2 reshaped Request, Data, IndexRequest and IndexData; a version
is agreed in the handshake, see `negotiation`).

Every field carries its value limit (`msgspec.Meta`) and is validated
while decoding; cross-field rules (a run's blocks and leaves agree, a
reply's bytes stay within `MAX_RUN_DATA`) are checked in `__post_init__`.
`decode` turns every failure into `ProtocolError`; it is the only door
through which peer bytes become objects.  Block bytes decode as
memoryviews into the decrypted frame (no copy); they keep that frame alive.

`channel` is always the *sender's* local channel id (see `connection`);
request ids are chosen by the requester and unique per connection and
direction while the request is outstanding.

Sizes.  One reply carries a run of at most `MAX_RUN_DATA` (1 MiB) of
block data in one message, not a header and a frame per block: measured
(bench/bench_wire.py), 16 blocks of 64 KiB per message cost about 6 us per
block above the cipher to send (mostly the one copy of the block into the
frame) and 4 us to receive, against 10 and 16 us for one block per
message; per-block frames would add a decrypt call and an event per block
and save nothing, and 4 MiB messages were slower again (cache misses),
while every connection may make its peer buffer one largest frame.
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

MAX_RUN_DATA = 1 << 20         # block bytes in one reply (Data or IndexData)
MAX_BLOCK_DATA = MAX_RUN_DATA  # one block; drives with larger blocks cannot be served
MAX_RUN_BLOCKS = 256           # blocks in one run or reply (1 MiB of 4 KiB blocks)
MAX_PROOF_NODES = 192          # one run's proof: 181 is the most any run of a log below 2^62 needs
MAX_REPLY_PROOF_NODES = 2 * MAX_PROOF_NODES   # all runs of one IndexData
MAX_INDEX_RUNS = 16            # runs in one IndexData
MAX_CONTENT_BYTES = MAX_RUN_DATA  # IndexRequest.content_bytes
MAX_PATH_BYTES = 4096
MAX_HAVE_RANGES = 4096
# The largest encoded message (a full Data or IndexData with its leaves,
# proof and MessagePack overhead) fits in this; frames.MAX_FRAME adds the tag.
MAX_MESSAGE = MAX_RUN_DATA + (64 << 10)

ProofNode = tuple[U64, Key32, U64]  # (flat-tree index, BLAKE3 hash, bytes covered)
Proof = Annotated[list[ProofNode], msgspec.Meta(max_length=MAX_PROOF_NODES)]
Leaf = tuple[Key32, U64]            # (BLAKE3 hash of the block's leaf, block size)
BlockBytes = Annotated[memoryview, msgspec.Meta(max_length=MAX_BLOCK_DATA)]
Blocks = Annotated[list[BlockBytes], msgspec.Meta(min_length=1, max_length=MAX_RUN_BLOCKS)]
Leaves = Annotated[list[Leaf], msgspec.Meta(min_length=1, max_length=MAX_RUN_BLOCKS)]


def _check_run(blocks: list, leaves: list) -> int:
    """A run's blocks and leaves agree; returns its bytes."""
    if len(leaves) != len(blocks):
        raise ValueError("a run needs one leaf per block")
    total = sum(map(len, blocks))
    if total > MAX_RUN_DATA:
        raise ValueError("run too large")
    return total


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
    """My latest signed head of the channel's drive.

    `dht_signature` (empty or 64 bytes) is the owner's BEP 44 signature of
    the same head, relayed so that any node can re-put it in the DHT."""

    channel: Channel
    length: U64
    root: Key32
    signature: Signature
    dht_signature: Annotated[bytes, msgspec.Meta(max_length=64)] = b""

    def __post_init__(self):
        if len(self.dht_signature) not in (0, 64):
            raise ValueError("a DHT signature is 64 bytes")


class Have(msgspec.Struct, tag=5, array_like=True, frozen=True):
    """Block ranges I hold, ``[start, end)`` pairs; they add to earlier Haves."""

    channel: Channel
    ranges: Annotated[list[tuple[U64, U64]], msgspec.Meta(max_length=MAX_HAVE_RANGES)]

    def __post_init__(self):
        for start, end in self.ranges:
            if start >= end:
                raise ValueError("empty or reversed range")


class Request(msgspec.Struct, tag=6, array_like=True, frozen=True):
    """Send blocks ``[start, start+count)`` of the signed version of `length`
    blocks, with the proof nodes `nodes` (flat-tree indices, ascending:
    what `tree.range_proof_request` says I lack)."""

    channel: Channel
    id: U64
    start: U64
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_RUN_BLOCKS)]
    length: U64
    nodes: Annotated[list[U64], msgspec.Meta(max_length=MAX_PROOF_NODES)]

    def __post_init__(self):
        if self.start + self.count > self.length:
            raise ValueError("blocks past the version length")
        nodes = self.nodes
        if any(a >= b for a, b in zip(nodes, nodes[1:])) or (nodes and nodes[-1] >= 2 * self.length):
            raise ValueError("proof nodes not ascending, or outside the version")


class IndexRequest(msgspec.Struct, tag=7, array_like=True, frozen=True):
    """Send what a lookup of `path` in version `length` reads (0: your newest
    version; you send its Head on the channel first), and, if `path` is a
    file, its first content blocks up to `content_bytes` bytes."""

    channel: Channel
    id: U64
    path: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_PATH_BYTES)]
    length: U64
    content_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_CONTENT_BYTES)] = 0


class Data(msgspec.Struct, tag=8, array_like=True, frozen=True):
    """The run a Request asked for: its blocks, one leaf per block, the
    requested proof nodes."""

    channel: Channel
    id: U64
    start: U64
    blocks: Blocks
    leaves: Leaves
    proof: Proof

    def __post_init__(self):
        _check_run(self.blocks, self.leaves)

    @property
    def nodes(self) -> list[Node]:
        return [Node(*p) for p in self.proof]


class Run(msgspec.Struct, array_like=True, frozen=True):
    """One run inside an IndexData reply (untagged); its proof leaves out
    what the runs before it prove (`tree.plan_runs`)."""

    start: U64
    blocks: Blocks
    leaves: Leaves
    proof: Proof

    @property
    def nodes(self) -> list[Node]:
        return [Node(*p) for p in self.proof]


class IndexData(msgspec.Struct, tag=9, array_like=True, frozen=True):
    """The reply to an IndexRequest, for version `length`: runs holding block 0,
    the commit (block length-1), the index blocks the lookup visits root to
    leaf and the file's first content blocks (a prefix if they do not fit)."""

    channel: Channel
    id: U64
    length: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    runs: Annotated[list[Run], msgspec.Meta(min_length=1, max_length=MAX_INDEX_RUNS)]

    def __post_init__(self):
        blocks = data = proof = 0
        for run in self.runs:
            data += _check_run(run.blocks, run.leaves)
            blocks += len(run.blocks)
            proof += len(run.proof)
            if run.start + len(run.blocks) > self.length:
                raise ValueError("run past the version length")
        if data > MAX_RUN_DATA or blocks > MAX_RUN_BLOCKS or proof > MAX_REPLY_PROOF_NODES:
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
REQUEST_TYPES = (Request, IndexRequest)
REPLY_TYPES = (Data, IndexData, NoData)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def encode_into(message: Message, buf: bytearray, offset: int) -> None:
    """Encode `message` into `buf` from `offset` on (`buf` ends with it)."""
    _encoder.encode_into(message, buf, offset)


# Encoded bytes, at most, of one block's bin header, one leaf, one proof
# node and everything else of a Data or Run (msgpack's widest headers).
_BLOCK_HEAD, _LEAF, _PROOF_NODE, _REST = 5, 44, 53, 64


def size_hint(message: Message) -> int:
    """Bytes to reserve for `message` encoded: an upper bound for Data and
    IndexData (so a frame of blocks is allocated once, never grown and
    copied), a small guess for the rest (they grow as needed)."""
    if isinstance(message, Data):
        runs = (message,)
    elif isinstance(message, IndexData):
        runs = message.runs
    else:
        return _REST
    size = _REST
    for run in runs:
        size += (_REST + sum(map(len, run.blocks)) + _BLOCK_HEAD * len(run.blocks)
                 + _LEAF * len(run.leaves) + _PROOF_NODE * len(run.proof))
    return size


def decode(data) -> Message:
    """One message from a frame's plaintext (bytes).  Anything malformed -> ProtocolError."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"peer sent a malformed message: {exc}") from None
