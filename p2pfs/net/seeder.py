"""`p2pfs seed`: serve drives in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
from typing import Callable, Sequence

import trio

from ..drive import Drive
from ..errors import NotFoundError
from ..store import Store
from .swarm import open_swarm
from .transport import load_node_key


async def seed(store: Store, keys: Sequence[bytes], listen: str,
               on_listening: Callable[[list[str]], None],
               peers: Sequence[str] = (), report: Callable[[str], None] | None = None) -> None:
    """Serve every drive in the store (announcing and following `keys`) on
    `listen` until a signal arrives.  NotFoundError for a key not held."""
    drives = []
    for key in keys:
        drive = Drive(store, key)
        if drive.head is None:
            raise NotFoundError(f"unknown drive {drive.key_text}: seed serves drives held in "
                                "this home (create it, or fetch it first)")
        drives.append(drive)
    kwargs = {"serve_all": True}
    if report is not None:
        kwargs["report"] = report
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_swarm(store, load_node_key(store.home), **kwargs) as swarm:
            for drive in drives:
                swarm.add_drive(drive)
            for address in peers:
                swarm.add_peer(address)
            addresses = await swarm._nursery.start(swarm.listen, listen)
            on_listening(addresses)
            async for _sig in signals:
                break
