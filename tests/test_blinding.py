"""The blinded key a drive's DHT items are stored under (crypto.blinded_key)."""

from __future__ import annotations

import nacl.bindings as sodium
import pytest

from p2pfs import crypto
from p2pfs.errors import VerificationError


def test_blinded_key_is_derived_from_the_drive_key_alone_and_hides_it():
    keys = [crypto.generate_keypair() for _ in range(20)]
    blinded = {crypto.blinded_key(k) for k, _ in keys}
    assert len(blinded) == 20 and not blinded & {k for k, _ in keys}
    for key, seed in keys:
        b = crypto.blinded_key(key)
        assert crypto.blinded_key(key) == b and len(b) == 32
        # the owner's blinded secret is the scalar behind it
        expanded = crypto.blinded_secret(seed)
        assert sodium.crypto_scalarmult_ed25519_base_noclamp(expanded[:32]) == b


def test_blinded_signatures_verify_only_under_the_blinded_key():
    key, seed = crypto.generate_keypair()
    other, _ = crypto.generate_keypair()
    sig = crypto.sign_bep44_blinded(seed, b"p2pfs", 9, b"3:abc")
    crypto.verify_bep44(crypto.blinded_key(key), b"p2pfs", 9, b"3:abc", sig)
    for public, seq, value in [(key, 9, b"3:abc"), (crypto.blinded_key(other), 9, b"3:abc"),
                               (crypto.blinded_key(key), 10, b"3:abc"),
                               (crypto.blinded_key(key), 9, b"3:abd")]:
        with pytest.raises(VerificationError):
            crypto.verify_bep44(public, b"p2pfs", seq, value, sig)


def test_a_drive_key_that_is_no_point_is_refused():
    with pytest.raises(VerificationError):
        crypto.blinded_key(bytes(32))  # the identity: small order
