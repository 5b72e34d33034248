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
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

import trio

from . import crypto, index
from .cache import FLUSH_INTERVAL, Cache
from .drive import Drive
from .errors import NotFoundError, StoreError, UsageError
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


@dataclass
class NetOptions:
    """Where a command finds peers (the CLI fills it from options and the
    configuration file).  Without static peers and discovery a command
    reads the local store only."""

    peers: Sequence[str] = ()
    lan: bool = False
    dht: bool = False
    bootstrap: Sequence[str] | None = None  # DHT bootstrap nodes; None: the public routers
    listen: str | None = None   # accept peers here (and announce the drives), if set
    timeout: float = DEFAULT_TIMEOUT

    @property
    def discovery(self) -> bool:
        return self.lan or self.dht

    @property
    def networked(self) -> bool:
        return bool(self.peers) or self.discovery


@asynccontextmanager
async def open_network(store: Store, net: NetOptions, *, serve_all: bool = False,
                       on_listening=None) -> AsyncIterator:
    """A running swarm with the static peers and discovery sources of `net`,
    listening on `net.listen` if set (`on_listening(addresses)` is called
    then).  Yields the Swarm."""
    from .net.swarm import open_swarm
    from .net.transport import new_node_key, parse_address
    for address in net.peers:
        parse_address(address)  # UsageError before anything starts
    if net.listen is not None:
        parse_address(net.listen)
    node_key = new_node_key()
    async with open_swarm(store, node_key, timeout=net.timeout, serve_all=serve_all) as swarm:
        for address in net.peers:
            swarm.add_peer(address)
        if net.listen is not None:
            addresses = await swarm._nursery.start(swarm.listen, net.listen)
            if on_listening is not None:
                on_listening(addresses)
        for source in discovery_sources(node_key, net, store.home):
            await swarm.add_source(source)
        yield swarm


DHT_PORT = 7640  # UDP; the DHT's default port (any other if it is taken)


def discovery_sources(node_key: bytes, net: NetOptions, home: Path | None = None) -> list:
    """The discovery sources `net` asks for, not yet running."""
    sources = []
    if net.lan:
        from .net.discovery.lan import LanSource
        sources.append(LanSource(crypto.x25519_public(node_key)))
    if net.dht:
        from .net.discovery.dht.node import DEFAULT_BOOTSTRAP, STATE_FILE, DhtNode
        from .net.discovery.dht_source import DhtSource
        from .net.transport import parse_address
        bootstrap = DEFAULT_BOOTSTRAP if net.bootstrap is None else \
            [parse_address(a, DHT_PORT) for a in net.bootstrap]
        # A node that listens is long-lived: it keeps a port and its routing
        # table (HOME/dht.state) across runs; a short-lived reader takes a
        # fresh identity and any port, and leaves the state alone.
        long_lived = net.listen is not None
        sources.append(DhtSource(DhtNode(
            bind=(_dht_host(net.listen), DHT_PORT if long_lived else 0), bootstrap=bootstrap,
            state_path=(home / STATE_FILE) if long_lived and home is not None else None)))
    return sources


def _dht_host(listen: str | None) -> str:
    """The address the DHT node binds: the host of --listen when it names one
    IPv4 address (a multi-homed host announces from the address it serves
    on: DHT nodes take the UDP source address as the peer's), else all."""
    if listen is None:
        return "0.0.0.0"
    import ipaddress

    from .net.transport import parse_address
    host = parse_address(listen)[0]
    try:
        return host if ipaddress.IPv4Address(host) else "0.0.0.0"
    except ValueError:
        return "0.0.0.0"  # a name or an IPv6 address: the DHT is IPv4, on every address


@asynccontextmanager
async def caching(store: Store, drive: Drive, cap: int | None) -> AsyncIterator[Cache]:
    """Tell the cache what `drive` reads for as long as the block runs: the
    touches are written (and the cap `cap` kept, None: no cap) from a worker
    thread every FLUSH_INTERVAL seconds, or sooner after many reads."""
    cache = Cache(store, cap)
    drive.cache = cache
    wake = trio.Event()

    def woken() -> None:
        wake.set()

    warned = False

    def flush() -> None:
        # The touches are bookkeeping: a store that cannot take them (a full
        # disk) must not end the read they come from.  Said once.
        nonlocal warned
        try:
            cache.flush()
        except StoreError as exc:
            if not warned:
                warned = True
                print(f"p2pfs: warning: the cache's bookkeeping was not written ({exc})",
                      file=sys.stderr, flush=True)

    async def flusher() -> None:
        nonlocal wake
        while True:
            with trio.move_on_after(FLUSH_INTERVAL):
                await wake.wait()
            wake = trio.Event()
            await trio.to_thread.run_sync(flush)

    cache.wake = woken
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher)
            try:
                yield cache
            finally:
                if drive.source is not None:
                    # blocks reads took from memory are stored first: their touches count
                    with trio.CancelScope(shield=True):
                        await drive.source.drain(drive)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        from .net.peer import raise_single  # the caller's error, as it went in
        raise_single(group)
    finally:
        drive.cache = None
        cache.riding = False  # no writer takes the last touches now
        flush()


@asynccontextmanager
async def open_drive(store: Store, key: bytes | str, version: int | None = None,
                     peers: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT,
                     net: NetOptions | None = None, cache_size: int | None = None,
                     hint: tuple[bytes, int] | None = None) -> AsyncIterator[Drive]:
    """Yield a Drive opened at `version` (None: newest, live).

    `key` is 32 bytes or key text (``KEY`` or ``KEY@N``; an explicit
    `version` wins).  `net` says where peers come from (default: the static
    `peers` only, waiting up to `timeout`).  A drive this home owns is read
    locally unless static peers are given.  `hint` = (path, bytes): what the
    caller will read first, asked of every peer in the first flight (see
    `Swarm.hint`).  What is read is reported to the cache, whose cap is
    `cache_size` bytes (None: no cap; see `p2pfs.cache`).  Raises UsageError
    for a bad key, NotFoundError for an unknown drive or version."""
    async with _open_drive(store, key, version, peers, timeout, net, hint) as drive:
        async with caching(store, drive, cache_size):
            yield drive


@asynccontextmanager
async def _open_drive(store: Store, key: bytes | str, version: int | None,
                      peers: Sequence[str], timeout: float, net: NetOptions | None,
                      hint: tuple[bytes, int] | None) -> AsyncIterator[Drive]:
    if isinstance(key, str):
        key, text_version = parse_drive_ref(key)
        version = version if version is not None else text_version
    if net is None:
        net = NetOptions(peers=tuple(peers), timeout=timeout)
    owned = store.key_path(crypto.encode_key(key)).exists()
    if not net.networked or (owned and not net.peers):
        drive = local_drive(store, key)
        await drive.open(version)
        yield drive
        return
    # With peers: a swarm for the life of the block; the Drive fetches what it
    # misses through it, and follows heads the peers announce.
    from .net.swarm import unavailable
    async with open_network(store, net) as swarm:
        drive = Drive(store, key, source=swarm)
        swarm.add_drive(drive)
        path = b"/"
        if hint is not None and version is None:
            path = index.normalize_path(hint[0])
            swarm.hint(drive, path, hint[1])
        started = trio.current_time()
        await swarm.wait_for_peers(drive, net.timeout)
        if drive.head is None:
            raise unavailable(drive.key_text, swarm, net.timeout, trio.current_time() - started)
        # the first flight asked for the header, the newest commit and the index
        # path of what the caller reads first (and its first bytes): wait for
        # that answer; open then finds what it needs, from the newest signed
        # version a peer announced holding
        await swarm.fetch_path(drive, path)
        await drive.open(version)
        yield drive


async def run_dht_node(net: NetOptions, listen: str, on_listening) -> None:
    """`p2pfs dht`: a Mainline DHT node and nothing else (a bootstrap node for
    a private network, or a test's), until cancelled."""
    from .net.discovery.dht.node import DEFAULT_BOOTSTRAP, DhtNode
    from .net.transport import format_address, parse_address
    host, port = parse_address(listen, DHT_PORT)
    bootstrap = DEFAULT_BOOTSTRAP if net.bootstrap is None else \
        [parse_address(a, DHT_PORT) for a in net.bootstrap]
    node = DhtNode(bind=(host, port), bootstrap=bootstrap)
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(node.run)
        except OSError as exc:
            raise UsageError(f"cannot listen on UDP {listen}: {exc.strerror or exc}") from None
        on_listening([format_address(*node.address)])
