"""BEP 44 items: what a mutable or immutable DHT item is and how it is checked.

A mutable item is stored under target = SHA-1(public key || salt) and is
valid when its Ed25519 signature over BEP 44's layout
(`crypto.bep44_message`) verifies against the key.  An immutable item is
stored under SHA-1(value).  Values are kept bencoded: the exact bytes that
were hashed or signed.  Pure: no clock, no sockets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .... import crypto
from ....errors import VerificationError
from .krpc import MAX_SALT, MAX_SEQ, MAX_VALUE


def mutable_target(public_key: bytes, salt: bytes = b"") -> bytes:
    return hashlib.sha1(public_key + salt).digest()


def immutable_target(value: bytes) -> bytes:
    return hashlib.sha1(value).digest()


@dataclass(frozen=True, slots=True)
class MutableItem:
    """A signed BEP 44 mutable item; `value` is bencoded."""

    key: bytes
    salt: bytes
    seq: int
    value: bytes
    signature: bytes

    @property
    def target(self) -> bytes:
        return mutable_target(self.key, self.salt)

    def verify(self) -> None:
        """Raises VerificationError unless the item is well-formed and signed by `key`."""
        if len(self.value) > MAX_VALUE or len(self.salt) > MAX_SALT or not 0 <= self.seq <= MAX_SEQ:
            raise VerificationError(f"DHT item seq {self.seq} breaks BEP 44's limits")
        crypto.verify_bep44(self.key, self.salt, self.seq, self.value, self.signature)

    def is_valid(self) -> bool:
        try:
            self.verify()
        except VerificationError:
            return False
        return True


def sign_item(seed: bytes, salt: bytes, seq: int, value: bytes) -> MutableItem:
    """A new mutable item signed with an Ed25519 secret seed."""
    return MutableItem(crypto.public_from_seed(seed), salt, seq, value,
                       crypto.sign_bep44(seed, salt, seq, value))
