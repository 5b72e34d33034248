"""Protocol version and cipher negotiation in the Noise payloads, through real Connections."""

import msgspec
import pytest

from p2pfs import crypto
from p2pfs.errors import ProtocolError
from p2pfs.wire import messages as m
from p2pfs.wire import negotiation as n
from p2pfs.wire.connection import PROLOGUE, V1_PROLOGUE, Connection, HandshakeComplete, Received
from p2pfs.wire.frames import encode_frame
from p2pfs.wire.noise import Handshake

from test_wire import frames_of

AES, CHACHA = "aes256gcm", "chacha20poly1305"
KEY = crypto.generate_keypair()[0]


@pytest.mark.parametrize("initiator,responder,chosen", [
    ([AES, CHACHA], [AES, CHACHA], AES),
    ([CHACHA, AES], [CHACHA, AES], CHACHA),
    ([CHACHA, AES], [AES, CHACHA], CHACHA),   # a tie (1 + 0 = 0 + 1): the initiator's order
    ([AES, CHACHA], [CHACHA, AES], AES),
    (["x", AES, CHACHA], [CHACHA], CHACHA),
    (["a", "b", "c"], ["c", "b", "a"], "a"),  # all tie at 2
    (["a", "b", "c"], ["b", "c", "a"], "b"),  # 1 + 0 beats 0 + 2 and 2 + 1
    (["a", "b", "c", "d"], ["d", "c", "b"], "b"),  # b 1+2, c 2+1, d 3+0: tie b/c -> b
    ([AES], [CHACHA], None),
    ([], [AES], None),
])
def test_cipher_rule(initiator, responder, chosen):
    assert n.choose_cipher(initiator, responder) == chosen


@pytest.mark.parametrize("a,b,chosen", [
    ((2, 2), (2, 2), 2), ((1, 3), (2, 5), 3), ((2, 9), (1, 2), 2), ((1, 1), (2, 2), None), ((3, 4), (2, 2), None),
])
def test_version_rule(a, b, chosen):
    assert n.choose_version(a, b) == n.choose_version(b, a) == chosen


def pair(ci=None, cr=None, vi=n.VERSIONS, vr=n.VERSIONS):
    si, sr = crypto.x25519_keypair()[0], crypto.x25519_keypair()[0]
    known = {crypto.discovery_key(KEY): KEY}.get
    return (Connection(True, si, known, ciphers=ci, versions=vi),
            Connection(False, sr, known, ciphers=cr, versions=vr))


def events(conn, data):
    conn.receive_data(data)
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


CIPHER_LISTS = [[AES], [CHACHA], [AES, CHACHA], [CHACHA, AES]]


@pytest.mark.parametrize("ci,cr", [(a, b) for a in CIPHER_LISTS for b in CIPHER_LISTS if set(a) & set(b)])
def test_connections_agree_on_the_rule_and_talk(ci, cr):
    chosen = n.choose_cipher(ci, cr)
    i, r = pair(ci, cr)
    assert events(r, i.data_to_send()) == []
    assert events(i, r.data_to_send()) == [HandshakeComplete(crypto.x25519_public(r._static), 2, chosen)]
    got = events(r, i.open_channel(KEY))  # message 3 and the Open leave together
    assert got[0] == HandshakeComplete(crypto.x25519_public(i._static), 2, chosen)
    assert r.cipher == i.cipher == chosen and r.version == i.version == 2
    ch = r.local_channel(KEY)
    reply = r.data_to_send() + r.send(m.Head(ch, 5, bytes(32), bytes(64)))
    assert [e.message for e in events(i, reply) if isinstance(e, Received)] == [m.Head(ch, 5, bytes(32), bytes(64))]


def test_no_common_cipher_is_a_clear_error_on_both_sides():
    i, r = pair([AES], [CHACHA])
    with pytest.raises(ProtocolError, match=r"^peer offers ciphers \[aes256gcm\], this node supports "
                                            r"\[chacha20poly1305\]: no cipher in common \(check P2PFS_CIPHERS"):
        events(r, i.data_to_send())
    refusal = r.data_to_send()  # still there after the error: the driver writes it, then closes
    assert refusal
    with pytest.raises(ProtocolError, match=r"^peer offers ciphers \[chacha20poly1305\], this node supports "
                                            r"\[aes256gcm\]: no cipher in common"):
        events(i, refusal)
    assert i.data_to_send() == b""  # no third message
    with pytest.raises(ProtocolError):  # both stay failed
        r.next_event()


def test_version_mismatch_is_a_clear_error_on_both_sides():
    i, r = pair(vi=(3, 4))
    with pytest.raises(ProtocolError, match=r"^peer speaks protocol versions 3 to 4; p2pfs 0.2 needs version 2: "
                                            r"upgrade p2pfs on this node$"):
        events(r, i.data_to_send())
    with pytest.raises(ProtocolError, match=r"^peer speaks protocol version 2; p2pfs 0.2 needs a version from 3 "
                                            r"to 4: upgrade p2pfs on the peer$"):
        events(i, r.data_to_send())


V1_ERROR = r"^peer speaks protocol version 1; p2pfs 0.2 needs version 2: upgrade p2pfs on the peer$"


def test_a_version_1_initiator_is_told_and_refused():
    # what p2pfs 0.1 sends: message 1 under its prologue, with an empty payload
    old = Handshake(True, crypto.x25519_keypair()[0], V1_PROLOGUE)
    _, r = pair()
    with pytest.raises(ProtocolError, match=V1_ERROR):
        events(r, encode_frame(old.write_message(b"")))
    (refusal,) = frames_of(r.data_to_send())
    with pytest.raises(ProtocolError):  # 0.1 cannot read it (other prologue): it drops the connection
        old.read_message(refusal)


def test_a_version_1_responder_is_recognised():
    i, _ = pair()
    old = Handshake(False, crypto.x25519_keypair()[0], V1_PROLOGUE)
    (offer,) = frames_of(i.data_to_send())
    old.read_message(offer)  # 0.1 ignores the payload
    with pytest.raises(ProtocolError, match=V1_ERROR):
        events(i, encode_frame(old.write_message(b"")))


def raw_responder(i, payload):
    """A hand-made responder answering `i`'s offer with `payload`."""
    hs = Handshake(False, crypto.x25519_keypair()[0], PROLOGUE)
    (offer,) = frames_of(i.data_to_send())
    hs.read_message(offer)
    return encode_frame(hs.write_message(payload))


def test_a_refusal_it_cannot_explain_shows_the_peers_reason_printable():
    i, _ = pair([AES, CHACHA])
    refuse = n.encode_payload(n.Refuse("busy\x1b[31m, try\nlater", 2, 2, [AES]))
    with pytest.raises(ProtocolError, match=r"^peer refused the connection: busy\?\[31m, try\?later$"):
        events(i, raw_responder(i, refuse))


def test_a_choice_against_the_rule_is_refused():
    i, _ = pair([AES, CHACHA])
    accept = n.encode_payload(n.Accept(2, CHACHA, 2, 2, [AES, CHACHA]))
    with pytest.raises(ProtocolError, match="peer chose protocol version 2 and cipher chacha20poly1305; "
                                            "the rule gives 2 and aes256gcm"):
        events(i, raw_responder(i, accept))
    i, _ = pair([AES])
    accept = n.encode_payload(n.Accept(2, CHACHA, 2, 2, [CHACHA]))
    with pytest.raises(ProtocolError, match="the rule gives no agreement"):
        events(i, raw_responder(i, accept))


def test_the_confirmation_must_repeat_the_choice():
    _, r = pair([AES, CHACHA], [AES, CHACHA])
    hs = Handshake(True, crypto.x25519_keypair()[0], PROLOGUE)
    events(r, encode_frame(hs.write_message(n.offer((2, 2), [AES, CHACHA]))))
    (reply,) = frames_of(r.data_to_send())
    hs.read_message(reply)
    with pytest.raises(ProtocolError, match="peer confirmed protocol version 2 and cipher chacha20poly1305, "
                                            "not the 2 and aes256gcm chosen"):
        events(r, encode_frame(hs.write_message(n.encode_payload(n.Confirm(2, CHACHA)))))


@pytest.mark.parametrize("payload,error", [
    (n.encode_payload(n.Confirm(2, AES)), "a Confirm where a Offer belongs"),
    (b"\x93\x01\x02", "malformed handshake payload"),
    (b"\xff", "malformed handshake payload"),
])
def test_the_wrong_payload_in_message_1(payload, error):
    _, r = pair()
    hs = Handshake(True, crypto.x25519_keypair()[0], PROLOGUE)
    with pytest.raises(ProtocolError, match=error):
        events(r, encode_frame(hs.write_message(payload)))


@pytest.mark.parametrize("raw", [
    [1, 0, 2, [AES]],                 # version 0
    [1, 3, 2, [AES]],                 # reversed range
    [1, 2, 2**16, [AES]],             # version past 65535
    [1, 2, 2, [AES, AES]],            # a cipher twice
    [1, 2, 2, ["x"] * 17],            # more than 16 ciphers
    [1, 2, 2, ["AES"]],               # names are lowercase
    [1, 2, 2, ["a" * 33]],
    [1, 2, 2, [""]],
    [1, 2, 2, "aes256gcm"],
    [2, 2, AES, 2, 2],                # Accept without its list
    [3, "x" * (n.MAX_REASON + 1), 2, 2, []],
    [4, 2],                           # Confirm without a cipher
    [5, 2, AES],                      # unknown tag
    [],
])
def test_payload_limits(raw):
    expected = {1: n.Offer, 2: n.Accept, 3: n.Accept, 4: n.Confirm}.get(raw[0] if raw else 0, n.Offer)
    with pytest.raises(ProtocolError):
        n.decode_payload(msgspec.msgpack.encode(raw), expected)


def test_payloads_round_trip_and_tolerate_appended_fields():
    for p, kind in [(n.Offer(2, 3, [AES]), n.Offer), (n.Accept(2, AES, 2, 2, [AES, CHACHA]), n.Accept),
                    (n.Refuse("no", 2, 2, []), n.Accept), (n.Confirm(2, AES), n.Confirm)]:
        assert n.decode_payload(n.encode_payload(p), kind) == p
    assert n.decode_payload(msgspec.msgpack.encode([4, 2, AES, "future"]), n.Confirm) == n.Confirm(2, AES)


def test_bad_local_cipher_lists_are_our_bug():
    with pytest.raises(ValueError):
        Connection(True, crypto.x25519_keypair()[0], ciphers=[])
    with pytest.raises(ValueError):
        Connection(True, crypto.x25519_keypair()[0], ciphers=["rot13"])
