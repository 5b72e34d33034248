"""The DHT node's sans-IO state machine: answers, matching, flood handling, BEP 42 ID changes."""

from __future__ import annotations

import os

import bencode2

from p2pfs import crypto
from p2pfs.net.discovery.dht import krpc
from p2pfs.net.discovery.dht.engine import Engine
from p2pfs.net.discovery.dht.items import sign_item
from p2pfs.net.discovery.dht.node_id import generate_id, verify_id

A = ("127.0.0.2", 6001)
B = ("127.0.0.3", 6002)
C = ("127.0.0.4", 6003)


def ask(server: Engine, client: Engine, build, client_addr=A, server_addr=B, now=1.0):
    """`client` queries `server`; returns the client's view of the answer."""
    pending, data = client.query(build, server_addr, None, now)
    answer, _ = server.receive(data, client_addr, now)
    assert answer is not None
    out, matched = client.receive(answer, server_addr, now)
    assert out is None and matched[0] is pending
    return matched[1]


def test_ping_and_find_node_fill_tables():
    a, b = Engine(0.0), Engine(0.0)
    r = ask(b, a, lambda t, me: krpc.Ping(t, me))
    assert isinstance(r, krpc.Response) and r.id == b.own_id and r.ip == A
    assert b.own_id in a.table                   # it answered us: in our table
    assert a.own_id not in b.table               # it only queried b: waits to be pinged
    assert b.table.to_ping(2.0)[0].id == a.own_id
    r = ask(b, a, lambda t, me: krpc.FindNode(t, me, os.urandom(20)))
    assert r.nodes == ()


def test_announce_needs_a_token_for_the_askers_ip():
    a, b = Engine(0.0), Engine(0.0)
    ih = os.urandom(20)
    r = ask(b, a, lambda t, me: krpc.GetPeers(t, me, ih))
    assert r.values == () and r.token
    bad = ask(b, a, lambda t, me: krpc.AnnouncePeer(t, me, ih, 7640, b"forged"))
    assert isinstance(bad, krpc.Error) and bad.code == krpc.PROTOCOL_ERROR
    stolen = ask(b, a, lambda t, me: krpc.AnnouncePeer(t, me, ih, 7640, r.token), client_addr=C)
    assert isinstance(stolen, krpc.Error)        # a token works only from the IP it was given to
    ok = ask(b, a, lambda t, me: krpc.AnnouncePeer(t, me, ih, 7640, r.token))
    assert isinstance(ok, krpc.Response)
    implied = ask(b, a, lambda t, me: krpc.AnnouncePeer(t, me, ih, 0, r.token, implied_port=True))
    assert isinstance(implied, krpc.Response)
    again = ask(b, a, lambda t, me: krpc.GetPeers(t, me, ih))
    assert sorted(again.values) == sorted([(A[0], 7640), A])
    assert b.counters["bad_tokens"] == 2


def test_put_and_get_mutable_items():
    a, b = Engine(0.0), Engine(0.0)
    _, seed = crypto.generate_keypair()
    items = [sign_item(seed, b"p2pfs", seq, b"4:v%03d" % seq) for seq in (1, 2)]
    target = items[0].target
    token = ask(b, a, lambda t, me: krpc.GetItem(t, me, target)).token

    def put(item, **kw):
        return ask(b, a, lambda t, me: krpc.PutItem(t, me, token, item.value, item.key, item.salt, item.seq,
                                                    item.signature, **kw))

    assert isinstance(put(items[1]), krpc.Response)
    old = put(items[0])
    assert isinstance(old, krpc.Error) and old.code == krpc.SEQ_TOO_OLD
    got = ask(b, a, lambda t, me: krpc.GetItem(t, me, target))
    assert (got.k, got.seq, got.sig, got.v) == (items[1].key, 2, items[1].signature, items[1].value)
    seq_only = ask(b, a, lambda t, me: krpc.GetItem(t, me, target, seq=2))
    assert seq_only.seq == 2 and seq_only.v is None and seq_only.sig is None
    forged = ask(b, a, lambda t, me: krpc.PutItem(t, me, token, b"1:x", items[1].key, b"p2pfs", 3, bytes(64)))
    assert isinstance(forged, krpc.Error) and forged.code == krpc.INVALID_SIGNATURE
    immutable = ask(b, a, lambda t, me: krpc.PutItem(t, me, token, b"5:hello"))
    assert isinstance(immutable, krpc.Response)


def test_replies_match_only_their_query_and_source():
    a, b = Engine(0.0), Engine(0.0)
    pending, data = a.query(lambda t, me: krpc.Ping(t, me), B, None, 1.0)
    answer, _ = b.receive(data, A, 1.0)
    assert a.receive(answer, C, 1.0) == (None, None)        # from a third address: ignored
    assert a.counters["ignored_unexpected"] == 1
    assert a.receive(answer, B, 1.0)[1][0] is pending
    assert a.receive(answer, B, 1.0) == (None, None)        # a replay: ignored
    forged = krpc.encode(krpc.Response(b"zz", os.urandom(20)))
    assert a.receive(forged, B, 1.0) == (None, None)
    assert len(a.table) == 1


def test_garbage_flood_from_one_source_is_blocked_and_others_still_answered():
    server = Engine(0.0)
    junk = [os.urandom(n % 200) for n in range(2000)]
    for i, data in enumerate(junk):
        assert server.receive(data, ("127.0.0.66", 9), 1.0 + i * 1e-4) == (None, None)
    c = server.counters
    assert c["dropped_malformed"] + c["ignored_blocked"] == 2000 and c["ignored_blocked"] > 1900
    assert server.dos.blocked(2.0) == ["127.0.0.66"]
    honest = Engine(0.0)
    assert isinstance(ask(server, honest, lambda t, me: krpc.Ping(t, me), now=2.0), krpc.Response)
    # oversized datagrams cost no decoding
    assert server.receive(b"x" * (krpc.MAX_DATAGRAM + 1), C, 2.0) == (None, None)
    assert c["dropped_oversize"] == 1


def test_malformed_query_gets_protocol_error():
    server = Engine(0.0)
    data = bencode2.bencode({b"t": b"ab", b"y": b"q", b"q": b"find_node", b"a": {b"id": os.urandom(20)}})
    answer, _ = server.receive(data, A, 1.0)
    err = krpc.decode(answer)
    assert isinstance(err, krpc.Error) and err.code == krpc.PROTOCOL_ERROR and err.t == b"ab"
    unknown = bencode2.bencode({b"t": b"ab", b"y": b"q", b"q": b"vote", b"a": {b"id": os.urandom(20)}})
    assert krpc.decode(server.receive(unknown, A, 1.0)[0]).code == krpc.METHOD_UNKNOWN


def test_answers_are_capped_node_wide():
    server = Engine(0.0, answer_rate=10, answer_burst=20)
    client = Engine(0.0)
    answered = 0
    for i in range(100):  # from 100 sources: the per-source blocker does not apply
        _, data = client.query(lambda t, me: krpc.Ping(t, me), B, None, 1.0)
        answer, _ = server.receive(data, (f"127.0.1.{i + 1}", 5000), 1.0)
        answered += answer is not None
    assert answered == 20 and server.counters["ignored_rate"] == 80


def test_bep42_id_follows_the_voted_external_ip():
    me = Engine(0.0)
    old_id = me.own_id
    public = "203.0.113.77"
    for i in range(3):
        peer = Engine(0.0)
        server_addr = (f"198.51.100.{i + 1}", 6881)
        pending, data = me.query(lambda t, own: krpc.Ping(t, own), server_addr, None, 1.0)
        answer, _ = peer.receive(data, (public, 6881), 1.0)
        me.receive(answer, server_addr, 1.0)
    assert me.external_ip == public and me.id_changed
    assert me.own_id != old_id and verify_id(me.own_id, public)
    assert len(me.table) == 3 and me.table.own_id == me.own_id


def test_local_external_ip_keeps_the_id():
    me = Engine(0.0)
    old_id = me.own_id
    for i in range(4):
        peer = Engine(0.0)
        addr = (f"127.0.2.{i + 1}", 6881)
        _, data = me.query(lambda t, own: krpc.Ping(t, own), addr, None, 1.0)
        me.receive(peer.receive(data, A, 1.0)[0], addr, 1.0)
    assert me.external_ip == A[0] and me.own_id == old_id and not me.id_changed


def test_a_saved_id_is_kept_only_if_it_fits_the_saved_ip():
    public = "203.0.113.5"
    good = generate_id(public)
    assert Engine(0.0, node_id=good, external_ip=public).own_id == good
    replaced = Engine(0.0, node_id=bytes(20), external_ip=public).own_id
    assert replaced != bytes(20) and verify_id(replaced, public)
