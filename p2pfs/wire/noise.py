"""Noise ``XX_25519_ChaChaPoly_BLAKE2b``: the handshake state machine (sans-IO).

Theory of operation (Noise spec rev. 34, sections 5 and 7.5)::

    XX:
      -> e
      <- e, ee, s, es
      -> s, se

* HASH is BLAKE2b-512 (HASHLEN 64, BLOCKLEN 128); HKDF is built from
  HMAC-BLAKE2b; the cipher is ChaCha20-Poly1305 (IETF) with the nonce
  4 zero bytes || u64le n.  X25519, the AEAD and key checks live in
  `p2pfs.crypto`; this module only arranges them.
* `Handshake.write_message` / `read_message` must alternate as the pattern
  says; calling them out of turn is our bug (RuntimeError).  Bytes from the
  peer that do not fit (wrong length, failed authentication, a low-order
  key) raise `ProtocolError` and leave the handshake unusable.
* After the third message `complete` is True, `handshake_hash` is the
  transcript hash (it binds channel capabilities to this session), and
  `split()` returns the two transport keys ``(initiator->responder,
  responder->initiator)``.
* Ephemeral private keys may be injected for the published test vectors;
  otherwise they are fresh random keys.
"""

from __future__ import annotations

import hashlib
import hmac

from .. import crypto
from ..errors import ProtocolError

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_BLAKE2b"
HASHLEN = 64
DHLEN = crypto.DH_BYTES
TAGLEN = crypto.AEAD_TAG_BYTES
MAX_NONCE = 2**64 - 1  # reserved by the spec; never used

# The three XX messages, as tokens, in order.
_PATTERN = (("e",), ("e", "ee", "s", "es"), ("s", "se"))


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASHLEN).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2b).digest()


def hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    """Noise HKDF with HMAC-BLAKE2b: 2 or 3 outputs of HASHLEN bytes."""
    temp = _hmac(chaining_key, ikm)
    out = [_hmac(temp, b"\x01")]
    for i in range(2, outputs + 1):
        out.append(_hmac(temp, out[-1] + bytes([i])))
    return out


class CipherState:
    """A key and a counting nonce.  Without a key, encryption is the identity."""

    __slots__ = ("key", "nonce")

    def __init__(self, key: bytes | None = None):
        self.key = key
        self.nonce = 0

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.key is None:
            return plaintext
        if self.nonce >= MAX_NONCE:
            raise RuntimeError("Noise nonce exhausted")
        out = crypto.aead_encrypt(self.key, self.nonce, ad, plaintext)
        self.nonce += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Raises ProtocolError if the ciphertext does not authenticate."""
        if self.key is None:
            return ciphertext
        if self.nonce >= MAX_NONCE:
            raise ProtocolError("peer exhausted the Noise nonce")
        if len(ciphertext) < TAGLEN:
            raise ProtocolError("peer sent a truncated Noise ciphertext")
        out = crypto.aead_decrypt(self.key, self.nonce, ad, ciphertext)
        self.nonce += 1
        return out


class _SymmetricState:
    __slots__ = ("h", "ck", "cipher")

    def __init__(self, protocol_name: bytes):
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = _hash(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(temp_k[:32])

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = hkdf(self.ck, b"", 2)
        return k1[:32], k2[:32]


class Handshake:
    """One side of a Noise XX handshake.

    `static_private` is this node's X25519 private key; `ephemeral_private`
    is only for test vectors.  Messages alternate: the initiator writes
    messages 0 and 2, the responder writes message 1.
    """

    def __init__(
        self,
        initiator: bool,
        static_private: bytes,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
    ):
        self.initiator = initiator
        self._s = static_private
        self._s_pub = crypto.x25519_public(static_private)
        if ephemeral_private is None:
            ephemeral_private, _ = crypto.x25519_keypair()
        self._e = ephemeral_private
        self._e_pub = crypto.x25519_public(ephemeral_private)
        self._re: bytes | None = None
        self.remote_static: bytes | None = None
        self._step = 0
        self._failed = False
        self._sym = _SymmetricState(PROTOCOL_NAME)
        self._sym.mix_hash(prologue)

    @property
    def complete(self) -> bool:
        return self._step == len(_PATTERN)

    @property
    def handshake_hash(self) -> bytes:
        if not self.complete:
            raise RuntimeError("handshake not complete")
        return self._sym.h

    @property
    def my_turn(self) -> bool:
        """True if the next message is ours to write."""
        return not self.complete and (self._step % 2 == 0) == self.initiator

    def _dh(self, token: str) -> bytes:
        # ee, es, se name (initiator key, responder key).
        if token == "ee":
            return crypto.x25519(self._e, self._re)
        if token == "es":
            return crypto.x25519(self._e, self.remote_static) if self.initiator else crypto.x25519(self._s, self._re)
        if token == "se":
            return crypto.x25519(self._s, self._re) if self.initiator else crypto.x25519(self._e, self.remote_static)
        raise AssertionError(token)

    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message, carrying `payload` (encrypted once a key exists)."""
        if self._failed or not self.my_turn:
            raise RuntimeError("not our turn to write a handshake message")
        out = bytearray()
        for token in _PATTERN[self._step]:
            if token == "e":
                out += self._e_pub
                self._sym.mix_hash(self._e_pub)
            elif token == "s":
                out += self._sym.encrypt_and_hash(self._s_pub)
            else:
                self._sym.mix_key(self._dh(token))
        out += self._sym.encrypt_and_hash(payload)
        self._step += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Consume the peer's next handshake message; return its payload.

        Raises ProtocolError on anything malformed; the handshake is then dead.
        """
        if self._failed:
            raise ProtocolError("handshake already failed")
        if self.complete or self.my_turn:
            raise ProtocolError("peer sent a handshake message out of turn")
        try:
            payload = self._read(bytes(message))
        except ProtocolError:
            self._failed = True
            raise
        self._step += 1
        return payload

    def _read(self, message: bytes) -> bytes:
        pos = 0
        for token in _PATTERN[self._step]:
            if token == "e":
                if len(message) - pos < DHLEN:
                    raise ProtocolError("peer sent a truncated handshake message")
                self._re = message[pos:pos + DHLEN]
                pos += DHLEN
                self._sym.mix_hash(self._re)
            elif token == "s":
                n = DHLEN + TAGLEN
                if len(message) - pos < n:
                    raise ProtocolError("peer sent a truncated handshake message")
                self.remote_static = self._sym.decrypt_and_hash(message[pos:pos + n])
                pos += n
            else:
                self._sym.mix_key(self._dh(token))
        return self._sym.decrypt_and_hash(message[pos:])

    def split(self) -> tuple[bytes, bytes]:
        """(initiator-to-responder key, responder-to-initiator key), 32 bytes each."""
        if not self.complete:
            raise RuntimeError("handshake not complete")
        return self._sym.split()
