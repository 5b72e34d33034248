"""RPC bookkeeping: transactions and timeouts, the DoS blocker, the rate limit, write tokens."""

from __future__ import annotations

import itertools
import random

import pytest

from p2pfs.net.discovery.dht.rpc import DosBlocker, RateLimit, Tokens, Transactions

A = ("127.0.0.2", 5000)
B = ("127.0.0.3", 5000)


def counter_bytes():
    counter = itertools.count()
    return lambda n: next(counter).to_bytes(n, "big")


def test_transactions_match_only_from_the_address_asked():
    tx = Transactions(timeout=3.0)
    p = tx.new(A, None, "ping", 10.0)
    assert len(p.tid) == 2 and p.deadline == 13.0
    assert tx.match(p.tid, B) is None          # a third party cannot answer for A
    assert tx.match(b"zz", A) is None
    assert tx.match(p.tid, A) is p
    assert tx.match(p.tid, A) is None          # answered once
    assert len(tx) == 0


def test_transaction_ids_are_unique_while_pending():
    same_first = iter([b"\x00\x01", b"\x00\x01", b"\x00\x01", b"\x00\x02"])
    tx = Transactions(randbytes=lambda n: next(same_first))
    first = tx.new(A, None, "ping", 0.0)
    second = tx.new(A, None, "ping", 0.0)
    assert first.tid != second.tid


def test_expiry_and_bound():
    tx = Transactions(timeout=2.0, max_pending=3, randbytes=counter_bytes())
    ps = [tx.new(A, None, "ping", float(i)) for i in range(3)]
    assert tx.full()
    with pytest.raises(RuntimeError):
        tx.new(A, None, "ping", 0.0)
    assert tx.expired(2.5) == ps[:1]
    assert tx.expired(2.5) == []
    assert tx.expired(10.0) == ps[1:]
    assert not tx.full() and len(tx) == 0


def test_dos_blocker_blocks_a_flooder_for_a_while():
    dos = DosBlocker(rate=5, window=10, block_for=300, slots=4)
    allowed = sum(dos.allow("198.51.100.66", t * 0.01) for t in range(1000))  # 100 datagrams a second
    assert allowed == 49
    assert not dos.allow("198.51.100.66", 299.0)
    assert dos.blocked(299.0) == ["198.51.100.66"]
    assert dos.allow("192.0.2.11", 1.0)           # others pass meanwhile
    assert dos.allow("198.51.100.66", 311.0)         # the block ended
    assert dos.blocked(311.0) == []


def test_dos_blocker_lets_a_steady_source_through():
    dos = DosBlocker(rate=5, window=10, block_for=300)
    assert all(dos.allow("192.0.2.11", t * 0.25) for t in range(4000))  # 4 a second, for 1000 s


def test_dos_blocker_memory_is_constant_and_keeps_the_flooder():
    dos = DosBlocker(rate=5, window=10, block_for=300, slots=8)
    for t in range(60):
        dos.allow("198.51.100.66", t * 0.01)
    r = random.Random(1)
    for i in range(10000):  # many one-off sources: they take the least active slots
        dos.allow(f"10.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(256)}", 1.0 + i * 1e-4)
    assert len(dos._index) == 8 and len(dos._slots) == 8
    assert not dos.allow("198.51.100.66", 2.0)


def test_rate_limit():
    limit = RateLimit(rate=10, burst=5)
    assert sum(limit.allow(0.0) for _ in range(20)) == 5
    assert sum(limit.allow(1.0) for _ in range(20)) == 5   # refilled to the burst, no more
    assert sum(limit.allow(1.1) for _ in range(20)) == 1


def test_tokens_rotate_and_are_bound_to_the_ip():
    tokens = Tokens(0.0, rotate_every=300.0)
    token = tokens.make("192.0.2.34", 10.0)
    assert tokens.check(token, "192.0.2.34", 10.0)
    assert not tokens.check(token, "192.0.2.35", 10.0)        # another IP
    assert not tokens.check(token[:-1] + bytes([token[-1] ^ 1]), "192.0.2.34", 10.0)
    assert tokens.check(token, "192.0.2.34", 310.0)           # previous secret: still good
    assert tokens.make("192.0.2.34", 310.0) != token          # a new secret makes new tokens
    assert not tokens.check(token, "192.0.2.34", 610.0)       # two rotations later: gone
    fresh = tokens.make("192.0.2.34", 610.0)
    assert not tokens.check(fresh, "192.0.2.34", 1300.0)      # after a long silence both secrets go
