"""RPC bookkeeping: transactions and timeouts, rate limits, the DoS blocker, write tokens.

Theory of operation
-------------------
* `Transactions` hands out transaction ids for our queries (random, two
  bytes as most nodes use, unique among those outstanding) and matches a
  reply only if it comes from the address the query went to; at most
  `max_pending` queries are outstanding, and each has a deadline.
* `DosBlocker` is in front of everything (libtorrent's dos_blocker): it
  counts datagrams per source IP in windows of `window` seconds; a source
  that sends `rate * window` datagrams within one window is ignored until
  `block_for` seconds after that.  It tracks a fixed number of sources, so
  its memory is constant however many sources there are; the least active
  slot is reused.
* `RateLimit` is a token bucket, here the cap on how many queries per
  second this node answers in all (each answer is a datagram we send, so
  forged source addresses cannot make us flood a victim beyond it).
* `Tokens` makes and checks BEP 5 write tokens: a keyed hash of the asker's
  IP under a secret that rotates every `rotate_every` seconds; the current
  and the previous secret are accepted, so a token lives 5 to 10 minutes.

Pure: every method takes the time as `now`; randomness comes from a
`randbytes` callable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from .node_id import RandBytes

TRANSACTION_BYTES = 2
QUERY_TIMEOUT = 3.0
MAX_PENDING = 512
TOKEN_BYTES = 8
TOKEN_ROTATE = 5 * 60.0


@dataclass(slots=True)
class Pending:
    tid: bytes
    address: tuple[str, int]
    node_id: bytes | None   # the ID we expect to answer, if known
    kind: str               # query method name, for counters
    sent: float
    deadline: float


class Transactions:
    """Our outstanding queries."""

    def __init__(self, *, timeout: float = QUERY_TIMEOUT, max_pending: int = MAX_PENDING,
                 randbytes: RandBytes = os.urandom):
        self.timeout = timeout
        self.max_pending = max_pending
        self._randbytes = randbytes
        self._pending: dict[bytes, Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def full(self) -> bool:
        return len(self._pending) >= self.max_pending

    def new(self, address: tuple[str, int], node_id: bytes | None, kind: str, now: float) -> Pending:
        """Register a query about to be sent.  The caller checks `full()` first."""
        if self.full():
            raise RuntimeError("too many queries outstanding")
        while True:
            tid = self._randbytes(TRANSACTION_BYTES)
            if tid not in self._pending:
                break
        p = Pending(tid, address, node_id, kind, now, now + self.timeout)
        self._pending[tid] = p
        return p

    def match(self, tid: bytes, address: tuple[str, int]) -> Pending | None:
        """The query a reply (or error) from `address` answers, removed; None if it answers none."""
        p = self._pending.get(tid)
        if p is None or p.address != address:
            return None
        del self._pending[tid]
        return p

    def cancel(self, tid: bytes) -> Pending | None:
        return self._pending.pop(tid, None)

    def expired(self, now: float) -> list[Pending]:
        """Queries past their deadline, removed."""
        late = [p for p in self._pending.values() if p.deadline <= now]
        for p in late:
            del self._pending[p.tid]
        return late


@dataclass(slots=True)
class _Slot:
    source: str | None = None
    count: int = 0
    until: float = float("-inf")   # end of the counting window, or of the block
    blocked: bool = False


class DosBlocker:
    """Ignore a source that sends more than `rate` datagrams per second (over `window`) for `block_for`."""

    def __init__(self, *, rate: float = 5.0, window: float = 10.0, block_for: float = 300.0,
                 slots: int = 20):
        self.limit = max(1, int(rate * window))
        self.window = window
        self.block_for = block_for
        self._slots = [_Slot() for _ in range(slots)]
        self._index: dict[str, _Slot] = {}

    def allow(self, source: str, now: float) -> bool:
        slot = self._index.get(source)
        if slot is None:
            slot = min(self._slots, key=lambda s: (s.blocked and s.until > now, s.count, s.until))
            if slot.source is not None:
                del self._index[slot.source]
            slot.source, slot.count, slot.until, slot.blocked = source, 1, now + self.window, False
            self._index[source] = slot
            return True
        if slot.blocked:
            if now < slot.until:
                return False
            slot.blocked, slot.count, slot.until = False, 0, now + self.window
        if now >= slot.until:
            slot.count, slot.until = 0, now + self.window
        slot.count += 1
        if slot.count >= self.limit:
            slot.blocked, slot.until = True, now + self.block_for
            return False
        return True

    def blocked(self, now: float) -> list[str]:
        return [s.source for s in self._slots if s.blocked and s.until > now and s.source]


class RateLimit:
    """A token bucket: `rate` events per second, bursts of `burst`."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self._level, self._at = burst, None

    def allow(self, now: float) -> bool:
        if self._at is not None:
            self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        if self._level >= 1.0:
            self._level -= 1.0
            return True
        return False


class Tokens:
    """BEP 5 write tokens bound to the asker's IP, under rotating secrets."""

    def __init__(self, now: float, *, rotate_every: float = TOKEN_ROTATE, randbytes: RandBytes = os.urandom):
        self.rotate_every = rotate_every
        self._randbytes = randbytes
        self._current = randbytes(32)
        self._previous = randbytes(32)
        self._rotated = now

    def _rotate(self, now: float) -> None:
        if now - self._rotated >= 2 * self.rotate_every:  # both secrets are stale
            self._previous, self._current = self._randbytes(32), self._randbytes(32)
            self._rotated = now
        elif now - self._rotated >= self.rotate_every:
            self._previous, self._current = self._current, self._randbytes(32)
            self._rotated += self.rotate_every

    @staticmethod
    def _token(secret: bytes, host: str) -> bytes:
        return hashlib.blake2b(host.encode(), key=secret, digest_size=TOKEN_BYTES).digest()

    def make(self, host: str, now: float) -> bytes:
        self._rotate(now)
        return self._token(self._current, host)

    def check(self, token: bytes, host: str, now: float) -> bool:
        self._rotate(now)
        return any(hmac.compare_digest(token, self._token(s, host)) for s in (self._current, self._previous))
