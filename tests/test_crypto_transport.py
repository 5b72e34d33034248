"""Transport ciphers: known answers, the frame nonces and rekeying, the local preference."""

import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from p2pfs import crypto
from p2pfs.errors import ProtocolError, UsageError

h = bytes.fromhex

# RFC 8439, section 2.8.2 (the AEAD_CHACHA20_POLY1305 example).
RFC8439 = dict(
    key=h("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"),
    nonce=h("070000004041424344454647"),
    ad=h("50515253c0c1c2c3c4c5c6c7"),
    plaintext=b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
              b"the future, sunscreen would be it.",
    ciphertext=h("d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69"
                 "da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad6759455"
                 "85808b4831d7bc3ff4def08e4b7a9de576d26586cec64b6116"),
    tag=h("1ae10b594f09e26a7e902ecbd0600691"),
)
# The GCM specification (McGrew and Viega, as used by NIST): test cases 14 and 16, AES-256.
GCM_14 = dict(key=bytes(32), nonce=bytes(12), ad=b"", plaintext=bytes(16),
              ciphertext=h("cea7403d4d606b6e074ec5d3baf39d18"), tag=h("d0d1c8a799996bf0265b98b5d48ab919"))
GCM_16 = dict(
    key=h("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308"),
    nonce=h("cafebabefacedbaddecaf888"),
    ad=h("feedfacedeadbeeffeedfacedeadbeefabaddad2"),
    plaintext=h("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e24"
                "49a6b525b16aedf5aa0de657ba637b39"),
    ciphertext=h("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b10"
                 "56828838c5f61e6393ba7a0abcc9f662"),
    tag=h("76fc6ece0f4e1768cddf8853bb2d551b"),
)


@pytest.mark.parametrize("cipher,vector", [
    ("chacha20poly1305", RFC8439), ("aes256gcm", GCM_14), ("aes256gcm", GCM_16),
], ids=["rfc8439-2.8.2", "gcm-case-14", "gcm-case-16"])
def test_known_answers(cipher, vector):
    aead = crypto.transport_aead(cipher, vector["key"])
    sealed = vector["ciphertext"] + vector["tag"]
    assert aead.encrypt(vector["nonce"], vector["plaintext"], vector["ad"] or None) == sealed
    assert aead.decrypt(vector["nonce"], sealed, vector["ad"] or None) == vector["plaintext"]


INDEPENDENT = {"aes256gcm": AESGCM, "chacha20poly1305": ChaCha20Poly1305}


@pytest.mark.parametrize("cipher", crypto.TRANSPORT_CIPHERS)
def test_frames_use_the_derived_key_and_counter_nonces(cipher):
    split = bytes(range(32))
    key = crypto.transport_key(split, cipher)
    assert key == hashlib.blake2b(b"p2pfs/transport/v2 " + cipher.encode(), key=split, digest_size=32).digest()
    assert crypto.transport_key(split, "aes256gcm") != crypto.transport_key(split, "chacha20poly1305")
    enc = crypto.TransportEncryptor(cipher, key)
    dec = crypto.TransportDecryptor(cipher, key)
    reference = INDEPENDENT[cipher](key)
    for n, plaintext in enumerate([b"first", b"", b"x" * 70000, b"last"]):
        buf = bytearray(b"HDR!" + plaintext)
        enc.seal(buf, 4)  # in place, after a 4-byte prefix left alone
        assert buf[:4] == b"HDR!"
        assert bytes(buf[4:]) == reference.encrypt(n.to_bytes(12, "little"), plaintext, None)
        assert dec.decrypt(memoryview(buf)[4:]) == plaintext


@pytest.mark.parametrize("cipher", crypto.TRANSPORT_CIPHERS)
def test_rekey_after_the_interval(cipher):
    key0 = crypto.transport_key(bytes(32), cipher)
    key1 = hashlib.blake2b(b"p2pfs/rekey/v2", key=key0, digest_size=32).digest()
    assert crypto.next_transport_key(key0) == key1
    enc, dec = crypto.TransportEncryptor(cipher, key0), crypto.TransportDecryptor(cipher, key0)
    last = crypto.REKEY_INTERVAL - 1
    enc._n = dec._n = last - 1  # skip ahead: 2^20 real frames take too long here
    frames = [enc.encrypt(b"frame %d" % i) for i in range(3)]
    expect = [(key0, last - 1), (key0, last), (key1, 0)]
    for frame, (key, n), i in zip(frames, expect, range(3)):
        assert frame == INDEPENDENT[cipher](key).encrypt(n.to_bytes(12, "little"), b"frame %d" % i, None)
        assert dec.decrypt(frame) == b"frame %d" % i


@pytest.mark.parametrize("cipher", crypto.TRANSPORT_CIPHERS)
def test_damaged_replayed_reordered_or_short_frames_fail(cipher):
    key = crypto.transport_key(bytes(32), cipher)
    enc = crypto.TransportEncryptor(cipher, key)
    a, b = enc.encrypt(b"one"), enc.encrypt(b"two")
    flipped = bytearray(a)
    flipped[1] ^= 1
    for frames in ([bytes(flipped)], [a, a], [b], [a[:15]], [a[:-1]]):
        dec = crypto.TransportDecryptor(cipher, key)
        with pytest.raises(ProtocolError):
            for f in frames:
                dec.decrypt(f)
    with pytest.raises(ProtocolError):  # the other direction's key
        crypto.TransportDecryptor(cipher, crypto.transport_key(bytes([1]) * 32, cipher)).decrypt(a)
    other = "chacha20poly1305" if cipher == "aes256gcm" else "aes256gcm"
    with pytest.raises(ProtocolError):  # the other cipher
        crypto.TransportDecryptor(other, key).decrypt(a)


def test_unknown_cipher_is_our_bug():
    with pytest.raises(ValueError):
        crypto.transport_key(bytes(32), "rot13")
    with pytest.raises(ValueError):
        crypto.TransportEncryptor("rot13", bytes(32))
    with pytest.raises(ValueError):
        crypto.TransportEncryptor("aes256gcm", bytes(31))


@pytest.mark.parametrize("text,flag", [
    ("processor\t: 0\nflags\t\t: fpu vme sse2 aes avx2\n", True),
    ("processor\t: 0\nflags\t\t: fpu vme sse2 avx2 vaes_x\n", False),
    ("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd\n", False),
])
def test_cpu_aes_flag(tmp_path, text, flag):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert crypto.cpu_has_aes(str(path)) is flag
    assert crypto.cpu_has_aes(str(tmp_path / "missing")) is False


def test_local_preference_and_override():
    default = crypto.local_ciphers({})
    assert set(default) == set(crypto.TRANSPORT_CIPHERS)
    assert default[0] == ("aes256gcm" if crypto.cpu_has_aes() else "chacha20poly1305")
    assert crypto.local_ciphers({"P2PFS_CIPHERS": "chacha20poly1305"}) == ("chacha20poly1305",)
    assert crypto.local_ciphers({"P2PFS_CIPHERS": " chacha20poly1305, aes256gcm,chacha20poly1305"}) == (
        "chacha20poly1305", "aes256gcm")
    for bad in ("", " , ", "aes128gcm", "aes256gcm,rot13"):
        with pytest.raises(UsageError, match="P2PFS_CIPHERS"):
            crypto.local_ciphers({"P2PFS_CIPHERS": bad})
