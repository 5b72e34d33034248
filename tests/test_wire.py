"""The sans-IO wire layer: frames, messages, and two Connections talking in memory."""

import pytest

from p2pfs import crypto
from p2pfs.errors import ProtocolError
from p2pfs.types import Node
from p2pfs.wire import messages as m
from p2pfs.wire.connection import (
    MAX_REQUESTS,
    ChannelClosed,
    ChannelOpened,
    Connection,
    EndOfStream,
    HandshakeComplete,
    Received,
    capability,
)
from p2pfs.wire.frames import MAX_FRAME, FrameDecoder, encode_frame

KEY_A = crypto.generate_keypair()[0]
KEY_B = crypto.generate_keypair()[0]
ROOT = bytes(range(32))
SIG = bytes(64)


# --- frames ------------------------------------------------------------------

def test_frames_whole_and_byte_by_byte():
    payloads = [b"", b"x", b"hello" * 1000, bytes(MAX_FRAME)]
    stream = b"".join(encode_frame(p) for p in payloads)
    for chunk in (len(stream), 1, 7, 65536):
        dec = FrameDecoder()
        got = []
        for i in range(0, len(stream), chunk):
            dec.feed(stream[i:i + chunk])
            while (f := dec.next_frame()) is not None:
                got.append(f)
        dec.feed(b"")
        assert dec.next_frame() is None
        assert got == payloads


def test_oversized_frame_refused_before_buffering():
    dec = FrameDecoder(max_size=100)
    dec.feed((101).to_bytes(4, "little"))
    with pytest.raises(ProtocolError, match="limit"):
        dec.next_frame()
    with pytest.raises(ValueError):
        encode_frame(bytes(101), 100)


def test_truncated_frame_at_eof():
    dec = FrameDecoder()
    dec.feed(encode_frame(b"abcdef")[:-1])
    assert dec.next_frame() is None
    dec.feed(b"")
    with pytest.raises(ProtocolError):
        dec.next_frame()


# --- messages ----------------------------------------------------------------

ALL_MESSAGES = [
    m.Open(3, bytes(32), bytes(range(32))),
    m.Close(3),
    m.Reject(9),
    m.Head(0, 17, ROOT, SIG),
    m.Have(1, [(0, 5), (9, 12)]),
    m.Have(1, []),
    m.Request(1, 42, 7, 3, True, 8),
    m.IndexRequest(1, 43, b"/docs/f7.txt", 12),
    m.Data(1, 42, 7, b"block bytes", [(14, ROOT, 65536), (3, ROOT, 3)]),
    m.Data(1, 44, 0, b"", []),
    m.IndexData(1, 43, [m.BlockItem(10, b"idx", [(20, ROOT, 3)]), m.BlockItem(11, b"leaf", [])]),
    m.NoData(1, 45),
    m.Cancel(1, 46),
]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda x: type(x).__name__)
def test_message_round_trip(msg):
    assert m.decode(m.encode(msg)) == msg


def test_every_message_type_is_covered():
    assert {type(x) for x in ALL_MESSAGES} == set(m.MESSAGE_TYPES)


def test_proof_nodes_become_nodes():
    d = m.decode(m.encode(m.Data(1, 2, 3, b"x", [Node(4, ROOT, 5)])))
    assert d.nodes == [Node(4, ROOT, 5)]


@pytest.mark.parametrize(
    "raw",
    [
        [4, 0, 1, b"short", SIG],            # root not 32 bytes
        [4, 0, -1, ROOT, SIG],               # negative length
        [4, 0, 1, ROOT, bytes(63)],          # signature not 64 bytes
        [5, 0, [[5, 5]]],                    # empty range
        [5, 0, [[0, 1]] * (m.MAX_HAVE_RANGES + 1)],
        [6, 0, 1, 9, 0, False, 9],           # block past length
        [6, 0, 1, 0, 65, False, 9],          # too many siblings
        [7, 0, 1, b"", 3],                   # empty path
        [7, 0, 1, b"x" * (m.MAX_PATH_BYTES + 1), 3],
        [8, 0, 1, 2, bytes(m.MAX_BLOCK_DATA + 1), []],
        [8, 0, 1, 2, b"", [[0, ROOT, 1]] * (m.MAX_PROOF_NODES + 1)],
        [8, 0, 1, 2, b"", [[0, b"short", 1]]],
        [99, 0],                             # unknown tag
        [2, 2**32],                          # channel out of range
        [2],                                 # missing field
        "not an array",
    ],
)
def test_message_limits(raw):
    import msgspec

    with pytest.raises(ProtocolError):
        m.decode(msgspec.msgpack.encode(raw))


def test_appended_fields_are_tolerated():
    import msgspec

    assert m.decode(msgspec.msgpack.encode([2, 7, "a field from the future"])) == m.Close(7)


# --- connections in memory ----------------------------------------------------

class Side:
    def __init__(self, initiator, known=()):
        self.static, self.public = crypto.x25519_keypair()
        self.known = {crypto.discovery_key(k): k for k in known}
        self.conn = Connection(initiator, self.static, self.known.get)
        self.events = []


def pump(a: Side, b: Side, rounds=10, chunk=None):
    """Move bytes both ways until both are quiet; collect events."""
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.conn.data_to_send()
            if data:
                moved = True
                step = chunk or len(data)
                for i in range(0, len(data), step):
                    dst.conn.receive_data(data[i:i + step])
                    while (ev := dst.conn.next_event()) is not None:
                        dst.events.append(ev)
        if not moved:
            return
    raise AssertionError("connections did not settle")


def connected(known_a=(), known_b=(), chunk=None):
    a, b = Side(True, known_a), Side(False, known_b)
    pump(a, b, chunk=chunk)
    return a, b


def deliver(src: Side, dst: Side, data: bytes):
    dst.conn.receive_data(data)
    while (ev := dst.conn.next_event()) is not None:
        dst.events.append(ev)
    pump(src, dst)


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_handshake_in_memory(chunk):
    a, b = connected(chunk=chunk)
    assert a.events == [HandshakeComplete(b.public)]
    assert b.events == [HandshakeComplete(a.public)]
    assert a.conn.handshake_hash == b.conn.handshake_hash
    assert a.conn.can_send and b.conn.can_send


def test_open_channel_and_exchange_every_message():
    a, b = connected(known_b=[KEY_A])
    deliver(a, b, a.conn.open_channel(KEY_A))
    assert ChannelOpened(KEY_A) in a.events and ChannelOpened(KEY_A) in b.events
    la, lb = a.conn.local_channel(KEY_A), b.conn.local_channel(KEY_A)
    a.events.clear(), b.events.clear()

    deliver(b, a, b.conn.send(m.Head(lb, 8, ROOT, SIG)) + b.conn.send(m.Have(lb, [(0, 8)])))
    assert [e.message for e in a.events] == [m.Head(lb, 8, ROOT, SIG), m.Have(lb, [(0, 8)])]
    assert all(e.drive_key == KEY_A for e in a.events)

    reqs = [m.Request(la, 1, 5, 2, True, 8), m.IndexRequest(la, 2, b"/x", 8), m.Request(la, 3, 6, 0, False, 8)]
    deliver(a, b, b"".join(a.conn.send(r) for r in reqs))
    assert [e.message for e in b.events] == reqs
    assert a.conn.requests_in_flight == 3
    replies = [m.Data(lb, 1, 5, b"five", [(8, ROOT, 1)]), m.IndexData(lb, 2, [m.BlockItem(7, b"i", [])]), m.NoData(lb, 3)]
    a.events.clear()
    deliver(b, a, b"".join(b.conn.send(r) for r in replies))
    assert [e.message for e in a.events] == replies
    assert a.conn.requests_in_flight == 0


def test_cancel_turns_into_nodata_and_late_reply_is_dropped():
    a, b = connected(known_a=[KEY_A], known_b=[KEY_A])
    deliver(a, b, a.conn.open_channel(KEY_A))
    la, lb = a.conn.local_channel(KEY_A), b.conn.local_channel(KEY_A)
    deliver(a, b, a.conn.send(m.Request(la, 7, 1, 0, True, 4)))
    a.events.clear()
    deliver(a, b, a.conn.send(m.Cancel(la, 7)))
    # b answered NoData by itself; a swallows it (it cancelled) and is free again
    assert a.events == [] and a.conn.requests_in_flight == 0
    # b's application answering afterwards sends nothing
    assert b.conn.send(m.Data(lb, 7, 1, b"late", [])) == b""


def test_unknown_drive_and_wrong_capability_look_the_same():
    a, b = connected(known_b=[KEY_B])
    # unknown drive
    unknown = a.conn.open_channel(KEY_A)
    b.conn.receive_data(unknown)
    assert b.conn.next_event() is None
    reply_unknown = b.conn.data_to_send()
    # known drive, capability of the wrong role (a reflected capability)
    hh = a.conn.handshake_hash
    wrong = m.Open(5, crypto.discovery_key(KEY_B), capability(hh, False, KEY_B))
    b.conn.receive_data(a.conn._encryptor and _encrypt(a, wrong))
    assert b.conn.next_event() is None
    reply_wrong = b.conn.data_to_send()
    da = _decrypt_all(a, reply_unknown + reply_wrong)
    assert da == [m.Reject(0), m.Reject(5)]
    assert len(reply_unknown) == len(reply_wrong)
    assert b.conn.open_drives() == []


def _encrypt(side, message):
    side.conn._queue(message)
    return side.conn.data_to_send()


def _decrypt_all(side, data):
    dec = FrameDecoder()
    dec.feed(data)
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(m.decode(side.conn._decryptor.decrypt(f)))
    return out


def test_capability_from_another_session_is_refused():
    a, b = connected(known_b=[KEY_A])
    c, d = connected(known_b=[KEY_A])
    replayed = m.Open(0, crypto.discovery_key(KEY_A), capability(c.conn.handshake_hash, True, KEY_A))
    deliver(a, b, _encrypt(a, replayed))
    assert b.conn.open_drives() == []
    assert not any(isinstance(e, ChannelOpened) for e in b.events)


def test_reject_reaches_the_opener():
    a, b = connected()
    deliver(a, b, a.conn.open_channel(KEY_A))
    assert ChannelClosed(KEY_A, True) in a.events
    assert a.conn.local_channel(KEY_A) is None


def test_close_ends_channel_and_voids_requests():
    a, b = connected(known_b=[KEY_A])
    deliver(a, b, a.conn.open_channel(KEY_A))
    la = a.conn.local_channel(KEY_A)
    deliver(a, b, a.conn.send(m.Request(la, 1, 0, 0, True, 1)))
    deliver(b, a, b.conn.close_channel(KEY_A))
    assert ChannelClosed(KEY_A, False) in a.events
    assert a.conn.requests_in_flight == 0 and a.conn.open_drives() == [] and b.conn.open_drives() == []


def test_peer_exceeding_requests_in_flight_is_a_protocol_error():
    a, b = connected(known_b=[KEY_A])
    deliver(a, b, a.conn.open_channel(KEY_A))
    la = a.conn.local_channel(KEY_A)
    data = b"".join(_encrypt(a, m.Request(la, i, 0, 0, True, 1)) for i in range(MAX_REQUESTS + 1))
    b.conn.receive_data(data)
    with pytest.raises(ProtocolError, match="in flight"):
        while b.conn.next_event() is not None:
            pass
    with pytest.raises(ProtocolError):  # dead for good
        b.conn.next_event()


def test_wrong_block_in_reply_is_a_protocol_error():
    a, b = connected(known_b=[KEY_A])
    deliver(a, b, a.conn.open_channel(KEY_A))
    la, lb = a.conn.local_channel(KEY_A), b.conn.local_channel(KEY_A)
    deliver(a, b, a.conn.send(m.Request(la, 1, 3, 0, True, 4)))
    a.conn.receive_data(b.conn.send(m.Data(lb, 1, 2, b"x", [])))
    with pytest.raises(ProtocolError, match="wrong block"):
        a.conn.next_event()


def test_end_of_stream():
    a, b = connected()
    b.conn.receive_data(b"")
    assert b.conn.next_event() == EndOfStream()
    assert b.conn.next_event() is None


def test_tampered_ciphertext_is_protocol_error():
    a, b = connected(known_b=[KEY_A])
    data = bytearray(a.conn.open_channel(KEY_A))
    data[-3] ^= 0x40
    b.conn.receive_data(bytes(data))
    with pytest.raises(ProtocolError):
        b.conn.next_event()


def test_sending_before_handshake_is_our_bug():
    a = Side(True)
    with pytest.raises(RuntimeError):
        a.conn.open_channel(KEY_A)


# --- decrypting ahead (the driver runs it in a worker thread) -----------------

def _channel_and_heads(n):
    a, b = connected(known_b=[KEY_A])
    deliver(a, b, a.conn.open_channel(KEY_A))
    lb = b.conn.local_channel(KEY_A)
    heads = [m.Head(lb, i + 1, ROOT, SIG) for i in range(n)]
    return a, b, heads


@pytest.mark.parametrize("split", [1, 7, 13, 15])
def test_decrypt_ahead_keeps_order_and_partial_frames(split):
    a, b, heads = _channel_and_heads(5)
    wire = b"".join(b.conn.send(h) for h in heads)
    a.events.clear()
    # part of the stream, decrypted ahead, then the rest (a frame may be cut)
    cut = len(wire) * split // 16  # never 0 or all: b"" would mean end of stream
    a.conn.receive_data(wire[:cut])
    if a.conn.can_decrypt_ahead:
        a.conn.decrypt_ahead()
    a.conn.receive_data(wire[cut:])
    a.conn.decrypt_ahead()
    while (ev := a.conn.next_event()) is not None:
        a.events.append(ev)
    assert [e.message for e in a.events] == heads


def test_decrypt_ahead_raises_a_bad_frame_in_its_turn():
    a, b, heads = _channel_and_heads(3)
    frames = [bytearray(b.conn.send(h)) for h in heads]
    frames[1][-3] ^= 0x40  # the second message is damaged
    a.events.clear()
    a.conn.receive_data(b"".join(bytes(f) for f in frames))
    a.conn.decrypt_ahead()
    first = a.conn.next_event()
    assert isinstance(first, Received) and first.message == heads[0]
    with pytest.raises(ProtocolError):
        a.conn.next_event()
    with pytest.raises(ProtocolError):  # the connection stays failed
        a.conn.next_event()


def test_decrypt_ahead_then_end_of_stream():
    a, b, heads = _channel_and_heads(2)
    a.events.clear()
    a.conn.receive_data(b"".join(b.conn.send(h) for h in heads))
    a.conn.decrypt_ahead()
    a.conn.receive_data(b"")
    events = []
    while (ev := a.conn.next_event()) is not None:
        events.append(ev)
    assert [e.message for e in events[:2]] == heads and events[2:] == [EndOfStream()]
