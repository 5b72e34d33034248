"""The sans-IO wire layer: frames, messages, and two Connections talking in memory."""

import random

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

LEAF = (ROOT, 11)
ALL_MESSAGES = [
    m.Open(3, bytes(32), bytes(range(32))),
    m.Close(3),
    m.Reject(9),
    m.Head(0, 17, ROOT, SIG),
    m.Head(0, 17, ROOT, SIG, bytes(range(64))),
    m.Have(1, [(0, 5), (9, 12)]),
    m.Have(1, []),
    m.Request(1, 42, 7, 3, 12, [1, 14, 19]),
    m.Request(1, 44, 0, 1, 1, []),
    m.IndexRequest(1, 43, b"/docs/f7.txt", 12),
    m.IndexRequest(1, 45, b"/", 0, 65536),
    m.Data(1, 42, 7, [b"block bytes", b"", b"x"], [LEAF] * 3, [(14, ROOT, 65536), (3, ROOT, 3)]),
    m.Data(1, 44, 0, [b""], [LEAF], []),
    m.IndexData(1, 43, 12, [m.Run(0, [b"hdr"], [LEAF], [(3, ROOT, 3)]), m.Run(10, [b"i", b"c"], [LEAF] * 2, [])]),
    m.NoData(1, 45),
    m.Cancel(1, 46),
]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda x: type(x).__name__)
def test_message_round_trip(msg):
    assert m.decode(m.encode(msg)) == msg


def test_every_message_type_is_covered():
    assert {type(x) for x in ALL_MESSAGES} == set(m.MESSAGE_TYPES)


def test_proof_nodes_become_nodes_and_blocks_are_views():
    d = m.decode(m.encode(m.Data(1, 2, 3, [b"x"], [LEAF], [Node(4, ROOT, 5)])))
    assert d.nodes == [Node(4, ROOT, 5)]
    assert type(d.blocks[0]) is memoryview and d.blocks[0] == b"x"  # no copy out of the frame
    run = m.decode(m.encode(ALL_MESSAGES[13])).runs[0]
    assert run.nodes == [Node(3, ROOT, 3)] and type(run.blocks[0]) is memoryview


BIG = bytes(m.MAX_BLOCK_DATA)


@pytest.mark.parametrize(
    "raw",
    [
        [4, 0, 1, b"short", SIG],            # root not 32 bytes
        [4, 0, -1, ROOT, SIG],               # negative length
        [4, 0, 1, ROOT, bytes(63)],          # signature not 64 bytes
        [4, 0, 1, ROOT, SIG, bytes(63)],     # DHT signature neither empty nor 64 bytes
        [4, 0, 1, ROOT, SIG, bytes(65)],
        [5, 0, [[5, 5]]],                    # empty range
        [5, 0, [[0, 1]] * (m.MAX_HAVE_RANGES + 1)],
        [6, 0, 1, 9, 1, 9, []],              # run past length
        [6, 0, 1, 8, 2, 9, []],
        [6, 0, 1, 0, 0, 9, []],              # empty run
        [6, 0, 1, 0, m.MAX_RUN_BLOCKS + 1, 2**40, []],
        [6, 0, 1, 0, 1, 9, [5, 3]],          # nodes not ascending
        [6, 0, 1, 0, 1, 9, [3, 3]],
        [6, 0, 1, 0, 1, 9, [18]],            # a node past the version
        [6, 0, 1, 0, 1, 2**40, list(range(m.MAX_PROOF_NODES + 1))],
        [7, 0, 1, b"", 3],                   # empty path
        [7, 0, 1, b"x" * (m.MAX_PATH_BYTES + 1), 3],
        [7, 0, 1, b"/a", 3, m.MAX_CONTENT_BYTES + 1],
        [7, 0, 1, b"/a", -1],
        [8, 0, 1, 2, [b"x"], [], []],        # blocks without leaves
        [8, 0, 1, 2, [], [], []],            # no blocks
        [8, 0, 1, 2, [BIG, b"x"], [list(LEAF)] * 2, []],   # more than MAX_RUN_DATA
        [8, 0, 1, 2, [BIG + b"x"], [list(LEAF)], []],
        [8, 0, 1, 2, [b""] * (m.MAX_RUN_BLOCKS + 1), [list(LEAF)] * (m.MAX_RUN_BLOCKS + 1), []],
        [8, 0, 1, 2, [b""], [[b"short", 1]], []],
        [8, 0, 1, 2, [b""], [list(LEAF)], [[0, ROOT, 1]] * (m.MAX_PROOF_NODES + 1)],
        [8, 0, 1, 2, [b""], [list(LEAF)], [[0, b"short", 1]]],
        [9, 0, 1, 0, [[0, [b""], [list(LEAF)], []]]],       # length 0
        [9, 0, 1, 5, []],                                   # no runs
        [9, 0, 1, 5, [[4, [b"", b""], [list(LEAF)] * 2, []]]],  # run past length
        [9, 0, 1, 5, [[0, [b""], [list(LEAF)], []]] * (m.MAX_INDEX_RUNS + 1)],
        [9, 0, 1, 5, [[0, [BIG], [list(LEAF)], []], [1, [b"x"], [list(LEAF)], []]]],
        [9, 0, 1, 2**40, [[0, [b""], [list(LEAF)], [[0, ROOT, 1]] * m.MAX_PROOF_NODES]] * 3],
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


def test_the_largest_messages_fit_a_frame():
    import msgspec

    assert MAX_FRAME == m.MAX_MESSAGE + crypto.TRANSPORT_TAG_BYTES
    nodes = [(2**62 + i, ROOT, 2**63 - 1) for i in range(m.MAX_PROOF_NODES)]
    leaves = [(ROOT, 2**63 - 1)] * m.MAX_RUN_BLOCKS
    many = [b"\xff" * (m.MAX_RUN_DATA // m.MAX_RUN_BLOCKS)] * m.MAX_RUN_BLOCKS
    cases = [
        m.Data(2**32 - 1, 2**63 - 1, 2**63 - 1 - 256, many, leaves, nodes),
        m.Data(2**32 - 1, 2**63 - 1, 2**62, [bytes(m.MAX_RUN_DATA)], leaves[:1], nodes),
        m.IndexData(2**32 - 1, 2**63 - 1, 2**63 - 1, [m.Run(2**62, many[:16], leaves[:16], nodes)]
                    + [m.Run(2**62, many[:16], leaves[:16], nodes[:m.MAX_PROOF_NODES // 15])] * 15),
        m.Have(2**32 - 1, [(2**63 - 2, 2**63 - 1)] * m.MAX_HAVE_RANGES),
        m.Request(2**32 - 1, 2**63 - 1, 0, m.MAX_RUN_BLOCKS, 2**62, list(range(2**61, 2**61 + m.MAX_PROOF_NODES))),
    ]
    for msg in cases:
        assert len(msgspec.msgpack.encode(msg)) <= m.MAX_MESSAGE, type(msg).__name__
    # a frame of blocks is allocated once: the hint is never short, even for the widest fields
    for msg in cases[:3] + [x for x in ALL_MESSAGES if isinstance(x, (m.Data, m.IndexData))]:
        assert len(msgspec.msgpack.encode(msg)) <= m.size_hint(msg), msg


def test_the_worst_run_proof_fits_the_bound():
    from p2pfs import tree

    # every bit of the length set (62 peaks), a run straddling the middle of the largest peak
    length = 2**62 - 1
    needed = tree.range_proof_request(2**60 - 1, 2**60 + 1, length, lambda i: False)
    assert len(needed) == 2 * 60 + 61 <= m.MAX_PROOF_NODES


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
    cipher = crypto.local_ciphers()[0]
    assert a.events == [HandshakeComplete(b.public, 2, cipher)]
    assert b.events == [HandshakeComplete(a.public, 2, cipher)]
    assert a.conn.version == b.conn.version == 2 and a.conn.cipher == b.conn.cipher == cipher
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

    reqs = [m.Request(la, 1, 5, 2, 8, [8, 13]), m.IndexRequest(la, 2, b"/x", 8), m.Request(la, 3, 6, 1, 8, [])]
    deliver(a, b, b"".join(a.conn.send(r) for r in reqs))
    assert [e.message for e in b.events] == reqs
    assert a.conn.requests_in_flight == 3
    replies = [m.Data(lb, 1, 5, [b"five", b"six"], [LEAF] * 2, [(13, ROOT, 1), (8, ROOT, 1)]),
               m.IndexData(lb, 2, 8, [m.Run(7, [b"i"], [LEAF], [])]), m.NoData(lb, 3)]
    a.events.clear()
    deliver(b, a, b"".join(b.conn.send(r) for r in replies))
    assert [e.message for e in a.events] == replies
    assert [e.request for e in a.events] == reqs  # each reply comes with the request it answers
    assert a.conn.requests_in_flight == 0


def test_cancel_turns_into_nodata_and_late_reply_is_dropped():
    a, b = connected(known_a=[KEY_A], known_b=[KEY_A])
    deliver(a, b, a.conn.open_channel(KEY_A))
    la, lb = a.conn.local_channel(KEY_A), b.conn.local_channel(KEY_A)
    deliver(a, b, a.conn.send(m.Request(la, 7, 1, 1, 4, [])))
    a.events.clear()
    deliver(a, b, a.conn.send(m.Cancel(la, 7)))
    # b answered NoData by itself; a swallows it (it cancelled) and is free again
    assert a.events == [] and a.conn.requests_in_flight == 0
    # b's application answering afterwards sends nothing
    assert b.conn.send(m.Data(lb, 7, 1, [b"late"], [LEAF], [])) == b""


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
    deliver(a, b, a.conn.send(m.Request(la, 1, 0, 1, 1, [])))
    deliver(b, a, b.conn.close_channel(KEY_A))
    assert ChannelClosed(KEY_A, False) in a.events
    assert a.conn.requests_in_flight == 0 and a.conn.open_drives() == [] and b.conn.open_drives() == []


def test_peer_exceeding_requests_in_flight_is_a_protocol_error():
    a, b = connected(known_b=[KEY_A])
    deliver(a, b, a.conn.open_channel(KEY_A))
    la = a.conn.local_channel(KEY_A)
    data = b"".join(_encrypt(a, m.Request(la, i, 0, 1, 1, [])) for i in range(MAX_REQUESTS + 1))
    b.conn.receive_data(data)
    with pytest.raises(ProtocolError, match="in flight"):
        while b.conn.next_event() is not None:
            pass
    with pytest.raises(ProtocolError):  # dead for good
        b.conn.next_event()


def _channel_with_request(request):
    a, b = connected(known_b=[KEY_A])
    deliver(a, b, a.conn.open_channel(KEY_A))
    la, lb = a.conn.local_channel(KEY_A), b.conn.local_channel(KEY_A)
    deliver(a, b, a.conn.send(request(la)))
    return a, b, lb


@pytest.mark.parametrize("reply,error", [
    (lambda ch: m.Data(ch, 1, 2, [b"x", b"y"], [LEAF] * 2, [(1, ROOT, 1)]), "with blocks 2\\+2"),
    (lambda ch: m.Data(ch, 1, 3, [b"x"], [LEAF], [(1, ROOT, 1)]), "with blocks 3\\+1"),
    (lambda ch: m.Data(ch, 1, 3, [b"x", b"y"], [LEAF] * 2, []), "other proof nodes"),
    (lambda ch: m.Data(ch, 1, 3, [b"x", b"y"], [LEAF] * 2, [(1, ROOT, 1), (5, ROOT, 1)]), "other proof nodes"),
    (lambda ch: m.IndexData(ch, 1, 8, [m.Run(0, [b"x"], [LEAF], [])]), "with index data"),
])
def test_a_reply_must_be_the_run_asked_for(reply, error):
    a, b, lb = _channel_with_request(lambda ch: m.Request(ch, 1, 3, 2, 8, [1]))
    a.conn.receive_data(b.conn.send(reply(lb)))
    with pytest.raises(ProtocolError, match=error):
        a.conn.next_event()


def test_an_index_reply_is_for_the_length_asked_or_the_last_head():
    a, b, lb = _channel_with_request(lambda ch: m.IndexRequest(ch, 1, b"/f", 8))
    a.conn.receive_data(b.conn.send(m.IndexData(lb, 1, 7, [m.Run(0, [b"x"], [LEAF], [])])))
    with pytest.raises(ProtocolError, match="for length 7, not 8"):
        a.conn.next_event()
    # length 0: the peer's newest, announced by the Head it sends first
    a, b, lb = _channel_with_request(lambda ch: m.IndexRequest(ch, 1, b"/f", 0))
    a.events.clear()
    good = m.IndexData(lb, 1, 9, [m.Run(0, [b"x"], [LEAF], [])])
    deliver(b, a, b.conn.send(m.Head(lb, 9, ROOT, SIG)) + b.conn.send(good))
    assert [e.message for e in a.events] == [m.Head(lb, 9, ROOT, SIG), good]
    a, b, lb = _channel_with_request(lambda ch: m.IndexRequest(ch, 1, b"/f", 0))
    a.conn.receive_data(b.conn.send(m.Head(lb, 9, ROOT, SIG)) + b.conn.send(
        m.IndexData(lb, 1, 8, [m.Run(0, [b"x"], [LEAF], [])])))
    with pytest.raises(ProtocolError, match="for length 8, not 9 \\(its last Head\\)"):
        while a.conn.next_event() is not None:
            pass


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


def test_decrypt_ahead_decodes_with_prepare_and_raises_a_bad_message_in_its_turn():
    a, b, heads = _channel_and_heads(2)
    seen = []
    first = b.conn.send(heads[0])
    # a frame that decrypts (the sender's key, its turn) but is no message: a hostile peer's
    garbage = encode_frame(b.conn._encryptor.encrypt(b"\xc1 not msgpack"))
    a.events.clear()
    a.conn.receive_data(first + garbage + b.conn.send(heads[1]))
    a.conn.decrypt_ahead(lambda msg: seen.append(msg) or "made")
    assert seen == heads[:1]  # decoded in the worker's call, stopped at the bad one
    first = a.conn.next_event()
    assert first.message == heads[0] and first.prepared is None  # only a reply carries it
    with pytest.raises(ProtocolError, match="malformed message"):
        a.conn.next_event()
    with pytest.raises(ProtocolError):
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


# --- the first flight -----------------------------------------------------------

def frames_of(data):
    dec = FrameDecoder()
    dec.feed(data)
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f)
    return out


def test_a_cold_lookup_is_answered_two_round_trips_after_connect():
    a, b = Side(True), Side(False, [KEY_A])
    # round trip 1: Noise messages 1 and 2
    b.conn.receive_data(a.conn.data_to_send())
    assert b.conn.next_event() is None
    a.conn.receive_data(b.conn.data_to_send())
    assert isinstance(a.conn.next_event(), HandshakeComplete) and a.conn.next_event() is None
    # round trip 2: message 3, the Open and the request leave in one write ...
    first = a.conn.open_channel(KEY_A)
    la = a.conn.local_channel(KEY_A)
    first += a.conn.send(m.IndexRequest(la, 1, b"/small.txt", 0, 65536))
    assert len(frames_of(first)) == 3
    # ... and the responder answers them from the same read, in its first write
    b.conn.receive_data(first)
    got = []
    while (ev := b.conn.next_event()) is not None:
        got.append(ev)
    assert [type(e) for e in got] == [HandshakeComplete, ChannelOpened, Received]
    request = got[2].message
    lb = b.conn.local_channel(KEY_A)
    reply = m.IndexData(lb, request.id, 12, [m.Run(0, [b"header"], [LEAF], [])])
    answer = b.conn.data_to_send() + b.conn.send(m.Head(lb, 12, ROOT, SIG)) + b.conn.send(reply)
    a.conn.receive_data(answer)
    events = []
    while (ev := a.conn.next_event()) is not None:
        events.append(ev)
    assert events == [ChannelOpened(KEY_A), Received(KEY_A, m.Head(lb, 12, ROOT, SIG)),
                      Received(KEY_A, reply, m.IndexRequest(la, 1, b"/small.txt", 0, 65536))]


# --- a run through Connection and the tree ------------------------------------------

def test_a_run_travels_verifies_and_one_bad_block_is_pinned():
    from p2pfs import flat, tree

    blocks = [bytes([i]) * 4096 for i in range(100)]
    builder, held = tree.TreeBuilder(), {}
    for data in blocks:
        held.update((n.index, n) for n in builder.append(data))
    root, length = builder.root(), len(blocks)
    trusted = {p: held[p] for p in flat.full_roots(length)[:1]}  # say one peak came with an earlier reply

    def round_trip(liar, ahead=False):
        a, b = connected(known_b=[KEY_A])
        deliver(a, b, a.conn.open_channel(KEY_A))
        la, lb = a.conn.local_channel(KEY_A), b.conn.local_channel(KEY_A)
        start, count = 30, 64
        nodes = tree.range_proof_request(start, start + count, length, trusted.__contains__)
        b.events.clear()
        deliver(a, b, a.conn.send(m.Request(la, 9, start, count, length, nodes)))
        (req,) = [e.message for e in b.events]
        run = blocks[req.start:req.start + req.count]
        if liar:
            run = list(run)
            run[17] = run[17][:100] + b"\xff" + run[17][101:]
        leaves = [(held[2 * i].hash, held[2 * i].size) for i in range(req.start, req.start + req.count)]
        proof = tree.make_range_proof(req.start, req.start + req.count, req.length, req.nodes, held.get)
        a.events.clear()
        wire = b.conn.send(m.Data(lb, req.id, req.start, run, leaves, proof))
        if not ahead:
            deliver(b, a, wire)
            (ev,) = a.events
            assert ev.prepared is None
            data = ev.message.blocks
        else:  # as the peer driver does: decrypt, decode and hash in its worker thread
            assert a.conn.next_event() is None  # (sets the frame limit for the reply due)
            a.conn.receive_data(wire)
            a.conn.decrypt_ahead(lambda msg: [tree.leaf_node(msg.start + i, x)
                                              for i, x in enumerate(msg.blocks)])
            (ev,) = [a.conn.next_event()]
            assert a.conn.next_event() is None
            data = ev.prepared  # the climb takes the leaves: nothing hashed again
            assert data == [tree.leaf_node(i, x) for i, x in enumerate(run, start)]
        assert ev.request.nodes == nodes
        return tree.verify_range(ev.request.start, data, ev.message.nodes, length, root,
                                 trusted.get, ev.message.leaves)

    for ahead in (False, True):
        honest = round_trip(liar=False, ahead=ahead)
        assert honest.bad == [] and all(held[n.index] == n for n in honest.nodes)
        lying = round_trip(liar=True, ahead=ahead)
        assert lying.bad == [47]  # only that block; the other 63 verify and are kept
        assert {n.index for n in lying.nodes} == {n.index for n in honest.nodes}


# --- reading straight into the frame buffer ---------------------------------------

def test_get_buffer_reads_a_large_frames_rest_into_place():
    payloads = [b"small", bytes(range(256)) * 1000, b"", b"x" * 70000, b"tail"]
    stream = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder()
    got, pos, sizes = [], 0, []
    while pos < len(stream):
        view = dec.get_buffer(4096)
        n = min(len(view), len(stream) - pos)
        sizes.append(len(view))
        view[:n] = stream[pos:pos + n]
        dec.buffer_updated(n)  # the view is left alive on purpose: nothing may break
        pos += n
        while (f := dec.next_frame()) is not None:
            got.append(f)
    assert got == payloads
    # the first read holds "small" (9 bytes with its prefix) and the start of the
    # 256000-byte frame; the next read asks for exactly that frame's rest
    assert sizes[:2] == [4096, 4 + 256000 - (4096 - 9)]
    dec.feed(b"")
    assert dec.next_frame() is None
    with pytest.raises(RuntimeError):
        dec.get_buffer(10)
    with pytest.raises(ValueError):
        FrameDecoder().buffer_updated(1)


def test_back_to_back_large_frames_are_not_moved_to_the_buffers_front():
    """A socket that fills every read: a read that finishes one frame takes at
    most LARGE_FRAME of the next, so a frame begun late in the buffer is never
    moved to the front almost whole (which once cost 0.66 bytes moved, twice,
    per byte of a fetch)."""
    moved = []

    class Counting(FrameDecoder):
        __slots__ = ()

        def _room(self, n):
            pending = self._end - self._start
            if pending and self._end + n > len(self._buf) and pending + n <= len(self._buf):
                moved.append(pending)
            super()._room(n)

    from p2pfs.wire.frames import LARGE_FRAME, PREFIX_BYTES
    rnd = random.Random(3)
    payloads = [rnd.randbytes(rnd.choice([(1 << 20) + 60_000, 1 << 20, 200_000, 30]))
                for _ in range(40)]
    stream = b"".join(encode_frame(p) for p in payloads)
    dec, got, pos = Counting(), [], 0
    while pos < len(stream):
        view = dec.get_buffer(1 << 20)
        n = min(len(view), len(stream) - pos)
        view[:n] = stream[pos:pos + n]
        view.release()
        dec.buffer_updated(n)
        pos += n
        while (f := dec.next_frame()) is not None:
            got.append(f)
    assert got == payloads
    assert max(moved, default=0) <= LARGE_FRAME + PREFIX_BYTES, moved
    assert sum(moved) < len(stream) // 20


def test_feeding_mixed_with_get_buffer_and_the_buffer_is_kept():
    frames = [encode_frame(bytes([i]) * 100_000) for i in range(6)]
    dec = FrameDecoder()
    for i, f in enumerate(frames):
        if i % 2:
            dec.feed(f)
        else:
            view = dec.get_buffer(len(f))
            view[:len(f)] = f
            dec.buffer_updated(len(f))
        assert dec.next_frame() == bytes([i]) * 100_000
        if i == 0:
            kept = dec._buf
    assert dec._buf is kept  # one buffer for the decoder's life, not one per frame


def test_a_connection_fed_through_get_buffer():
    a, b = connected(known_b=[KEY_A])
    deliver(a, b, a.conn.open_channel(KEY_A))
    lb = b.conn.local_channel(KEY_A)
    wire = b.conn.send(m.Head(lb, 3, ROOT, SIG)) + b.conn.send(m.Have(lb, [(0, 3)]))
    a.events.clear()
    pos = 0
    while pos < len(wire):
        view = a.conn.get_buffer(7)
        n = min(len(view), len(wire) - pos)
        view[:n] = wire[pos:pos + n]
        a.conn.buffer_updated(n)
        pos += n
        while (ev := a.conn.next_event()) is not None:
            a.events.append(ev)
    assert [e.message for e in a.events] == [m.Head(lb, 3, ROOT, SIG), m.Have(lb, [(0, 3)])]


# --- what a connection that is asked nothing may cost --------------------------

def test_a_large_frame_only_while_a_reply_is_due():
    from p2pfs.wire.connection import UNASKED_FRAME
    big = b"z" * (UNASKED_FRAME + 1000)
    # asked for: a 1-block run of a large block arrives whole
    a, b, lb = _channel_with_request(lambda ch: m.Request(ch, 1, 0, 1, 1, []))
    assert a.conn.expects_data
    a.conn.receive_data(b.conn.send(m.Data(lb, 1, 0, [big], [LEAF], [])))
    ev = a.conn.next_event()
    assert isinstance(ev, Received) and bytes(ev.message.blocks[0]) == big
    assert not a.conn.expects_data
    # unasked: the same frame is refused from its length prefix, before it is buffered
    a2, b2 = connected(known_b=[KEY_A])
    deliver(a2, b2, a2.conn.open_channel(KEY_A))
    lb2 = b2.conn.local_channel(KEY_A)
    wire = _encrypt(b2, m.Data(lb2, 1, 0, [big], [LEAF], []))
    a2.conn.receive_data(wire[:4])
    with pytest.raises(ProtocolError, match="frame"):
        a2.conn.next_event()
    # while everything that is not a reply fits: the largest Have, unasked
    a3, b3 = connected(known_b=[KEY_A])
    deliver(a3, b3, a3.conn.open_channel(KEY_A))
    lb3 = b3.conn.local_channel(KEY_A)
    top = 1 << 63
    have = m.Have(lb3, [(top - 2 * i - 2, top - 2 * i - 1) for i in range(m.MAX_HAVE_RANGES)])
    a3.events.clear()
    deliver(b3, a3, b3.conn.send(have))
    assert [e.message for e in a3.events] == [have]


def test_ready_counts_the_buffer_only_from_a_whole_frame():
    dec = FrameDecoder()
    assert dec.ready == 0
    big = encode_frame(b"x" * 300_000)
    dec.feed(big[:3])
    assert dec.ready == 0  # not even a length yet
    dec.feed(big[3:-1])
    assert dec.ready == 0  # the first frame is not whole
    dec.feed(big[-1:] + encode_frame(b"y")[:2])
    assert dec.ready == len(big) + 2
    assert dec.next_frame() == b"x" * 300_000 and dec.ready == 0
