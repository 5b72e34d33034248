"""Node IDs: the XOR metric, BEP 42 (IDs tied to the external IP) and IP voting.

Theory of operation
-------------------
A node ID is 20 bytes; the distance between two IDs is their XOR read as
a big-endian integer.  BEP 42 ties an ID to its node's external IPv4
address: the first 21 bits must equal the top 21 bits of
crc32c((ip & 0x030f3fff) | (r << 29)) over the 4 big-endian bytes, where
`r` is the low 3 bits of the ID's last byte.  (libtorrent hashes 4 bytes
for IPv4; the BEP's published test vectors agree with that.)  Addresses
on local networks (RFC 1918, loopback, link-local: BEP 42's list) are exempt: an ID
seen from such an address always passes, as in libtorrent.

We learn our external IP from the `ip` field of replies (BEP 42).  One
node could lie, so `ExternalIpVote` only believes an address once
`VOTES_NEEDED` distinct source IPs have reported it, and remembers a
bounded number of voters.

Pure: no clock, no sockets; randomness comes from a `randbytes` callable.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Callable

ID_BYTES = 20
V4_MASK = 0x030F3FFF
VOTES_NEEDED = 3
MAX_VOTERS = 64

RandBytes = Callable[[int], bytes]


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as used by BEP 42 (and iSCSI, ext4)."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def distance(a: bytes, b: bytes) -> int:
    """The Kademlia XOR distance of two IDs, as an integer."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


LOCAL_NETWORKS = tuple(ipaddress.IPv4Network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8"))


def is_local(host: str) -> bool:
    """True for the IPv4 blocks BEP 42 exempts: RFC 1918, link-local and loopback."""
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return any(ip in net for net in LOCAL_NETWORKS)


def _prefix(host: str, r: int) -> int:
    """The 32-bit CRC whose top 21 bits an ID from `host` must carry."""
    ip = int(ipaddress.IPv4Address(host))
    return crc32c((((ip & V4_MASK) | ((r & 7) << 29)) & 0xFFFFFFFF).to_bytes(4, "big"))


def generate_id(host: str, randbytes: RandBytes = os.urandom) -> bytes:
    """A random node ID valid under BEP 42 for the external IPv4 address `host`."""
    rnd = randbytes(ID_BYTES)
    crc = _prefix(host, rnd[19])
    head = bytes([(crc >> 24) & 0xFF, (crc >> 16) & 0xFF, ((crc >> 8) & 0xF8) | (rnd[2] & 7)])
    return head + rnd[3:20]


def verify_id(node_id: bytes, host: str) -> bool:
    """Does `node_id` follow BEP 42 for a node seen at `host`?  Local addresses always pass."""
    if is_local(host):
        return True
    try:
        crc = _prefix(host, node_id[19])
    except ValueError:  # not IPv4: not checked
        return True
    return (node_id[0] == (crc >> 24) & 0xFF and node_id[1] == (crc >> 16) & 0xFF
            and node_id[2] & 0xF8 == (crc >> 8) & 0xF8)


class ExternalIpVote:
    """Our external IP as reported in replies' `ip` fields, by distinct sources."""

    def __init__(self, votes_needed: int = VOTES_NEEDED, max_voters: int = MAX_VOTERS):
        self.votes_needed = votes_needed
        self.max_voters = max_voters
        self._votes: dict[str, str] = {}  # voter IP -> the IP it reported (latest)
        self.address: str | None = None

    def add(self, voter: str, reported: str) -> str | None:
        """Count a report; returns the external IP when this report makes it the winner anew."""
        if voter in self._votes:
            self._votes.pop(voter)
        elif len(self._votes) >= self.max_voters:
            self._votes.pop(next(iter(self._votes)))  # forget the oldest voter
        self._votes[voter] = reported
        tally: dict[str, int] = {}
        for ip in self._votes.values():
            tally[ip] = tally.get(ip, 0) + 1
        best = max(tally, key=tally.__getitem__)
        if tally[best] >= self.votes_needed and best != self.address:
            self.address = best
            return best
        return None
