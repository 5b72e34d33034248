"""Noise XX_25519_ChaChaPoly_BLAKE2b against published test vectors (cacophony, snow)."""

import json
import pathlib

import pytest

from p2pfs import crypto
from p2pfs.errors import ProtocolError
from p2pfs.wire.noise import PROTOCOL_NAME, CipherState, Handshake

VECTORS = json.loads((pathlib.Path(__file__).parent / "data" / "noise-vectors.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["_source"])
def test_published_vector(vector):
    assert vector["protocol_name"].encode() == PROTOCOL_NAME
    h = bytes.fromhex
    init = Handshake(True, h(vector["init_static"]), h(vector["init_prologue"]), h(vector["init_ephemeral"]))
    resp = Handshake(False, h(vector["resp_static"]), h(vector["resp_prologue"]), h(vector["resp_ephemeral"]))
    messages = vector["messages"]
    assert len(messages) > 3
    for i, m in enumerate(messages[:3]):
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        ciphertext = writer.write_message(h(m["payload"]))
        assert ciphertext.hex() == m["ciphertext"]
        assert reader.read_message(ciphertext) == h(m["payload"])
    assert init.complete and resp.complete
    assert init.handshake_hash == resp.handshake_hash
    if "handshake_hash" in vector:
        assert init.handshake_hash.hex() == vector["handshake_hash"]
    assert init.remote_static == crypto.x25519_public(h(vector["resp_static"]))
    assert resp.remote_static == crypto.x25519_public(h(vector["init_static"]))
    k1, k2 = init.split()
    assert resp.split() == (k1, k2)
    send = {True: CipherState(k1), False: CipherState(k2)}
    recv = {True: CipherState(k2), False: CipherState(k1)}
    for i, m in enumerate(messages[3:], start=3):
        from_initiator = i % 2 == 0
        ciphertext = send[from_initiator].encrypt_with_ad(b"", h(m["payload"]))
        assert ciphertext.hex() == m["ciphertext"]
        assert recv[not from_initiator].decrypt_with_ad(b"", ciphertext) == h(m["payload"])


def _pair():
    a, _ = crypto.x25519_keypair()
    b, _ = crypto.x25519_keypair()
    return Handshake(True, a, b"p"), Handshake(False, b, b"p")


def test_tampered_message_is_protocol_error_and_kills_handshake():
    init, resp = _pair()
    resp.read_message(init.write_message())
    m2 = bytearray(resp.write_message(b"hello"))
    m2[40] ^= 1
    with pytest.raises(ProtocolError):
        init.read_message(bytes(m2))
    with pytest.raises(ProtocolError):
        init.read_message(bytes(m2))


def test_prologue_mismatch_fails():
    a, _ = crypto.x25519_keypair()
    b, _ = crypto.x25519_keypair()
    init, resp = Handshake(True, a, b"one"), Handshake(False, b, b"two")
    resp.read_message(init.write_message())
    with pytest.raises(ProtocolError):
        init.read_message(resp.write_message())


def test_out_of_turn():
    init, resp = _pair()
    with pytest.raises(ProtocolError):
        init.read_message(b"x" * 32)
    with pytest.raises(RuntimeError):
        resp.write_message()


def test_truncated_and_low_order_keys():
    init, resp = _pair()
    with pytest.raises(ProtocolError):
        resp.read_message(b"\x00" * 31)
    init, resp = _pair()
    resp.read_message(b"\x00" * 32)  # 'e' is only hashed when read ...
    with pytest.raises(ProtocolError):
        resp.write_message()  # ... the ee DH with a low-order point fails
