"""`p2pfs seed`: serve drives in the foreground until SIGINT/SIGTERM (wiring)."""

from __future__ import annotations

import signal
from typing import Callable, Sequence

import trio

from .drive import Drive
from .errors import NotFoundError
from .node import NetOptions, open_network
from .store import Store


async def seed(store: Store, keys: Sequence[bytes], net: NetOptions,
               on_listening: Callable[[list[str]], None]) -> None:
    """Serve every drive in the store (announcing and following `keys`) on
    `net.listen` until a signal arrives.  NotFoundError for a key not held."""
    drives = []
    for key in keys:
        drive = Drive(store, key)
        if drive.head is None:
            raise NotFoundError(f"unknown drive {drive.key_text}: seed serves drives held in "
                                "this home (create it, or fetch it first)")
        drives.append(drive)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_network(store, net, serve_all=True, on_listening=on_listening) as swarm:
            for drive in drives:
                swarm.add_drive(drive)
            async for _sig in signals:
                break
