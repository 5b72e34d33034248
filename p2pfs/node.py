"""Wiring: open a node's store and drives for the CLI, the seeder and the mount.

`open_drive` is the one place that decides where a drive's blocks come
from: without peers, the local store only; with peers it starts a swarm,
passes it to the Drive as its BlockSource, and waits for the first signed
head of a drive not yet held.
"""

from __future__ import annotations

import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Sequence

import trio

from . import crypto
from .drive import Drive
from .errors import NotFoundError, UsageError
from .store import Store, default_home

DEFAULT_TIMEOUT = 30.0


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def open_store(home: str | os.PathLike | None = None) -> Store:
    """The store of `home` (default: $P2PFS_HOME or the XDG data dir).  A home
    that other users could read is made private, saying so on stderr."""
    return Store(Path(home) if home is not None else default_home(), warn=_warn)


def parse_drive_ref(text: str) -> tuple[bytes, int | None]:
    """'KEY' or 'KEY@VERSION' -> (key, version or None).  UsageError if malformed."""
    key_text, sep, version_text = text.rpartition("@") if "@" in text else (text, "", "")
    version = None
    if sep:
        if not version_text.isdigit() or int(version_text) < 1:
            raise UsageError(f"{version_text!r} is not a version number: "
                             "give KEY@N with N >= 1 (see 'p2pfs log KEY')")
        version = int(version_text)
    return crypto.decode_key(key_text), version


def local_drive(store: Store, key: bytes) -> Drive:
    """A drive held in this store (NotFoundError if not), not yet opened at a version."""
    drive = Drive(store, key)
    if drive.head is None:
        raise NotFoundError(f"unknown drive {drive.key_text}; "
                            "give --peer HOST:PORT to fetch it")
    return drive


@asynccontextmanager
async def open_drive(store: Store, key: bytes | str, version: int | None = None,
                     peers: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT,
                     ) -> AsyncIterator[Drive]:
    """Yield a Drive opened at `version` (None: newest, live).

    `key` is 32 bytes or key text (``KEY`` or ``KEY@N``; an explicit
    `version` wins).  Raises UsageError for a bad key, NotFoundError for an
    unknown drive or version."""
    if isinstance(key, str):
        key, text_version = parse_drive_ref(key)
        version = version if version is not None else text_version
    if not peers:
        drive = local_drive(store, key)
        await drive.open(version)
        yield drive
        return
    # With peers: a swarm for the life of the block; the Drive fetches what it
    # misses through it, and follows heads the peers announce.
    from .net.swarm import open_swarm, unavailable
    from .net.transport import load_node_key, parse_address
    for address in peers:
        parse_address(address)  # UsageError before anything starts
    async with open_swarm(store, load_node_key(store.home), timeout=timeout) as swarm:
        drive = Drive(store, key, source=swarm)
        swarm.add_drive(drive)
        for address in peers:
            swarm.add_peer(address)
        started = trio.current_time()
        await swarm.wait_for_peers(drive, timeout)
        if drive.head is None:
            raise unavailable(drive.key_text, swarm, timeout, trio.current_time() - started)
        # the header, the newest commit and the index root in one round trip
        # (in a small drive the root is the whole index: no more trips to look up)
        await swarm.fetch_path(drive, b"/")
        await swarm.fetch(drive, [0, drive.head.length - 1])
        await drive.open(version)
        yield drive
