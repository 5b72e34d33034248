"""Fuzz the wire decoders with hypothesis: only ProtocolError may escape.

Targets: the frame decoder, the message decoder, the handshake payload
decoder, the handshake (a responder and an initiator fed random and mutated
handshake streams, and hostile payloads inside correctly keyed handshake
messages, so the negotiation itself is fuzzed and not just the
authenticator) and an established connection fed random and mutated
messages encrypted under the right keys.
Each target is fed whole and byte by byte.  scripts/fuzz runs the same
kind of targets for >= 100,000 inputs.
"""

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfs import crypto
from p2pfs.errors import ProtocolError
from p2pfs.wire import messages as m
from p2pfs.wire import negotiation as n
from p2pfs.wire.connection import PROLOGUE, Connection
from p2pfs.wire.frames import FrameDecoder, encode_frame
from p2pfs.wire.noise import Handshake

from test_wire import ALL_MESSAGES, KEY_A

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A few valid wire streams to mutate.
STATIC_I = crypto.x25519_keypair()[0]
STATIC_R = crypto.x25519_keypair()[0]
EPH_I = crypto.x25519_keypair()[0]
EPH_R = crypto.x25519_keypair()[0]
KNOWN = {crypto.discovery_key(KEY_A): KEY_A}


def _recorded_session():
    """Run one handshake + channel open + requests; record each side's bytes."""
    i = Connection(True, STATIC_I, KNOWN.get, ephemeral_private=EPH_I)
    r = Connection(False, STATIC_R, KNOWN.get, ephemeral_private=EPH_R)
    sent = {True: bytearray(), False: bytearray()}

    def move(src, dst, extra=b""):
        data = src.data_to_send() + extra
        sent[src.initiator] += data
        dst.receive_data(data)
        while dst.next_event() is not None:
            pass

    move(i, r)
    move(r, i)
    move(i, r, i.open_channel(KEY_A))
    move(r, i)
    la = i.local_channel(KEY_A)
    move(i, r, b"".join(i.send(x) for x in [m.Request(la, 1, 0, 2, 3, [4]), m.IndexRequest(la, 2, b"/a", 0, 100)]))
    return bytes(sent[True]), bytes(sent[False])


INITIATOR_STREAM, RESPONDER_STREAM = _recorded_session()


def mutate(data: bytes, draw) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0xC4, 0xDC, 0xDD, 0xCF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


def feed_connection(conn: Connection, data: bytes, byte_by_byte: bool) -> None:
    """Feed bytes (then EOF); only ProtocolError may come out; stop at the first."""
    step = 1 if byte_by_byte else max(1, len(data))
    try:
        for pos in range(0, len(data), step):
            conn.receive_data(data[pos:pos + step])
            while conn.next_event() is not None:
                pass
            conn.data_to_send()
        conn.receive_data(b"")
        while conn.next_event() is not None:
            pass
    except ProtocolError:
        pass


def mutated_stream(draw, stream):
    return mutate(stream, draw) if draw(st.booleans()) else draw(st.binary(max_size=300))


@SETTINGS
@given(st.data(), st.booleans())
def test_frame_decoder(data, byte_by_byte):
    raw = data.draw(st.one_of(
        st.binary(max_size=200),
        st.builds(lambda ps: b"".join(encode_frame(p) for p in ps), st.lists(st.binary(max_size=40), max_size=5)),
    ))
    if data.draw(st.booleans()):
        raw = mutate(raw, data.draw)
    dec = FrameDecoder(max_size=64)
    step = 1 if byte_by_byte else max(1, len(raw))
    into = data.draw(st.booleans())  # recv_into through get_buffer, or feed
    try:
        for pos in range(0, len(raw), step):
            piece = raw[pos:pos + step]
            if into:
                view = dec.get_buffer(len(piece))
                view[:len(piece)] = piece
                dec.buffer_updated(len(piece))
            else:
                dec.feed(piece)
            while dec.next_frame() is not None:
                pass
        dec.feed(b"")
        dec.next_frame()
    except ProtocolError:
        pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=6),
    max_leaves=20,
)


@SETTINGS
@given(st.data())
def test_message_decoder(data):
    kind = data.draw(st.sampled_from(["random", "mutated", "structured"]))
    if kind == "random":
        raw = data.draw(st.binary(max_size=200))
    elif kind == "mutated":
        raw = mutate(m.encode(data.draw(st.sampled_from(ALL_MESSAGES))), data.draw)
    else:
        tag = data.draw(st.integers(0, 12))
        raw = msgspec.msgpack.encode([tag] + data.draw(st.lists(msgpack_values, max_size=7)))
    try:
        m.decode(raw)
    except ProtocolError:
        pass


PAYLOADS = [n.Offer(2, 2, ["aes256gcm", "chacha20poly1305"]), n.Accept(2, "aes256gcm", 1, 3, ["aes256gcm"]),
            n.Refuse("no cipher in common", 2, 2, []), n.Confirm(2, "chacha20poly1305")]


def hostile_payload(data) -> bytes:
    kind = data.draw(st.sampled_from(["random", "mutated", "structured", "empty"]))
    if kind == "random":
        return data.draw(st.binary(max_size=100))
    if kind == "mutated":
        return mutate(n.encode_payload(data.draw(st.sampled_from(PAYLOADS))), data.draw)
    if kind == "structured":
        fields = data.draw(st.lists(st.one_of(msgpack_values, st.lists(st.sampled_from(
            ["aes256gcm", "chacha20poly1305", "x", "", "AES"]), max_size=18)), max_size=6))
        return msgspec.msgpack.encode([data.draw(st.integers(0, 5))] + fields)
    return b""


@SETTINGS
@given(st.data())
def test_handshake_payload_decoder(data):
    try:
        n.decode_payload(hostile_payload(data), data.draw(st.sampled_from([n.Offer, n.Accept, n.Confirm])))
    except ProtocolError:
        pass


def _step(conn, data):
    """Feed `conn`; True if it is still alive (only ProtocolError may kill it)."""
    try:
        conn.receive_data(data)
        while conn.next_event() is not None:
            pass
    except ProtocolError:
        return False
    return True


@SETTINGS
@given(st.data())
def test_responder_gets_hostile_payloads_under_valid_keys(data):
    """Offers and confirmations that authenticate: the negotiation, not the AEAD, judges them."""
    r = Connection(False, STATIC_R, KNOWN.get, ephemeral_private=EPH_R)
    raw = Handshake(True, STATIC_I, PROLOGUE, EPH_I)
    good = data.draw(st.booleans())
    offer = n.offer((2, 2), ["aes256gcm", "chacha20poly1305"]) if good else hostile_payload(data)
    if not _step(r, encode_frame(raw.write_message(offer))):
        r.data_to_send()  # the refusal
        return
    reply = FrameDecoder()
    reply.feed(r.data_to_send())
    raw.read_message(reply.next_frame())
    _step(r, encode_frame(raw.write_message(hostile_payload(data))))


@SETTINGS
@given(st.data())
def test_initiator_gets_hostile_payloads_under_valid_keys(data):
    i = Connection(True, STATIC_I, KNOWN.get, ephemeral_private=EPH_I)
    raw = Handshake(False, STATIC_R, PROLOGUE, EPH_R)
    offer = FrameDecoder()
    offer.feed(i.data_to_send())
    raw.read_message(offer.next_frame())
    if _step(i, encode_frame(raw.write_message(hostile_payload(data)))):
        i.data_to_send()  # an accepted answer: message 3 goes out


@SETTINGS
@given(st.data(), st.booleans())
def test_handshake_responder(data, byte_by_byte):
    conn = Connection(False, STATIC_R, KNOWN.get, ephemeral_private=EPH_R)
    feed_connection(conn, mutated_stream(data.draw, INITIATOR_STREAM), byte_by_byte)


@SETTINGS
@given(st.data(), st.booleans())
def test_handshake_initiator(data, byte_by_byte):
    conn = Connection(True, STATIC_I, KNOWN.get, ephemeral_private=EPH_I)
    conn.data_to_send()
    feed_connection(conn, mutated_stream(data.draw, RESPONDER_STREAM), byte_by_byte)


@SETTINGS
@given(st.data(), st.booleans())
def test_established_connection_gets_hostile_messages(data, byte_by_byte):
    """Valid encryption, hostile plaintext: the state machine itself is fuzzed."""
    i = Connection(True, STATIC_I, KNOWN.get)
    r = Connection(False, STATIC_R, KNOWN.get)
    r.receive_data(i.data_to_send())
    while r.next_event() is not None:
        pass
    i.receive_data(r.data_to_send())
    while i.next_event() is not None:
        pass
    stream = bytearray(i.data_to_send())  # message 3
    if data.draw(st.booleans()):
        stream += i.open_channel(KEY_A)
    plaintexts = data.draw(st.lists(st.one_of(
        st.sampled_from(ALL_MESSAGES).map(m.encode),
        st.binary(max_size=60),
    ), max_size=8))
    for p in plaintexts:
        if data.draw(st.booleans()):
            p = mutate(p, data.draw)
        stream += encode_frame(i._encryptor.encrypt(p))
    feed_connection(r, bytes(stream), byte_by_byte)


def test_scripts_fuzz_run_by_the_base_python_moves_into_the_venv():
    """`scripts/fuzz` as a user runs it: by the python the venv was made
    from (no msgspec there), whose binary the venv's python links to; it
    must re-run itself in the venv, not stop at the import."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = getattr(sys, "_base_executable", sys.executable)
    done = subprocess.run([base, os.path.join(root, "scripts", "fuzz"), "200", "--seed", "1"],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "total 200 inputs" in done.stdout and "only ProtocolError escaped" in done.stdout
