"""What the Noise handshake payloads carry: protocol version and transport cipher.

Theory of operation
-------------------
The three Noise XX messages each carry one payload, a tagged array-like
msgspec struct decoded only by `decode_payload`::

    -> e                 Offer(min_version, max_version, ciphers)         cleartext
    <- e, ee, s, es      Accept(version, cipher, min_version, max_version, ciphers)
                         or Refuse(reason, min_version, max_version, ciphers)
    -> s, se             Confirm(version, cipher)

`ciphers` is each side's own list, most preferred first.  The responder
picks; both sides can recompute the pick, and the initiator checks it:

* version: the highest version in both ranges;
* cipher: among the ciphers both lists name, the one with the lowest sum
  of its two ranks (0 = first), ties broken by the initiator's order.

Nothing else is negotiated.  A responder that finds no common version or
cipher, or an empty first payload (a version-1 peer: it sent none),
answers Refuse with its own ranges and a human-readable reason, and
closes; each side's error says what the other offers.  The Offer travels
in clear, but every payload is mixed into the handshake hash, so a
man in the middle who edits it makes the second message fail to decrypt.
Confirm repeats the choice under the initiator's keys, so the responder
knows that the initiator agreed before it uses the cipher.

Errors from the peer's bytes are `ProtocolError`, with the message a user
sees (one line, saying which side to upgrade or what to set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Sequence, Union

import msgspec

from ..errors import ProtocolError

PROTOCOL_VERSION = 2
VERSIONS = (PROTOCOL_VERSION, PROTOCOL_VERSION)   # the range this build speaks
RELEASE = "0.2"            # the first p2pfs release that speaks version 2
MAX_CIPHERS = 16
MAX_REASON = 200
CIPHERS_HINT = "P2PFS_CIPHERS"

Version = Annotated[int, msgspec.Meta(ge=1, le=65535)]
CipherName = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern="^[a-z0-9][a-z0-9_-]*$")]
CipherList = Annotated[list[CipherName], msgspec.Meta(max_length=MAX_CIPHERS)]


def _check_lists(min_version: int, max_version: int, ciphers: list[str]) -> None:
    if min_version > max_version:
        raise ValueError("version range is reversed")
    if len(set(ciphers)) != len(ciphers):
        raise ValueError("a cipher is named twice")


class Offer(msgspec.Struct, tag=1, array_like=True, frozen=True):
    """Message 1: the versions and ciphers the initiator speaks."""

    min_version: Version
    max_version: Version
    ciphers: CipherList

    def __post_init__(self):
        _check_lists(self.min_version, self.max_version, self.ciphers)


class Accept(msgspec.Struct, tag=2, array_like=True, frozen=True):
    """Message 2: the responder's choice, and what it speaks itself."""

    version: Version
    cipher: CipherName
    min_version: Version
    max_version: Version
    ciphers: CipherList

    def __post_init__(self):
        _check_lists(self.min_version, self.max_version, self.ciphers)


class Refuse(msgspec.Struct, tag=3, array_like=True, frozen=True):
    """Message 2 instead of Accept: no agreement; the responder closes after it."""

    reason: Annotated[str, msgspec.Meta(max_length=MAX_REASON)]
    min_version: Version
    max_version: Version
    ciphers: CipherList

    def __post_init__(self):
        _check_lists(self.min_version, self.max_version, self.ciphers)


class Confirm(msgspec.Struct, tag=4, array_like=True, frozen=True):
    """Message 3: the initiator agrees to the choice."""

    version: Version
    cipher: CipherName


Payload = Union[Offer, Accept, Refuse, Confirm]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Payload)


def encode_payload(payload: Payload) -> bytes:
    return _encoder.encode(payload)


def decode_payload(data: bytes, expected: type) -> Payload:
    """The payload of a handshake message, which must be of type `expected`
    (or a Refuse where an Accept is expected).  Anything else -> ProtocolError."""
    try:
        payload = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"peer sent a malformed handshake payload: {exc}") from None
    if not (isinstance(payload, expected) or (expected is Accept and isinstance(payload, Refuse))):
        raise ProtocolError(f"peer sent a {type(payload).__name__} where a {expected.__name__} belongs")
    return payload


@dataclass(frozen=True, slots=True)
class Agreement:
    """What both sides use from the end of the handshake on."""

    version: int
    cipher: str


def choose_version(a: tuple[int, int], b: tuple[int, int]) -> int | None:
    """The highest version in both ranges, or None."""
    high = min(a[1], b[1])
    return high if high >= max(a[0], b[0]) else None


def choose_cipher(initiator: Sequence[str], responder: Sequence[str]) -> str | None:
    """Among the ciphers both name, the lowest sum of ranks; ties go to the
    initiator's order.  None if they share none."""
    rank = {c: i for i, c in enumerate(responder)}
    best = None
    for i, c in enumerate(initiator):
        if c in rank and (best is None or i + rank[c] < best[0]):
            best = (i + rank[c], c)
    return None if best is None else best[1]


def _list(ciphers: Sequence[str]) -> str:
    return "[" + ", ".join(ciphers) + "]"


def version_error(peer: tuple[int, int], ours: tuple[int, int] = VERSIONS) -> str:
    low, high = peer
    theirs = f"version {low}" if low == high else f"versions {low} to {high}"
    needs = f"version {ours[0]}" if ours[0] == ours[1] else f"a version from {ours[0]} to {ours[1]}"
    side = "the peer" if high < ours[0] else "this node"
    return f"peer speaks protocol {theirs}; p2pfs {RELEASE} needs {needs}: upgrade p2pfs on {side}"


def cipher_error(peer: Sequence[str], ours: Sequence[str]) -> str:
    return (f"peer offers ciphers {_list(peer)}, this node supports {_list(ours)}: "
            f"no cipher in common (check {CIPHERS_HINT} on both nodes)")


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_REASON])


# --- the three steps -----------------------------------------------------------

def offer(versions: tuple[int, int], ciphers: Sequence[str]) -> bytes:
    """The initiator's first payload."""
    return encode_payload(Offer(versions[0], versions[1], list(ciphers)))


def respond(data: bytes, versions: tuple[int, int], ciphers: Sequence[str]) -> tuple[bytes, Agreement | ProtocolError]:
    """The responder reads message 1's payload: returns message 2's payload,
    and the agreement or the error to raise once that payload is sent (a
    Refuse).  A malformed payload -> ProtocolError at once (nothing to answer)."""
    if not data:
        refusal = ProtocolError(version_error((1, 1), versions))
    else:
        peer = decode_payload(data, Offer)
        version = choose_version((peer.min_version, peer.max_version), versions)
        cipher = choose_cipher(peer.ciphers, ciphers)
        if version is not None and cipher is not None:
            reply = Accept(version, cipher, versions[0], versions[1], list(ciphers))
            return encode_payload(reply), Agreement(version, cipher)
        if version is None:
            refusal = ProtocolError(version_error((peer.min_version, peer.max_version), versions))
        else:
            refusal = ProtocolError(cipher_error(peer.ciphers, ciphers))
    reply = Refuse(str(refusal)[:MAX_REASON], versions[0], versions[1], list(ciphers))
    return encode_payload(reply), refusal


def accept(data: bytes, versions: tuple[int, int], ciphers: Sequence[str]) -> Agreement:
    """The initiator reads message 2's payload: the agreement, checked
    against the rule.  A refusal or a choice against the rule -> ProtocolError."""
    peer = decode_payload(data, Accept)
    theirs = (peer.min_version, peer.max_version)
    version = choose_version(versions, theirs)
    cipher = choose_cipher(ciphers, peer.ciphers)
    if isinstance(peer, Refuse):
        if version is None:
            raise ProtocolError(version_error(theirs, versions))
        if cipher is None:
            raise ProtocolError(cipher_error(peer.ciphers, ciphers))
        raise ProtocolError(f"peer refused the connection: {_printable(peer.reason)}")
    if (peer.version, peer.cipher) != (version, cipher):
        rule = "no agreement" if version is None or cipher is None else f"{version} and {cipher}"
        raise ProtocolError(
            f"peer chose protocol version {peer.version} and cipher {peer.cipher}; the rule gives {rule}")
    return Agreement(version, cipher)


def confirm(agreement: Agreement) -> bytes:
    """The initiator's third payload."""
    return encode_payload(Confirm(agreement.version, agreement.cipher))


def check_confirm(data: bytes, agreement: Agreement) -> None:
    """The responder reads message 3's payload: it must repeat the choice."""
    peer = decode_payload(data, Confirm)
    if (peer.version, peer.cipher) != (agreement.version, agreement.cipher):
        raise ProtocolError(
            f"peer confirmed protocol version {peer.version} and cipher {peer.cipher}, "
            f"not the {agreement.version} and {agreement.cipher} chosen")
