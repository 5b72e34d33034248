"""Discovery: where candidate peer addresses for a drive come from.

Theory of operation
-------------------
A drive's *topic* is its discovery key (`crypto.discovery_key`): the only
thing about a drive that any discovery source ever sends or receives.  The
swarm joins a topic for every drive it reads or serves, with `announce`
True when this node listens and so can serve it.

Every source (static `--peer`, LAN multicast, the Mainline DHT) implements
`Source`: `join`/`leave` are quick and synchronous (they only record what
to look up or announce), `run` does the work until cancelled and passes
each address it learns to `emit(discovery_key, candidate)`.  A source
knows nothing about connections or fetching: the connection layer
deduplicates the stream (by address and, once connected, by node key),
ranks, bounds and dials.  A source that learns the same address again may
emit it again; emitting is cheap.

A source that can also carry a drive's latest signed head outside the
swarm (the DHT's BEP 44 items) implements `HeadSource` as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

SOURCES = ("static", "lan", "dht")


@dataclass(frozen=True, slots=True)
class Candidate:
    """An address that may serve a topic, and what told us so."""

    host: str
    port: int
    source: str  # one of SOURCES
    node_key: bytes | None = None  # the peer's X25519 node key, if the source knows it

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Emit = Callable[[bytes, Candidate], None]


class Source(Protocol):
    """One way of finding peers for topics."""

    name: str  # one of SOURCES

    def join(self, discovery_key: bytes, *, announce: bool) -> None:
        """Look up this topic from now on (and announce us on it if `announce`)."""

    def leave(self, discovery_key: bytes) -> None:
        """Stop looking up and announcing the topic."""

    def set_port(self, port: int | None) -> None:
        """The TCP port this node accepts peers on (None: not listening;
        nothing is announced then)."""

    async def run(self, emit: Emit, *, task_status=None) -> None:
        """Work until cancelled; `task_status.started()` once ready."""

    def status(self) -> dict:
        """Counters and state for `p2pfs info` (JSON-serialisable)."""

    @property
    def active(self) -> bool:
        """Whether it may still find peers (a LAN source with no usable
        interface, a DHT with no node to ask, cannot): a read with no peer
        left fails at once unless some source is active."""


class HeadSource(Protocol):
    """A source that also stores and finds drives' latest signed heads."""

    async def get_head(self, drive_key: bytes) -> tuple[int, bytes, bytes, bytes] | None:
        """(length, root, head signature, dht signature) of the newest head
        found, verified; None if none was found."""

    async def put_head(self, drive_key: bytes, length: int, root: bytes, signature: bytes,
                       dht_signature: bytes) -> int:
        """Store the owner's signed head; returns how many nodes took it."""
