"""KRPC codec (sans-IO), BEP 42 node IDs and BEP 44 signatures, with the BEPs' own vectors."""

from __future__ import annotations

import bencode2
import pytest
from hypothesis import given, settings, strategies as st

from p2pfs import crypto
from p2pfs.errors import ProtocolError, VerificationError
from p2pfs.net.discovery.dht import krpc
from p2pfs.net.discovery.dht.items import MutableItem, immutable_target, mutable_target, sign_item
from p2pfs.net.discovery.dht.node_id import (ExternalIpVote, crc32c, distance, generate_id, is_local,
                                             verify_id)

ID = bytes(range(20))
OTHER = bytes(range(20, 40))
T = b"aa"


# --- BEP 42 ------------------------------------------------------------------------------

BEP42_VECTORS = [  # (IP, rand, example node ID) from BEP 42
    ("124.31.75.21", 1, "5fbfbff10c5d6a4ec8a88e4c6ab4c28b95eee401"),
    ("21.75.31.124", 86, "5a3ce9c14e7a08645677bbd1cfe7d8f956d53256"),
    ("65.23.51.170", 22, "a5d43220bc8f112a3d426c84764f8c2a1150e616"),
    ("84.124.73.14", 65, "1b0321dd1bb1fe518101ceef99462b947a01ff41"),
    ("43.213.53.83", 90, "e56f6cbf5b7c4be0237986d5243b87aa6d51305a"),
]


@pytest.mark.parametrize("ip,rand,example", BEP42_VECTORS)
def test_bep42_vectors(ip, rand, example):
    node_id = bytes.fromhex(example)
    assert verify_id(node_id, ip)
    made = generate_id(ip, lambda n: bytes(19) + bytes([rand]))
    assert made[:2] == node_id[:2] and made[2] & 0xF8 == node_id[2] & 0xF8 and made[19] == rand
    # one bit off in the 21-bit prefix, or another IP, fails
    assert not verify_id(bytes([node_id[0] ^ 0x01]) + node_id[1:], ip)
    assert not verify_id(bytes([node_id[0], node_id[1], node_id[2] ^ 0x08]) + node_id[3:], ip)
    assert not verify_id(node_id, "198.51.100.88")


def test_bep42_local_addresses_are_exempt():
    for host in ("127.0.0.1", "10.1.2.3", "192.168.0.9", "172.16.5.5", "169.254.1.1"):
        assert is_local(host) and verify_id(bytes(20), host)
    assert not is_local("198.51.100.7")


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_generated_ids_verify_for_random_ips():
    import random
    rng = random.Random(7)
    for _ in range(200):
        ip = ".".join(str(rng.randrange(1, 224)) for _ in range(4))
        assert verify_id(generate_id(ip), ip)


def test_external_ip_vote_needs_distinct_sources():
    vote = ExternalIpVote(votes_needed=3)
    assert vote.add("192.0.2.11", "192.0.2.99") is None
    assert vote.add("192.0.2.11", "192.0.2.99") is None  # the same voter again counts once
    assert vote.add("192.0.2.22", "192.0.2.99") is None
    assert vote.add("192.0.2.33", "198.51.100.66") is None
    assert vote.add("192.0.2.44", "192.0.2.99") == "192.0.2.99"
    assert vote.add("192.0.2.55", "192.0.2.99") is None  # already known
    assert vote.address == "192.0.2.99"


def test_external_ip_vote_memory_is_bounded():
    vote = ExternalIpVote(votes_needed=3, max_voters=8)
    for i in range(1000):
        vote.add(f"10.0.{i // 256}.{i % 256}", f"198.18.{i // 256}.{i % 256}")
    assert len(vote._votes) == 8


def test_distance():
    assert distance(ID, ID) == 0
    assert distance(bytes(20), b"\x80" + bytes(19)) == 1 << 159


# --- BEP 44 ------------------------------------------------------------------------------

BEP44_KEY = bytes.fromhex("77ff84905a91936367c01360803104f92432fcd904a43511876df5cdf3e7e548")
BEP44_SIG = bytes.fromhex("305ac8aeb6c9c151fa120f120ea2cfb923564e11552d06a5d856091e5e853cff"
                          "1260d3f39e4999684aa92eb73ffd136e6f4f3ecbfda0ce53a1608ecd7ae21f01")
BEP44_SIG_SALT = bytes.fromhex("6834284b6b24c3204eb2fea824d82f88883a3d95e8b4a21b8c0ded553d17d17d"
                               "df9a8a7104b1258f30bed3787e6cb896fca78c58f8e03b5f18f14951a87d9a08")


def test_bep44_vectors():
    value = b"12:Hello World!"
    assert crypto.bep44_message(b"", 1, value) == b"3:seqi1e1:v12:Hello World!"
    assert crypto.bep44_message(b"foobar", 1, value) == b"4:salt6:foobar3:seqi1e1:v12:Hello World!"
    plain = MutableItem(BEP44_KEY, b"", 1, value, BEP44_SIG)
    salted = MutableItem(BEP44_KEY, b"foobar", 1, value, BEP44_SIG_SALT)
    plain.verify()
    salted.verify()
    assert plain.target.hex() == "4a533d47ec9c7d95b1ad75f576cffc641853b750"
    assert salted.target.hex() == "411eba73b6f087ca51a3795d9c8c938d365e32c1"
    assert immutable_target(value).hex() == "e5f96f6f38320f0f33959cb4d3d656452117aadb"
    for bad in (MutableItem(BEP44_KEY, b"", 2, value, BEP44_SIG),
                MutableItem(BEP44_KEY, b"foobar", 1, value, BEP44_SIG),
                MutableItem(BEP44_KEY, b"", 1, b"12:Hello World?", BEP44_SIG),
                MutableItem(bytes(32), b"", 1, value, BEP44_SIG)):
        assert not bad.is_valid()
        with pytest.raises(VerificationError):
            bad.verify()


def test_sign_item_round_trip():
    public, seed = crypto.generate_keypair()
    item = sign_item(seed, b"p2pfs", 2**63 - 1, b"3:abc")
    assert item.key == public and item.target == mutable_target(public, b"p2pfs")
    item.verify()
    with pytest.raises(ValueError):
        crypto.bep44_message(bytes(65), 1, b"1:x")
    with pytest.raises(ValueError):
        crypto.bep44_message(b"", 2**63, b"1:x")


# --- codec -------------------------------------------------------------------------------

NODES = (krpc.NodeInfo(OTHER, "10.0.0.1", 6881), krpc.NodeInfo(ID, "127.0.0.2", 1))

MESSAGES = [
    krpc.Ping(T, ID),
    krpc.Ping(T, ID, read_only=True),
    krpc.FindNode(T, ID, OTHER),
    krpc.GetPeers(b"\x00\x01\x02", ID, OTHER),
    krpc.AnnouncePeer(T, ID, OTHER, 7640, b"tok"),
    krpc.AnnouncePeer(T, ID, OTHER, 0, b"tok", implied_port=True),
    krpc.GetItem(T, ID, OTHER),
    krpc.GetItem(T, ID, OTHER, seq=9),
    krpc.PutItem(T, ID, b"tok", b"5:hello"),
    krpc.PutItem(T, ID, b"tok", b"li1ei2ee", bytes(32), b"salt", 5, bytes(64), cas=4),
    krpc.UnknownQuery(T, ID, b"sample_infohashes"),
    krpc.Response(T, ID),
    krpc.Response(T, ID, ip=("192.0.2.34", 5), nodes=NODES, values=(("192.0.2.34", 80),), token=b"t"),
    krpc.Response(T, ID, nodes=NODES, token=b"t", k=bytes(32), seq=0, sig=bytes(64), v=b"d1:ai1ee"),
    krpc.Error(T, krpc.PROTOCOL_ERROR, "bad token"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert krpc.decode(krpc.encode(message)) == message


def test_response_carries_the_askers_address():
    data = krpc.encode(krpc.Response(T, ID), ip=("203.0.113.9", 4242))
    assert krpc.decode(data).ip == ("203.0.113.9", 4242)


def test_value_is_kept_verbatim():
    # a dict value with keys in order: the re-encoding is byte for byte what came
    raw = b"d1:ad1:bi1ee1:cli-3e0:ee"
    data = krpc.encode(krpc.Response(T, ID, v=raw))
    assert raw in data and krpc.decode(data).v == raw


def _q(method: bytes, args: dict, top: dict | None = None) -> bytes:
    return bencode2.bencode({b"t": T, b"y": b"q", b"q": method, b"a": args, **(top or {})})


def _raises(data: bytes, kind=ProtocolError):
    with pytest.raises(kind):
        krpc.decode(data)


def test_limits_are_enforced():
    _raises(b"d1:t2:aa1:y1:r1:rd2:id20:" + ID + b"ee" + b" " * krpc.MAX_DATAGRAM)  # oversize
    _raises(bencode2.bencode({b"t": b"x" * 17, b"y": b"r", b"r": {b"id": ID}}))       # long t
    _raises(bencode2.bencode({b"t": b"", b"y": b"r", b"r": {b"id": ID}}))             # empty t
    _raises(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID[:19]}}))          # short id
    _raises(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID, b"nodes": b"x" * 27}}))
    _raises(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID, b"nodes": b"x" * 26 * 33}}))
    _raises(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID, b"values": [b"x" * 6] * 201}}))
    _raises(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID, b"values": [1]}}))
    _raises(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID, b"token": b"x" * 65}}))
    _raises(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID, b"seq": -1}}))
    _raises(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID, b"seq": 2**63}}))
    _raises(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID, b"sig": bytes(63)}}))
    _raises(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID, b"v": b"x" * 998}}))  # 1002 encoded
    assert krpc.decode(bencode2.bencode({b"t": T, b"y": b"r", b"r": {b"id": ID, b"v": b"x" * 996}}))
    _raises(bencode2.bencode({b"t": T, b"y": b"x"}))
    _raises(bencode2.bencode([T]))
    _raises(b"d1:t2:aa1:y1:re")  # a reply without r
    _raises(b"i03e")
    _raises(b"d1:y1:r1:t2:aae")  # unsorted keys
    _raises(b"d1:t2:aa1:y1:ree")  # trailing data


def test_bad_query_arguments_carry_the_transaction():
    cases = [
        _q(b"find_node", {b"id": ID}),
        _q(b"find_node", {b"id": ID, b"target": ID[:5]}),
        _q(b"get_peers", {b"id": ID[:3], b"info_hash": ID}),
        _q(b"announce_peer", {b"id": ID, b"info_hash": ID, b"port": 0, b"token": b"t"}),
        _q(b"announce_peer", {b"id": ID, b"info_hash": ID, b"port": 65536, b"token": b"t"}),
        _q(b"announce_peer", {b"id": ID, b"info_hash": ID, b"port": 1, b"token": b""}),
        _q(b"put", {b"id": ID, b"token": b"t", b"v": b"x" * 1000}),
        _q(b"put", {b"id": ID, b"token": b"t", b"v": b"x", b"k": bytes(32), b"seq": 1,
                    b"sig": bytes(64), b"salt": bytes(65)}),
        _q(b"put", {b"id": ID, b"token": b"t", b"v": b"x", b"k": bytes(32), b"sig": bytes(64)}),
        _q(b"get", {b"id": ID, b"target": ID, b"seq": -5}),
    ]
    for data in cases:
        with pytest.raises(krpc.BadQuery) as info:
            krpc.decode(data)
        assert info.value.t == T
    _raises(bencode2.bencode({b"t": T, b"y": b"q", b"q": b"ping", b"a": 5}), krpc.BadQuery)


def test_implied_port_may_omit_the_port():
    msg = krpc.decode(_q(b"announce_peer", {b"id": ID, b"info_hash": ID, b"token": b"t", b"implied_port": 1}))
    assert msg == krpc.AnnouncePeer(T, ID, ID, 0, b"t", True)


def test_unknown_fields_and_ipv6_are_ignored():
    data = bencode2.bencode({b"t": T, b"y": b"r", b"ip": b"x" * 18,
                             b"r": {b"id": ID, b"nodes6": b"y" * 38, b"values": [b"z" * 18, b"\xc0\x00\x02\x22\x00\x50"],
                                    b"samples": b"q" * 20, b"future": {b"a": [1, 2]}}})
    msg = krpc.decode(data)
    assert msg.ip is None and msg.values == (("192.0.2.34", 80),) and msg.nodes == ()


def test_nesting_is_bounded_by_the_datagram():
    # 1500 bytes allow at most 750 levels, well inside bencode2's own depth limit
    _raises(b"l" * 750 + b"e" * 750)  # not a dictionary
    deep = b"d1:rd2:id20:" + ID + b"1:v" + b"l" * 400 + b"e" * 400 + b"e1:t2:aa1:y1:re"
    assert krpc.decode(deep).v == b"l" * 400 + b"e" * 400
    _raises(b"d1:rd2:id20:" + ID + b"1:v" + b"l" * 600 + b"e" * 600 + b"e1:t2:aa1:y1:re")  # v > 1000


# --- hypothesis fuzz: only ProtocolError escapes ------------------------------------------------

VALID = [krpc.encode(m) for m in MESSAGES]


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=1600))
def test_random_bytes_raise_only_protocol_error(data):
    try:
        krpc.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(VALID), st.integers(0, 2000), st.binary(min_size=0, max_size=8), st.integers(0, 8))
def test_mutated_messages_raise_only_protocol_error(data, pos, insert, cut):
    pos %= len(data) + 1
    mutated = data[:pos] + insert + data[pos + cut:]
    try:
        msg = krpc.decode(mutated)
    except ProtocolError:
        return
    assert krpc.decode(krpc.encode(msg)) == msg  # whatever decodes also re-encodes to itself


leaves = st.integers(-2**70, 2**70) | st.binary(max_size=20) | \
    st.sampled_from([bytes(6), bytes(20), bytes(26), bytes(32), bytes(64), b"x" * 990])  # KRPC's own sizes
bvalues = st.recursive(leaves,
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.binary(max_size=5), inner, max_size=4),
                       max_leaves=12)


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(st.sampled_from([b"t", b"y", b"q", b"a", b"r", b"e", b"ip", b"ro", b"v"]), bvalues, max_size=7),
       st.dictionaries(st.sampled_from([b"id", b"target", b"info_hash", b"port", b"token", b"implied_port", b"nodes",
                                        b"values", b"v", b"k", b"seq", b"sig", b"salt", b"cas"]), bvalues, max_size=8),
       st.sampled_from([b"ping", b"find_node", b"get_peers", b"announce_peer", b"get", b"put", b"x"]),
       st.sampled_from([b"q", b"r", b"e"]), st.booleans())
def test_structured_garbage_raises_only_protocol_error(top, inner, method, kind, with_id):
    if with_id:  # past the first check, so that the other fields are looked at
        inner = {**inner, b"id": ID}
    top = {**top, b"t": T, b"y": kind, b"q": method, b"a": inner, b"r": inner}
    try:
        krpc.decode(bencode2.bencode(top))
    except ProtocolError:
        pass
