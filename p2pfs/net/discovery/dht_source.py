"""The Mainline DHT as a discovery source: peers by infohash, heads as BEP 44 items.

Theory of operation
-------------------
A topic (a drive's discovery key) is looked up in the DHT under the
infohash `discovery_key[:20]`, so the DHT never sees a drive key.  Every
joined topic is looked up at once on join, then again after 2, 4, 8 ...
seconds up to every `retry_every` until a lookup finds a peer, then every
`lookup_every`.  A topic
joined with `announce=True` is announced (our TCP port; nothing while the
port is unknown) when the port becomes known and every `announce_every`
(15 minutes); an announce is a lookup too.  Every peer found is emitted as
`Candidate(host, port, "dht")`.  At most `parallel` lookups run at once.

A drive's latest signed head travels as a BEP 44 mutable item under the
drive's *blinded key* (`crypto.blinded_key`: derived from the drive key by
anyone who knows it, and not giving it away, so the DHT never sees a drive
key) with salt `b"p2pfs"`: seq = the head's log length, value = the
104-byte string `u64le length || root (32) || head signature (64)`.  The
item's BEP 44 signature is the owner's, made with the drive's secret
(`head_dht_signature`), so a seeder that learned it re-puts the item
unchanged.  A reader accepts an item only if its BEP 44 signature
verifies, its seq equals the length inside the value and our head
signature inside verifies; the lookup keeps the highest seq, and
`get_head` never returns an older head than one it returned before, so a
replayed old item never wins.  Heads given to `put_head` are put again
every `reput_every` (an hour; BEP 44 items expire after two) until the
topic is left.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

import trio

from ... import crypto
from ...errors import VerificationError
from . import Candidate, Emit
from .dht.items import MutableItem
from .dht.node import DhtNode

HEAD_SALT = crypto.DHT_HEAD_SALT
HEAD_BYTES = crypto.DHT_HEAD_BYTES
LOOKUP_EVERY = 5 * 60.0
RETRY_EVERY = 30.0
RETRY_FIRST = 2.0
ANNOUNCE_EVERY = 15 * 60.0
REPUT_EVERY = 60 * 60.0
PARALLEL = 4
MAX_REMEMBERED_HEADS = 4096


def info_hash(discovery_key: bytes) -> bytes:
    """The DHT infohash of a topic: the first 20 bytes of its discovery key."""
    return discovery_key[:20]


def head_value(length: int, root: bytes, signature: bytes) -> bytes:
    """The BEP 44 value (bencoded) carrying a signed head."""
    return crypto.dht_head_value(length, root, signature)


def head_dht_signature(seed: bytes, length: int, root: bytes, signature: bytes) -> bytes:
    """The owner's BEP 44 signature of the head item (made with the drive's secret seed)."""
    return crypto.sign_dht_head(seed, length, root, signature)


def parse_head_item(drive_key: bytes, item: MutableItem) -> tuple[int, bytes, bytes] | None:
    """(length, root, head signature) if `item` is a valid head of the drive, else None."""
    prefix = b"%d:" % HEAD_BYTES
    if item.key != crypto.blinded_key(drive_key) or item.salt != HEAD_SALT or len(item.value) != len(prefix) + HEAD_BYTES \
            or not item.value.startswith(prefix):
        return None
    raw = item.value[len(prefix):]
    length, root, signature = struct.unpack("<Q", raw[:8])[0], raw[8:40], raw[40:]
    if length != item.seq:
        return None
    try:
        item.verify()
        crypto.verify_head(drive_key, length, root, signature)
    except (VerificationError, ValueError):
        return None
    return length, root, signature


@dataclass(slots=True)
class _Topic:
    announce: bool
    next_lookup: float = float("-inf")
    next_announce: float = float("-inf")
    found: bool = False
    busy: bool = False
    retry: float = RETRY_FIRST


class DhtSource:
    """`Source` and `HeadSource` over a `DhtNode` (which `run` runs)."""

    name = "dht"

    def __init__(self, node: DhtNode, *, lookup_every: float = LOOKUP_EVERY, retry_every: float = RETRY_EVERY,
                 announce_every: float = ANNOUNCE_EVERY, reput_every: float = REPUT_EVERY,
                 parallel: int = PARALLEL):
        self.node = node
        self.lookup_every, self.retry_every = lookup_every, retry_every
        self.announce_every, self.reput_every = announce_every, reput_every
        self._limiter = trio.CapacityLimiter(parallel)
        self._topics: dict[bytes, _Topic] = {}
        self._port: int | None = None
        self._wake = trio.Event()
        self._heads: dict[bytes, tuple[MutableItem, float]] = {}   # drive key -> (item, next put)
        self._best: OrderedDict[bytes, MutableItem] = OrderedDict()  # newest head item seen per drive
        self.lookups = 0
        self.announces = 0
        self.found = 0

    # --- Source ---------------------------------------------------------------------------

    def join(self, discovery_key: bytes, *, announce: bool) -> None:
        topic = self._topics.get(discovery_key)
        if topic is None:
            self._topics[discovery_key] = _Topic(announce)
        elif announce and not topic.announce:
            topic.announce, topic.next_announce = True, float("-inf")
        self._wake.set()

    def leave(self, discovery_key: bytes) -> None:
        self._topics.pop(discovery_key, None)
        for key in [k for k in self._heads if crypto.discovery_key(k) == discovery_key]:
            del self._heads[key]

    def set_port(self, port: int | None) -> None:
        if port != self._port:
            self._port = port
            for topic in self._topics.values():
                topic.next_announce = float("-inf")
            self._wake.set()

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.node.run)
            task_status.started()
            while True:
                now = trio.current_time()
                wake_at = now + self.lookup_every
                for key, topic in list(self._topics.items()):
                    if not topic.busy:
                        due = self._due(topic)
                        if due <= now:
                            topic.busy = True
                            nursery.start_soon(self._work, key, topic, emit)
                        else:
                            wake_at = min(wake_at, due)
                for drive_key, (item, when) in list(self._heads.items()):
                    if crypto.discovery_key(drive_key) not in self._topics:
                        continue  # put again only while the drive is joined
                    if when <= now:
                        self._heads[drive_key] = (item, now + self.reput_every)
                        nursery.start_soon(self.node.put_mutable, item)
                    else:
                        wake_at = min(wake_at, when)
                self._wake = trio.Event()
                with trio.move_on_at(wake_at):
                    await self._wake.wait()

    @property
    def active(self) -> bool:
        """It has nodes to ask, or bootstrap nodes to try."""
        return self.node.has_contacts

    def status(self) -> dict:
        return {**self.node.status(), "topics": len(self._topics), "lookups": self.lookups,
                "announces": self.announces, "peers_found": self.found}

    def _due(self, topic: _Topic) -> float:
        if topic.announce and self._port is not None:
            return min(topic.next_lookup, topic.next_announce)
        return topic.next_lookup

    async def _work(self, key: bytes, topic: _Topic, emit: Emit) -> None:
        try:
            async with self._limiter:
                now = trio.current_time()
                if topic.announce and self._port is not None and topic.next_announce <= now:
                    result = await self.node.announce(info_hash(key), self._port)
                    peers = result.peers
                    self.announces += 1
                    topic.next_announce = trio.current_time() + self.announce_every
                else:
                    peers = await self.node.get_peers(info_hash(key))
                self.lookups += 1
            if self._topics.get(key) is not topic:
                return  # left meanwhile
            for host, port in peers:
                emit(key, Candidate(host, port, self.name))
            self.found += len(peers)
            topic.found = topic.found or bool(peers)
            if topic.found:
                wait = self.lookup_every
            else:
                wait = min(topic.retry, self.retry_every)
                topic.retry *= 2
            topic.next_lookup = trio.current_time() + wait
        finally:
            topic.busy = False
            self._wake.set()

    # --- HeadSource -----------------------------------------------------------------------

    async def get_head(self, drive_key: bytes) -> tuple[int, bytes, bytes, bytes] | None:
        item = await self.node.get_mutable(crypto.blinded_key(drive_key), HEAD_SALT,
                                           accept=lambda found: parse_head_item(drive_key, found) is not None)
        best = self._best.get(drive_key)
        if item is not None and (best is None or item.seq > best.seq):
            best = item
            self._best[drive_key] = item
            self._best.move_to_end(drive_key)
            while len(self._best) > MAX_REMEMBERED_HEADS:
                self._best.popitem(last=False)
        if best is None:
            return None
        length, root, signature = parse_head_item(drive_key, best)
        return length, root, signature, best.signature

    async def put_head(self, drive_key: bytes, length: int, root: bytes, signature: bytes,
                       dht_signature: bytes) -> int:
        """Put the owner's signed head; VerificationError if either signature is wrong."""
        item = MutableItem(crypto.blinded_key(drive_key), HEAD_SALT, length,
                           head_value(length, root, signature), dht_signature)
        if parse_head_item(drive_key, item) is None:
            raise VerificationError(f"the head of length {length} of drive {crypto.encode_key(drive_key)} "
                                    "does not verify as its DHT item (head or DHT signature is wrong)")
        held = self._heads.get(drive_key)
        if held is None or held[0].seq <= length:
            self._heads[drive_key] = (item, trio.current_time() + self.reput_every)
            self._wake.set()
        return await self.node.put_mutable(item)
