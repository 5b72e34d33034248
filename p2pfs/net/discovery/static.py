"""Static peers: the addresses given with `--peer` (or a config file).

A static peer is not tied to a topic: it is dialled for the swarm's whole
life and asked for every drive the swarm has, and redialled whenever its
connection ends (see `connections.Connections`).
"""

from __future__ import annotations

import trio

from .. import transport
from . import Candidate, Emit


class StaticSource:
    name = "static"

    def __init__(self, addresses=()):
        self._addresses: list[str] = []
        self._emit: Emit | None = None
        for address in addresses:
            self.add(address)

    def add(self, address: str) -> None:
        """One more static peer ('HOST:PORT'; UsageError if malformed)."""
        host, port = transport.parse_address(address)
        if address in self._addresses:
            return
        self._addresses.append(address)
        if self._emit is not None:
            self._emit(None, Candidate(host, port, "static"))

    def join(self, discovery_key: bytes, *, announce: bool) -> None:
        pass  # static peers are asked for every drive

    def leave(self, discovery_key: bytes) -> None:
        pass

    def set_port(self, port: int | None) -> None:
        pass

    def start(self, emit: Emit) -> None:
        """Emit every static address now and each one added later."""
        self._emit = emit
        for address in self._addresses:
            host, port = transport.parse_address(address)
            emit(None, Candidate(host, port, "static"))

    async def run(self, emit: Emit, *, task_status=None) -> None:
        self.start(emit)
        if task_status is not None:
            task_status.started()
        await trio.sleep_forever()

    active = False  # its peers are dialled (and waited for) by the connections

    def status(self) -> dict:
        return {"peers": list(self._addresses)}
