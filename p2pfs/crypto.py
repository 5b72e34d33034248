"""Keys, signatures and ciphers: the only module that imports PyNaCl (and,
for the transport ciphers, `cryptography`).

Every function checks the lengths of keys and signatures where they enter,
so that callers further in can trust them.

* Drive keys are Ed25519 public keys (32 bytes).  A drive's secret is the
  32-byte Ed25519 seed.  Users see keys as 52 lowercase z-base-32 characters;
  on input we also take 64 hex digits and a ``p2pfs://`` prefix.
* A signed head is a signature over fixed-layout bytes, never over a
  re-serialised object::

      b"p2pfs/head/v1" || drive key (32) || u64le length || tree root (32)

* The discovery key, which is all the network ever sees of a drive, is
  BLAKE3 derive_key("p2pfs discovery v1", drive key).
* BEP 44 mutable items (the DHT's copy of a drive's latest head) are signed
  with the drive's key over BEP 44's fixed layout (`bep44_message`); a
  drive's own items are keyed by its *blinded* key (`blinded_key`), so
  the DHT never sees the drive key.
* The Noise primitives used by `p2pfs.wire` are here too: X25519 and
  ChaCha20-Poly1305 (IETF, Noise nonce layout), from libsodium.
* So are the transport ciphers that carry every frame after the handshake:
  AES-256-GCM and ChaCha20-Poly1305 from OpenSSL (`cryptography`), keyed
  per direction and cipher from the Noise split, with counter nonces and a
  new key every `REKEY_INTERVAL` frames (see `TransportEncryptor`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct

import blake3
import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .errors import ProtocolError, UsageError, VerificationError

PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
SIGNATURE_BYTES = 64
HASH_BYTES = 32
HEAD_NAMESPACE = b"p2pfs/head/v1"
DISCOVERY_CONTEXT = "p2pfs discovery v1"
URL_PREFIX = "p2pfs://"

_ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"
_ZBASE32_INDEX = {c: i for i, c in enumerate(_ZBASE32)}
KEY_TEXT_LENGTH = 52  # ceil(256 / 5)


def _check(value: bytes, length: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != length:
        raise ValueError(f"{what} must be {length} bytes")
    return bytes(value)


# --- Ed25519 drive keys and signed heads -------------------------------------

def generate_keypair() -> tuple[bytes, bytes]:
    """A new drive key pair: (public key, secret seed)."""
    signing = nacl.signing.SigningKey.generate()
    return bytes(signing.verify_key), bytes(signing)


def public_from_seed(seed: bytes) -> bytes:
    """The public key belonging to a 32-byte secret seed."""
    return bytes(nacl.signing.SigningKey(_check(seed, SEED_BYTES, "secret seed")).verify_key)


def head_message(drive_key: bytes, length: int, root: bytes) -> bytes:
    """The exact bytes an owner signs for version `length`."""
    _check(drive_key, PUBLIC_KEY_BYTES, "drive key")
    _check(root, HASH_BYTES, "tree root")
    if not 0 <= length < 2**64:
        raise ValueError("length out of range")
    return HEAD_NAMESPACE + drive_key + struct.pack("<Q", length) + root


def sign_head(seed: bytes, drive_key: bytes, length: int, root: bytes) -> bytes:
    """Sign the head (drive_key, length, root) with the drive's secret seed."""
    signing = nacl.signing.SigningKey(_check(seed, SEED_BYTES, "secret seed"))
    if bytes(signing.verify_key) != drive_key:
        raise ValueError("secret seed does not belong to this drive key")
    return signing.sign(head_message(drive_key, length, root)).signature


def verify_head(drive_key: bytes, length: int, root: bytes, signature: bytes) -> None:
    """Check a signed head.  Raises VerificationError if it is not the owner's."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise VerificationError("signed head has a malformed signature")
    if not isinstance(root, bytes) or len(root) != HASH_BYTES:
        raise VerificationError("signed head has a malformed root")
    try:
        nacl.signing.VerifyKey(_check(drive_key, PUBLIC_KEY_BYTES, "drive key")).verify(
            head_message(drive_key, length, root), signature
        )
    except nacl.exceptions.BadSignatureError:
        raise VerificationError(
            f"signature of version length {length} does not verify against the drive key"
        ) from None


def discovery_key(drive_key: bytes) -> bytes:
    """The 32-byte name under which the network sees a drive."""
    _check(drive_key, PUBLIC_KEY_BYTES, "drive key")
    return blake3.blake3(drive_key, derive_key_context=DISCOVERY_CONTEXT).digest()


# --- BEP 44 mutable items ------------------------------------------------------

MAX_BEP44_SALT = 64


def bep44_message(salt: bytes, seq: int, value: bytes) -> bytes:
    """The bytes a BEP 44 mutable item's signature covers.

    `value` is the item's value already bencoded; the layout is BEP 44's:
    ``4:salt<len>:<salt>`` (only for a non-empty salt) ``3:seqi<seq>e1:v`` value."""
    if not isinstance(salt, bytes) or len(salt) > MAX_BEP44_SALT:
        raise ValueError(f"BEP 44 salt must be at most {MAX_BEP44_SALT} bytes")
    if type(seq) is not int or not 0 <= seq < 2**63:
        raise ValueError("BEP 44 sequence number out of range")
    prefix = b"4:salt%d:%s" % (len(salt), salt) if salt else b""
    return prefix + b"3:seqi%de1:v" % seq + value


def sign_bep44(seed: bytes, salt: bytes, seq: int, value: bytes) -> bytes:
    """Sign a BEP 44 item (value bencoded) with a drive's secret seed."""
    signing = nacl.signing.SigningKey(_check(seed, SEED_BYTES, "secret seed"))
    return signing.sign(bep44_message(salt, seq, value)).signature


# --- the blinded key of a drive's DHT items --------------------------------------
#
# A drive's head travels in the DHT as a BEP 44 item, which names its public
# key in every packet.  So that the DHT never learns a drive key, the item is
# keyed by a *blinded* key A' = h*A, with h = SHA-512("p2pfs/dht/blind/v1" ||
# A) reduced mod l (the blinding of Tor's v3 onion services).  Anyone who
# knows the drive key computes A'; A' does not give A away.  The owner signs
# with the blinded secret scalar a' = h*a mod l, as standard Ed25519 over the
# BEP 44 message (nonce from a blinded prefix), so that any Ed25519 verifier
# (libtorrent included) checks it against A'.

BLIND_CONTEXT = b"p2pfs/dht/blind/v1"
BLIND_PREFIX_CONTEXT = b"p2pfs/dht/blind-prefix/v1"


def _sha512(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()


def _blind_factor(drive_key: bytes) -> bytes:
    return sodium.crypto_core_ed25519_scalar_reduce(_sha512(BLIND_CONTEXT + drive_key))


def blinded_key(drive_key: bytes) -> bytes:
    """The public key a drive's DHT items are stored under (see above).
    Raises VerificationError for a drive key that is not a usable point."""
    _check(drive_key, PUBLIC_KEY_BYTES, "drive key")
    try:
        return sodium.crypto_scalarmult_ed25519_noclamp(_blind_factor(drive_key), drive_key)
    except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError, ValueError):
        raise VerificationError("drive key is not a valid Ed25519 point") from None


def blinded_secret(seed: bytes) -> bytes:
    """The expanded Ed25519 secret (scalar a' || nonce prefix, 64 bytes, as
    ref10 and orlp/ed25519 keep it) that signs for `blinded_key` of the
    drive whose secret seed this is."""
    digest = _sha512(_check(seed, SEED_BYTES, "secret seed"))
    clamped = bytearray(digest[:32])
    clamped[0] &= 248
    clamped[31] &= 127
    clamped[31] |= 64
    a = sodium.crypto_core_ed25519_scalar_reduce(bytes(clamped) + bytes(32))
    drive_key = sodium.crypto_scalarmult_ed25519_base_noclamp(a)
    a_blind = sodium.crypto_core_ed25519_scalar_mul(_blind_factor(drive_key), a)
    return a_blind + _sha512(BLIND_PREFIX_CONTEXT + digest[32:])[:32]


def sign_bep44_blinded(seed: bytes, salt: bytes, seq: int, value: bytes) -> bytes:
    """The owner's signature of a BEP 44 item under its drive's blinded key
    (standard Ed25519 with the expanded secret of `blinded_secret`)."""
    expanded = blinded_secret(seed)
    a_blind, prefix = expanded[:32], expanded[32:]
    public = sodium.crypto_scalarmult_ed25519_base_noclamp(a_blind)
    message = bep44_message(salt, seq, value)
    r = sodium.crypto_core_ed25519_scalar_reduce(_sha512(prefix + message))
    big_r = sodium.crypto_scalarmult_ed25519_base_noclamp(r)
    k = sodium.crypto_core_ed25519_scalar_reduce(_sha512(big_r + public + message))
    return big_r + sodium.crypto_core_ed25519_scalar_add(r, sodium.crypto_core_ed25519_scalar_mul(k, a_blind))


DHT_HEAD_SALT = b"p2pfs"
DHT_HEAD_BYTES = 8 + 32 + 64


def dht_head_value(length: int, root: bytes, signature: bytes) -> bytes:
    """The BEP 44 value (bencoded) carrying a signed head:
    ``104:`` u64le length || root (32) || head signature (64)."""
    raw = struct.pack("<Q", length) + _check(root, HASH_BYTES, "tree root") + \
        _check(signature, SIGNATURE_BYTES, "head signature")
    return b"%d:%s" % (DHT_HEAD_BYTES, raw)


def sign_dht_head(seed: bytes, length: int, root: bytes, signature: bytes) -> bytes:
    """The owner's BEP 44 signature of a head's DHT item (under the blinded key)."""
    return sign_bep44_blinded(seed, DHT_HEAD_SALT, length, dht_head_value(length, root, signature))


def verify_dht_head(drive_key: bytes, length: int, root: bytes, signature: bytes,
                    dht_signature: bytes) -> None:
    """VerificationError unless `dht_signature` is the owner's for this head's DHT item."""
    verify_bep44(blinded_key(drive_key), DHT_HEAD_SALT, length,
                 dht_head_value(length, root, signature), dht_signature)


def verify_bep44(public_key: bytes, salt: bytes, seq: int, value: bytes, signature: bytes) -> None:
    """Check a BEP 44 item's signature.  Raises VerificationError if it is not the key's."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise VerificationError("DHT item has a malformed signature")
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise VerificationError("DHT item has a malformed public key")
    try:
        nacl.signing.VerifyKey(public_key).verify(bep44_message(salt, seq, value), signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise VerificationError(f"DHT item seq {seq} does not verify against its key") from None


# --- key text ----------------------------------------------------------------

def encode_key(key: bytes) -> str:
    """32 bytes -> 52 lowercase z-base-32 characters."""
    _check(key, PUBLIC_KEY_BYTES, "key")
    n = int.from_bytes(key, "big") << 4  # pad 256 bits to 260 = 52 * 5
    return "".join(_ZBASE32[(n >> (5 * i)) & 31] for i in reversed(range(KEY_TEXT_LENGTH)))


def decode_key(text: str) -> bytes:
    """Parse a drive key given by a user: z-base-32, hex, with or without p2pfs://.

    Raises UsageError with a message fit for the user.
    """
    raw = text.strip()
    if raw.lower().startswith(URL_PREFIX):
        raw = raw[len(URL_PREFIX):].rstrip("/")
    if len(raw) == 64:
        try:
            return bytes.fromhex(raw)
        except ValueError:
            pass
    low = raw.lower()
    if len(low) == KEY_TEXT_LENGTH and all(c in _ZBASE32_INDEX for c in low):
        n = 0
        for c in low:
            n = (n << 5) | _ZBASE32_INDEX[c]
        if n & 0xF == 0:
            return (n >> 4).to_bytes(32, "big")
    shown = text if len(text) <= 70 else text[:67] + "..."
    raise UsageError(
        f"{shown!r} is not a drive key: expected 52 z-base-32 characters "
        "(as printed by 'p2pfs create'), 64 hex digits, or p2pfs://KEY"
    )


# --- Noise primitives (X25519, ChaChaPoly, BLAKE2b) ----------------------------

DH_BYTES = 32
AEAD_TAG_BYTES = 16


def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair: (private, public)."""
    public, private = sodium.crypto_box_keypair()
    return private, public


def x25519_public(private: bytes) -> bytes:
    return sodium.crypto_scalarmult_base(_check(private, DH_BYTES, "X25519 private key"))


def x25519(private: bytes, public: bytes) -> bytes:
    """Diffie-Hellman.  A peer's malformed or low-order public key -> ProtocolError."""
    if not isinstance(public, bytes) or len(public) != DH_BYTES:
        raise ProtocolError("peer sent a malformed X25519 public key")
    try:
        shared = sodium.crypto_scalarmult(_check(private, DH_BYTES, "X25519 private key"), public)
    except Exception:  # libsodium refuses low-order points
        raise ProtocolError("peer sent a low-order X25519 public key") from None
    if not any(shared):
        raise ProtocolError("peer sent a low-order X25519 public key")
    return shared


def _noise_nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + struct.pack("<Q", n)


def aead_encrypt(key: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    """ChaCha20-Poly1305 (IETF) with the Noise nonce layout: 4 zero bytes, u64le n."""
    return sodium.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _noise_nonce(n), key)


def aead_decrypt(key: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    """Inverse of aead_encrypt.  A forged or damaged ciphertext -> ProtocolError."""
    try:
        return sodium.crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _noise_nonce(n), key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise ProtocolError("peer sent a frame that fails authentication") from None


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# --- transport ciphers, keyed from the Noise split ------------------------------
#
# Measured here (64 KiB, one core): OpenSSL AES-256-GCM 12.3 GB/s, OpenSSL
# ChaCha20-Poly1305 3.65 GB/s, libsodium secretstream (wire version 1) 1.6 GB/s.  AES comes
# first only on CPUs with AES instructions; without them software AES is
# slower than ChaCha20 and not constant-time.

AES256GCM = "aes256gcm"
CHACHA20POLY1305 = "chacha20poly1305"
TRANSPORT_CIPHERS = (AES256GCM, CHACHA20POLY1305)   # every cipher this build speaks
_AEADS = {AES256GCM: AESGCM, CHACHA20POLY1305: ChaCha20Poly1305}
TRANSPORT_KEY_BYTES = 32
TRANSPORT_TAG_BYTES = 16
TRANSPORT_NONCE_BYTES = 12
# Frames under one key.  A frame is at most ~1 MiB (2^16 AES blocks), so one
# key encrypts at most 2^36 AES blocks: the GCM birthday bound leaves a
# distinguishing advantage below 2^-56 per key.  ChaCha20 needs no such
# bound at this scale; one rule keeps both sides simple.
REKEY_INTERVAL = 1 << 20
CIPHERS_ENV = "P2PFS_CIPHERS"
_TRANSPORT_LABEL = b"p2pfs/transport/v2 "
_REKEY_LABEL = b"p2pfs/rekey/v2"
_TAG_ROOM = bytes(TRANSPORT_TAG_BYTES)


@functools.cache
def cpu_has_aes(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True if the CPU announces AES instructions (x86 ``flags`` or ARM
    ``Features`` in /proc/cpuinfo); read once.  False where it cannot tell."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def local_ciphers(environ=os.environ) -> tuple[str, ...]:
    """This node's transport ciphers, most preferred first.

    ``$P2PFS_CIPHERS`` (comma-separated names) overrides the default, which
    puts AES-256-GCM first only where the CPU has AES instructions.  An
    unknown name or an empty list -> UsageError."""
    override = environ.get(CIPHERS_ENV)
    if override is None:
        if cpu_has_aes():
            return (AES256GCM, CHACHA20POLY1305)
        return (CHACHA20POLY1305, AES256GCM)
    names = [n.strip() for n in override.split(",") if n.strip()]
    unknown = [n for n in names if n not in _AEADS]
    if unknown or not names:
        raise UsageError(
            f"{CIPHERS_ENV}={override!r} is not a list of ciphers: "
            f"give one or more of {', '.join(TRANSPORT_CIPHERS)}, comma-separated")
    return tuple(dict.fromkeys(names))


def transport_key(split_key: bytes, cipher: str) -> bytes:
    """The first key of one direction: BLAKE2b-256 keyed with that direction's
    Noise split key, of ``"p2pfs/transport/v2 " || cipher name``."""
    if cipher not in _AEADS:
        raise ValueError(f"unknown transport cipher {cipher!r}")
    return hashlib.blake2b(_TRANSPORT_LABEL + cipher.encode(), key=_check(split_key, 32, "split key"),
                           digest_size=TRANSPORT_KEY_BYTES).digest()


def next_transport_key(key: bytes) -> bytes:
    """The key after `key` (every `REKEY_INTERVAL` frames): BLAKE2b-256 keyed
    with the old key, of ``"p2pfs/rekey/v2"``."""
    return hashlib.blake2b(_REKEY_LABEL, key=key, digest_size=TRANSPORT_KEY_BYTES).digest()


def transport_aead(cipher: str, key: bytes):
    """The AEAD of a transport cipher under `key`: ``encrypt(nonce, data, ad)``
    / ``decrypt(nonce, data, ad)`` (OpenSSL, through `cryptography`)."""
    if cipher not in _AEADS:
        raise ValueError(f"unknown transport cipher {cipher!r}")
    return _AEADS[cipher](_check(key, TRANSPORT_KEY_BYTES, "transport key"))


class _TransportState:
    """A cipher, its current key and the frame counter under that key.

    Frame ``n`` under a key uses the 96-bit nonce ``u96le(n)``; after
    `REKEY_INTERVAL` frames the key becomes `next_transport_key(key)` and
    `n` starts again at 0, so no (key, nonce) pair ever repeats."""

    __slots__ = ("cipher", "_key", "_aead", "_n")

    def __init__(self, cipher: str, key: bytes):
        self._aead = transport_aead(cipher, key)
        self.cipher = cipher
        self._key = bytes(key)
        self._n = 0

    def _next(self):
        """(AEAD, nonce) for the next frame; moves the counter and the key on."""
        aead, n = self._aead, self._n
        if n + 1 == REKEY_INTERVAL:
            self._key = next_transport_key(self._key)
            self._aead = transport_aead(self.cipher, self._key)
            self._n = 0
        else:
            self._n = n + 1
        return aead, n.to_bytes(TRANSPORT_NONCE_BYTES, "little")


class TransportEncryptor(_TransportState):
    """The sending half of a connection's transport encryption."""

    __slots__ = ()

    def seal(self, buf: bytearray, start: int) -> None:
        """Encrypt ``buf[start:]`` in place and append its 16-byte tag.

        In place, exactly (the output begins where the input does, which
        OpenSSL supports): the frame is encoded once into `buf` and never
        copied again."""
        end = len(buf)
        buf += _TAG_ROOM
        aead, nonce = self._next()
        with memoryview(buf) as view:
            aead.encrypt_into(nonce, view[start:end], None, view[start:])

    def encrypt(self, plaintext: bytes) -> bytes:
        """`seal` for a plaintext held elsewhere: returns ciphertext || tag."""
        buf = bytearray(plaintext)
        self.seal(buf, 0)
        return bytes(buf)


class TransportDecryptor(_TransportState):
    """The receiving half.  A damaged, forged, reordered or replayed frame -> ProtocolError."""

    __slots__ = ()

    def decrypt(self, ciphertext) -> bytes:
        """The plaintext of the next frame (`ciphertext` is any bytes-like object)."""
        if len(ciphertext) < TRANSPORT_TAG_BYTES:
            raise ProtocolError("peer sent a truncated encrypted frame")
        aead, nonce = self._next()
        try:
            return aead.decrypt(nonce, ciphertext, None)
        except InvalidTag:
            raise ProtocolError("peer sent a frame that fails authentication") from None
