"""LAN discovery, sans-IO (p2pfs/net/discovery/lan_protocol.py): packets,
rate limits and timers on a fake clock, the decoder fuzzed with hypothesis.

The real sockets, interfaces and namespaces are in tests/test_lan.py.
"""

from __future__ import annotations

import ast
import itertools
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire_fuzz import mutate  # the same byte mutations as the wire decoders get

from p2pfs.errors import ProtocolError
from p2pfs.net.discovery import lan_protocol as lp
from p2pfs.net.discovery.lan_protocol import (
    ANNOUNCE,
    ANSWER,
    QUERY,
    Found,
    LanProtocol,
    Packet,
    Send,
    SourceLimiter,
    TokenBucket,
    decode_packet,
    encode_packet,
)

ME = bytes([1]) * 32
PEER = bytes([2]) * 32
DK = [bytes([0x10 + i]) * 32 for i in range(8)]
SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def node(port=None, seed=7):
    p = LanProtocol(ME, rng=random.Random(seed))
    if port is not None:
        p.set_port(port, 0.0)
    return p


def decoded(sends):
    return [decode_packet(s.data) for s in sends]


def query(keys, port=0, key=PEER):
    return encode_packet(Packet(QUERY, key, port, tuple(keys)))


# --------------------------------------------------------------------------
# packets


@pytest.mark.parametrize("kind,port", [(ANNOUNCE, 7640), (QUERY, 0), (QUERY, 1), (ANSWER, 65535)])
@pytest.mark.parametrize("count", [1, 2, lp.MAX_KEYS])
def test_packet_round_trip(kind, port, count):
    packet = Packet(kind, PEER, port, tuple(os.urandom(32) for _ in range(count)))
    data = encode_packet(packet)
    assert len(data) == lp.HEADER_BYTES + 32 * count <= lp.MAX_PACKET
    assert data.startswith(b"p2pfs/lan\x01")
    assert decode_packet(data) == packet


def test_packet_layout_is_fixed():
    data = encode_packet(Packet(ANSWER, PEER, 0x1F90, (DK[0],)))
    assert data == b"p2pfs/lan" + bytes([1, 3]) + PEER + b"\x1f\x90" + b"\x01" + DK[0]


@pytest.mark.parametrize("packet", [
    Packet(4, PEER, 1, (DK[0],)),
    Packet(ANNOUNCE, PEER[:31], 1, (DK[0],)),
    Packet(ANNOUNCE, PEER, 0, (DK[0],)),
    Packet(ANSWER, PEER, 0, (DK[0],)),
    Packet(QUERY, PEER, 65536, (DK[0],)),
    Packet(QUERY, PEER, 0, ()),
    Packet(QUERY, PEER, 0, tuple(os.urandom(32) for _ in range(lp.MAX_KEYS + 1))),
    Packet(QUERY, PEER, 0, (DK[0], DK[0])),
    Packet(QUERY, PEER, 0, (DK[0][:31],)),
])
def test_encoding_our_own_bad_packet_is_a_bug(packet):
    with pytest.raises(ValueError):
        encode_packet(packet)


GOOD = encode_packet(Packet(QUERY, PEER, 0, (DK[0], DK[1])))


def patched(data, pos, value):
    return data[:pos] + bytes([value]) + data[pos + 1:]


@pytest.mark.parametrize("data,message", [
    (b"", "shorter than its header"),
    (GOOD[:lp.HEADER_BYTES - 1], "shorter than its header"),
    (GOOD[:-1], "does not match its 2 keys"),
    (GOOD + b"\x00", "does not match its 2 keys"),
    (GOOD + bytes(lp.MAX_PACKET), "exceeds 1070"),
    (b"P" + GOOD[1:], "bad magic"),
    (patched(GOOD, 9, 0), "version 0"),
    (patched(GOOD, 10, 0), "kind 0"),
    (patched(GOOD, 10, 9), "kind 9"),
    (patched(GOOD, 45, 0)[:lp.HEADER_BYTES], "0 discovery keys"),
    (patched(GOOD, 45, lp.MAX_KEYS + 1), "33 discovery keys"),
    (patched(GOOD, 45, 3), "does not match its 3 keys"),
    (encode_packet(Packet(QUERY, PEER, 0, (DK[0], DK[1])))[:-32] + DK[0], "twice"),
    (patched(encode_packet(Packet(QUERY, PEER, 0, (DK[0],))), 10, ANNOUNCE), "announce with port 0"),
    (patched(encode_packet(Packet(QUERY, PEER, 0, (DK[0],))), 10, ANSWER), "answer with port 0"),
])
def test_decoder_refuses_malformed_packets(data, message):
    with pytest.raises(ProtocolError, match=message):
        decode_packet(data)


def test_later_versions_are_read_as_version_one_and_may_append():
    v2 = patched(GOOD, 9, 2) + b"fields of version 2"
    assert decode_packet(v2) == decode_packet(GOOD)
    with pytest.raises(ProtocolError):
        decode_packet(patched(GOOD, 9, 2)[:-1])  # still needs all its keys


SAMPLES = [encode_packet(Packet(k, PEER, p, tuple(DK[:n]))) for k, p, n in
           [(ANNOUNCE, 7640, 1), (QUERY, 0, 3), (ANSWER, 1, 8), (QUERY, 9, 2)]]


@st.composite
def hostile(draw):
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(st.binary(max_size=lp.MAX_PACKET + 64))
    if choice == 1:
        return lp.MAGIC + draw(st.binary(max_size=lp.MAX_PACKET))
    return mutate(draw(st.sampled_from(SAMPLES)), draw)


@SETTINGS
@given(hostile())
def test_decoder_raises_only_protocol_error(data):
    try:
        packet = decode_packet(data)
    except ProtocolError:
        return
    assert data[9] >= 1
    assert encode_packet(packet) == patched(data, 9, 1)[:lp.HEADER_BYTES + 32 * len(packet.keys)]


@SETTINGS
@given(st.lists(hostile(), max_size=20))
def test_protocol_never_raises_on_hostile_datagrams(datagrams):
    p = node(port=7640)
    for k in DK[:4]:
        p.join(k, announce=True, now=0.0)
    for i, data in enumerate(datagrams):
        for item in p.datagram_received(data, "10.0.0.9", 4000, i * 0.01):
            assert isinstance(item, (Found, Send))
            if isinstance(item, Send):
                assert decode_packet(item.data).kind == ANSWER
    assert p.counters["received"] == len(datagrams) == sum(p.counters[c] for c in (
        "rate_limited", "malformed", "own", "announces_received", "queries_received", "answers_received"))


# --------------------------------------------------------------------------
# rate limits


def test_token_bucket_burst_then_rate():
    bucket = TokenBucket(rate=10, burst=5, now=100.0)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.ready_at(100.0) == pytest.approx(100.1)
    assert not bucket.take(100.05)
    assert bucket.take(100.1)
    assert sum(bucket.take(200.0) for _ in range(50)) == 5  # refilled to the burst, no more


def test_source_limiter_is_per_host_and_bounded():
    limiter = SourceLimiter(rate=1, burst=3, max_sources=100)
    assert [limiter.allow("10.0.0.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("10.0.0.2", 0.0)  # another host is not affected
    for i in range(10_000):
        limiter.allow(f"10.1.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100


def test_a_flood_from_one_source_does_not_stop_answers_to_another():
    p = node(port=7640)
    p.join(DK[0], announce=True, now=0.0)
    flood = [os.urandom(100), query([DK[0]]), GOOD]
    for i in range(30_000):
        p.datagram_received(flood[i % 3], "10.0.0.66", 5000, 1.0 + i * 1e-5)  # 100,000 per s
    assert p.counters["rate_limited"] >= 30_000 - lp.SOURCE_BURST - lp.SOURCE_RATE * 0.3 - 1
    out = p.datagram_received(query([DK[0]], key=bytes([3]) * 32), "10.0.0.7", 6000, 1.3)
    assert [(s.to, decode_packet(s.data).kind) for s in out] == [(("10.0.0.7", 6000), ANSWER)]


def test_answers_are_bounded_by_their_own_budget():
    p = node(port=7640)
    p.join(DK[0], announce=True, now=0.0)
    answers = 0
    for i in range(2_000):  # distinct hosts (as if spoofed), 0.5 s in all
        out = p.datagram_received(query([DK[0]]), f"10.2.{i // 250}.{i % 250}", 5000, 1.0 + i / 4000)
        answers += len(out)
    assert answers <= lp.ANSWER_BURST + lp.ANSWER_RATE * 0.5 + 1
    assert p.counters["answers_dropped"] == 2_000 - answers
    one = node(port=7640)
    one.join(DK[0], announce=True, now=0.0)
    answers = sum(len(one.datagram_received(query([DK[0]]), "10.3.0.1", 5000, i / 50)) for i in range(100))
    assert answers <= lp.HOST_ANSWER_BURST + lp.HOST_ANSWER_RATE * 2 + 1  # one querier, 2 s


# --------------------------------------------------------------------------
# queries and answers


def run_until(p, end, step=0.01, start=0.0):
    """Drive the timers as a driver would (tick at each deadline); return (time, packet) sent."""
    sent, now = [], start
    while now <= end:
        sent += [(now, pkt) for pkt in decoded(p.tick(now))]
        deadline = p.deadline(now)
        assert deadline > now, "a driver would spin"
        now = max(deadline, now + step) if deadline != float("inf") else end + 1
    return sent


def test_a_reader_queries_at_once_then_backs_off_to_the_cap():
    p = node()
    p.join(DK[0], announce=False, now=0.0)
    sent = run_until(p, 600.0)
    times = [t for t, pkt in sent]
    assert all(pkt.kind == QUERY and pkt.keys == (DK[0],) and pkt.port == 0 for _, pkt in sent)
    assert times[0] == 0.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    expected = [min(2.0 ** i, lp.QUERY_MAX) for i in range(len(gaps))]
    for gap, want in zip(gaps, expected):
        assert (1 - lp.JITTER) * want - 0.011 <= gap <= (1 + lp.JITTER) * want + 0.011
    assert len(gaps) >= 10 and gaps[-1] >= (1 - lp.JITTER) * lp.QUERY_MAX - 0.011


def test_an_answer_slows_the_queries_down():
    p = node()
    p.join(DK[0], announce=False, now=0.0)
    assert [pkt.kind for pkt in decoded(p.tick(0.0))] == [QUERY]
    answer = encode_packet(Packet(ANSWER, PEER, 7640, (DK[0],)))
    assert p.datagram_received(answer, "10.77.1.1", 40000, 0.5) == [Found(DK[0], "10.77.1.1", 7640, PEER)]
    assert p.deadline(0.5) >= 0.5 + (1 - lp.JITTER) * lp.QUERY_MAX


def test_queries_batch_topics_and_respect_the_send_budget():
    p = node()
    keys = [os.urandom(32) for _ in range(1000)]
    for k in keys:
        p.join(k, announce=False, now=0.0)
    first = decoded(p.tick(0.0))
    assert len(first) == lp.SEND_BURST
    assert all(len(pkt.keys) == lp.MAX_KEYS for pkt in first)
    assert p.deadline(0.0) == pytest.approx(1 / lp.SEND_RATE)  # waits for the budget, no spin
    sent = run_until(p, 3.0, start=0.01)
    asked = {k for pkt in first for k in pkt.keys} | {k for t, pkt in sent if t < 1.5 for k in pkt.keys}
    assert asked == set(keys)  # every topic asked within 1.5 s
    assert len(sent) <= lp.SEND_RATE * 3 + 1


def test_a_node_answers_queries_for_what_it_serves_only_and_only_when_listening():
    p = node()
    p.join(DK[0], announce=True, now=0.0)
    p.join(DK[1], announce=False, now=0.0)
    q = query([DK[0], DK[1], DK[2]])
    assert p.datagram_received(q, "10.77.1.2", 50000, 0.0) == []  # not listening: nothing to dial
    p.set_port(7640, 0.0)
    out = p.datagram_received(q, "10.77.1.2", 50000, 0.1)
    assert len(out) == 1 and out[0].to == ("10.77.1.2", 50000)
    assert decode_packet(out[0].data) == Packet(ANSWER, ME, 7640, (DK[0],))
    assert len(out[0].data) <= len(q)  # no amplification
    assert p.datagram_received(query([DK[1], DK[2]]), "10.77.1.2", 50000, 0.2) == []
    p.leave(DK[0])
    assert p.datagram_received(q, "10.77.1.2", 50000, 0.3) == []


def test_found_uses_the_datagram_source_and_only_joined_topics():
    p = node()
    p.join(DK[0], announce=False, now=0.0)
    announce = encode_packet(Packet(ANNOUNCE, PEER, 7000, (DK[3], DK[0])))
    assert p.datagram_received(announce, "192.168.5.5", 7641, 1.0) == [Found(DK[0], "192.168.5.5", 7000, PEER)]
    # A querier that listens is a candidate too; one that does not is not.
    assert p.datagram_received(query([DK[0]], port=7002), "192.168.5.6", 1, 1.0) == [
        Found(DK[0], "192.168.5.6", 7002, PEER)]
    assert p.datagram_received(query([DK[0]], port=0), "192.168.5.6", 1, 1.0) == []
    p.leave(DK[0])
    assert p.datagram_received(announce, "192.168.5.5", 7641, 2.0) == []


def test_our_own_packets_are_ignored():
    p = node(port=7640)
    p.join(DK[0], announce=True, now=0.0)
    for pkt in p.tick(0.0):
        assert p.datagram_received(pkt.data, "10.77.1.1", 7641, 0.0) == []
    assert p.counters["own"] >= 2 and p.counters["found"] == 0


# --------------------------------------------------------------------------
# announcements


def test_a_server_announces_at_start_then_every_interval():
    p = node()
    p.join(DK[0], announce=True, now=0.0)
    assert all(pkt.kind == QUERY for pkt in decoded(p.tick(0.0)))  # not listening: no announcement
    p.set_port(7640, 1.0)
    sent = [(t, pkt) for t, pkt in run_until(p, 400.0, start=1.0) if pkt.kind == ANNOUNCE]
    assert sent[0] == (1.0, Packet(ANNOUNCE, ME, 7640, (DK[0],)))
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(sent)]
    assert len(gaps) >= 9
    assert all((1 - lp.JITTER) * lp.ANNOUNCE_INTERVAL - 0.011 <= g <= (1 + lp.JITTER) * lp.ANNOUNCE_INTERVAL + 0.011
               for g in gaps)
    assert len({round(g, 2) for g in gaps}) > 1  # jittered
    p.set_port(None, 401.0)
    assert all(pkt.kind == QUERY for _, pkt in run_until(p, 600.0, start=401.0))


def test_a_newly_served_topic_is_announced_at_once_alone():
    p = node(port=7640)
    p.join(DK[0], announce=True, now=0.0)
    run_until(p, 10.0)
    p.join(DK[1], announce=True, now=10.5)
    assert [pkt for pkt in decoded(p.tick(10.5)) if pkt.kind == ANNOUNCE] == [Packet(ANNOUNCE, ME, 7640, (DK[1],))]


def test_rounds_rotate_through_many_topics():
    p = node()
    keys = sorted(os.urandom(32) for _ in range(300))
    for k in keys:
        p.join(k, announce=True, now=0.0)
    p.set_port(7640, 0.0)
    sent = run_until(p, 100.0)
    rounds: dict[int, list[Packet]] = {}
    fresh = []
    for t, pkt in sent:
        if pkt.kind == ANNOUNCE:
            (fresh if t < 10 else rounds.setdefault(round(t), [])).append(pkt)
    assert {k for pkt in fresh for k in pkt.keys} == set(keys)  # all at start, budget permitting
    assert len(rounds) >= 2
    for packets in rounds.values():
        assert len(packets) <= lp.ANNOUNCE_PACKETS
    first, second = (sorted(rounds)[:2])
    covered = [k for pkt in rounds[first] + rounds[second] for k in pkt.keys]
    assert set(covered) == set(keys)


def test_network_changed_announces_and_queries_again():
    p = node(port=7640)
    p.join(DK[0], announce=True, now=0.0)
    run_until(p, 100.0)
    assert p.deadline(100.0) > 101.0
    p.network_changed(100.0)
    assert sorted(pkt.kind for pkt in decoded(p.tick(100.0))) == [ANNOUNCE, QUERY]


def test_leaving_stops_queries_and_announcements():
    p = node(port=7640)
    p.join(DK[0], announce=True, now=0.0)
    p.join(DK[1], announce=True, now=0.0)
    run_until(p, 5.0)
    p.leave(DK[0])
    later = run_until(p, 300.0, start=5.01)
    assert later and all(DK[0] not in pkt.keys for _, pkt in later)


def test_set_port_and_join_check_their_arguments():
    p = node()
    with pytest.raises(ValueError):
        p.set_port(0, 0.0)
    with pytest.raises(ValueError):
        p.join(b"short", announce=False, now=0.0)
    with pytest.raises(ValueError):
        LanProtocol(b"short")


def test_the_protocol_module_does_no_io():
    tree = ast.parse(Path(lp.__file__).read_text())
    imported = {alias.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert not imported & {"trio", "socket", "time", "asyncio", "select"}
