"""What this node stores for others: announced peers and BEP 44 items.

Theory of operation
-------------------
`PeerStore` maps an infohash to the peers that announced it, each with
the time it expires (`PEER_TTL` after its last announce).  It is bounded
three ways: peers per infohash (the oldest announce makes room), infohashes
(the least recently announced goes) and peers in all.  `get` returns a
bounded random sample, so a reply always fits a datagram.

`ItemStore` holds BEP 44 items by target, each expiring `ITEM_TTL` after
its last put.  A mutable put must verify (signature, limits), must not
lower the sequence number, may not keep the seq while changing the value,
and honours `cas`; a rejected put returns BEP 44's error code.  At most
`max_items` items are kept (the least recently put goes).

Pure: every method takes the time as `now`.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

from .items import MutableItem, immutable_target
from .krpc import CAS_MISMATCH, INVALID_SIGNATURE, MAX_VALUE, SEQ_TOO_OLD, VALUE_TOO_BIG, Address

PEER_TTL = 30 * 60.0
ITEM_TTL = 2 * 3600.0
MAX_PEERS_PER_INFOHASH = 128
MAX_INFOHASHES = 2000
MAX_PEERS = 20000
MAX_ITEMS = 1000
PEERS_PER_REPLY = 50  # 50 compact peers: 400 bytes of a reply


class PeerStore:
    def __init__(self, *, max_per_infohash: int = MAX_PEERS_PER_INFOHASH,
                 max_infohashes: int = MAX_INFOHASHES, max_peers: int = MAX_PEERS, ttl: float = PEER_TTL):
        self.max_per_infohash = max_per_infohash
        self.max_infohashes = max_infohashes
        self.max_peers = max_peers
        self.ttl = ttl
        # infohash -> peer -> expiry, both least recently announced first
        self._swarms: OrderedDict[bytes, OrderedDict[Address, float]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def infohashes(self) -> int:
        return len(self._swarms)

    def announce(self, info_hash: bytes, peer: Address, now: float) -> None:
        swarm = self._swarms.get(info_hash)
        if swarm is None:
            if len(self._swarms) >= self.max_infohashes:
                self._drop_swarm(next(iter(self._swarms)))
            swarm = self._swarms[info_hash] = OrderedDict()
        else:
            self._swarms.move_to_end(info_hash)
        if peer in swarm:
            del swarm[peer]
            self._count -= 1
        elif len(swarm) >= self.max_per_infohash:
            swarm.popitem(last=False)
            self._count -= 1
        while self._count >= self.max_peers:
            oldest = next(iter(self._swarms))
            if oldest == info_hash and len(self._swarms) == 1:
                break
            self._drop_swarm(oldest)
        swarm[peer] = now + self.ttl
        self._count += 1

    def get(self, info_hash: bytes, now: float, limit: int = PEERS_PER_REPLY,
            rng: random.Random | None = None) -> list[Address]:
        swarm = self._swarms.get(info_hash)
        if not swarm:
            return []
        live = [p for p, expiry in swarm.items() if expiry > now]
        if len(live) <= limit:
            return live
        return (rng or random).sample(live, limit)

    def expire(self, now: float) -> None:
        for info_hash in list(self._swarms):
            swarm = self._swarms[info_hash]
            for peer in [p for p, expiry in swarm.items() if expiry <= now]:
                del swarm[peer]
                self._count -= 1
            if not swarm:
                del self._swarms[info_hash]

    def _drop_swarm(self, info_hash: bytes) -> None:
        self._count -= len(self._swarms.pop(info_hash))


@dataclass(slots=True)
class Stored:
    value: bytes                   # bencoded
    item: MutableItem | None       # None for an immutable item
    expires: float


class ItemStore:
    def __init__(self, *, max_items: int = MAX_ITEMS, ttl: float = ITEM_TTL):
        self.max_items = max_items
        self.ttl = ttl
        self._items: OrderedDict[bytes, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, target: bytes, now: float) -> Stored | None:
        s = self._items.get(target)
        if s is None or s.expires <= now:
            return None
        return s

    def put_mutable(self, item: MutableItem, now: float, cas: int | None = None) -> int | None:
        """Store a mutable item; None if stored, else the BEP 44 error code."""
        if len(item.value) > MAX_VALUE:
            return VALUE_TOO_BIG
        current = self.get(item.target, now)
        if current is not None and current.item is not None:
            if cas is not None and cas != current.item.seq:
                return CAS_MISMATCH
            if item.seq < current.item.seq:
                return SEQ_TOO_OLD
            if item.seq == current.item.seq:
                if item.value != current.value:
                    return SEQ_TOO_OLD  # same seq, other value: refuse (BEP 44 "lower than or equal")
                self._keep(item.target, current, now)
                return None
        if not item.is_valid():
            return INVALID_SIGNATURE
        self._keep(item.target, Stored(item.value, item, 0.0), now)
        return None

    def put_immutable(self, value: bytes, now: float) -> int | None:
        if len(value) > MAX_VALUE:
            return VALUE_TOO_BIG
        target = immutable_target(value)
        self._keep(target, self._items.get(target) or Stored(value, None, 0.0), now)
        return None

    def expire(self, now: float) -> None:
        for target in [t for t, s in self._items.items() if s.expires <= now]:
            del self._items[target]

    def _keep(self, target: bytes, stored: Stored, now: float) -> None:
        stored.expires = now + self.ttl
        self._items[target] = stored
        self._items.move_to_end(target)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
