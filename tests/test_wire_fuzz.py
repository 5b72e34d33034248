"""Fuzz the wire decoders with hypothesis: only ProtocolError may escape.

Targets: the frame decoder, the message decoder, the handshake (a responder
and an initiator fed random and mutated handshake streams) and an
established connection fed random and mutated messages encrypted under the
right keys (so the state machine, not just the authenticator, sees them).
Each target is fed whole and byte by byte.  scripts/fuzz runs the same
kind of targets for >= 100,000 inputs.
"""

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfs import crypto
from p2pfs.errors import ProtocolError
from p2pfs.wire import messages as m
from p2pfs.wire.connection import Connection
from p2pfs.wire.frames import FrameDecoder, encode_frame

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
    move(i, r, b"".join(i.send(x) for x in [m.Request(la, 1, 0, 0, True, 3), m.IndexRequest(la, 2, b"/a", 3)]))
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
    try:
        for pos in range(0, len(raw), step):
            dec.feed(raw[pos:pos + step])
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
    stream = bytearray(i.data_to_send())
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
