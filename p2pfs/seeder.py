"""`p2pfs seed`: keep full, verified copies of drives and serve them (wiring).

Theory of operation
-------------------
One process, one swarm that serves every drive of the home to peers that
prove its key (`serve_all`).  Each drive to seed — the named ones, or with
no KEY every drive that is owned, pinned or has pinned folders — gets a
`Follower` task:

* a drive this home owns is served and announced, nothing more;
* any other drive is pinned (kept out of the cache, and followed by a later
  `seed` with no KEY), then copied: every block below its newest signed
  length (with `--latest`: what the newest version references; for a drive
  with pinned folders: what they reference), each verified by the fetcher
  against the signed tree before it is stored.  Then the follower waits
  for a newer head (a peer's Head, or another process's, through the
  store poll) and fetches what that adds (`--latest`: the files that
  changed, from `Drive.diff`).

A follower whose fetch fails (no peer left, none answering) says so and
tries again after `RETRY` seconds or as soon as a head arrives.  Blocks
held are never asked for again, so a seed killed any way resumes where it
stopped.

What a person sees is `progress.Live` (a bar per drive on a terminal, a
line per step in a pipe, JSON lines with --json); with -v also each peer
that connects, the drives it opens and what it was sent.  The process
publishes its state for `p2pfs status` (`status.publish`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import trio

from . import crypto, daemon as daemon_mod, download, status as status_mod
from .drive import Drive
from .errors import BlockUnavailableError, NotFoundError, P2pfsError, UsageError
from .node import NetOptions, open_network, open_store
from .progress import Live, size_text
from .store import Store

RETRY = 5.0            # s before a follower whose peers failed it tries again
TICK = 0.5             # s between progress updates
PEER_REPORT = 10.0     # s between -v reports of what a peer is being sent ...
PEER_QUIET = 1.0       # ... or this long after it was last sent a block

OWNED, EVERY, LATEST, FOLDERS = "owned", "every version", "latest", "folders"


@dataclass
class Options:
    latest: bool = False     # only what the newest version references
    json: bool = False       # JSON lines on standard output
    verbose: bool = False    # peers: who connected, what they were sent


@dataclass
class Target:
    key: bytes
    mode: str
    paths: tuple[bytes, ...] = ()
    named: bool = True       # given on the command line (it gets pinned)


def targets(store: Store, keys: Sequence[bytes], latest: bool) -> list[Target]:
    """What to seed: the named drives, or with none every drive of the home
    that is owned, pinned or has pinned folders.  NotFoundError if nothing."""
    def owned(key: bytes) -> bool:
        return store.key_path(crypto.encode_key(key)).exists()

    if keys:
        return [Target(k, OWNED if owned(k) else (LATEST if latest else EVERY))
                for k in dict.fromkeys(keys)]
    out = []
    for key, record in store.list_drives():
        if owned(key) or record.owned:
            out.append(Target(key, OWNED, named=False))
        elif record.pinned:
            out.append(Target(key, LATEST if latest else EVERY, named=False))
        elif record.paths:
            out.append(Target(key, FOLDERS, record.paths, named=False))
    if not out:
        raise NotFoundError("no drive in this home is owned or pinned: name the drives to "
                            "seed (p2pfs seed KEY ...) or pin some (p2pfs pin KEY)")
    return out


class Follower:
    """Keeps one drive complete (see the module docstring)."""

    def __init__(self, store: Store, swarm, target: Target, live: Live):
        self.store = store
        self.swarm = swarm
        self.target = target
        self.live = live
        key = target.key
        self.name = crypto.encode_key(key)
        self.drive = Drive(store, key, source=None if target.mode == OWNED else swarm)
        swarm.add_drive(self.drive)
        self.state = "waiting"
        self.version = 0
        self.length = 0
        self.done = 0
        self.total: int | None = None
        self._changed = trio.Event()
        self.drive.subscribe(lambda _head: self._changed.set())
        self.on_change: Callable[[], None] = lambda: None  # the state moved: tell `status`

    def _state(self, state: str) -> None:
        self.state = state
        self.on_change()

    def snapshot(self) -> dict:
        return {"key": self.name, "mode": self.target.mode, "state": self.state,
                "version": self.version, "length": self.length,
                "bytes_held": self.store.held(self.target.key)[1],
                "bytes_done": self.done, "bytes_total": self.total,
                "peers": self.peers()}

    def peers(self) -> int:
        return sum(1 for p in self.swarm.peer_info(self.target.key) if p.get("open"))

    def show(self) -> None:
        if self.state != "fetching":
            return
        if self.target.mode == EVERY:
            self.done = min(self.store.held(self.target.key)[1], self.total or 0)
        n = self.peers()
        self.live.update(self.name, done=self.done, total=self.total,
                         info=f"{n} peer{'s' if n != 1 else ''}, version {self.version}",
                         key=self.name, version=self.version, peers=n)

    async def run(self) -> None:
        drive = self.drive
        if self.target.mode == OWNED:
            self._state("serving")
            what = "serving"
            while True:
                # what it shows is read through a view of its own: the drive the
                # swarm serves stays as a plain seeder's, at the newest signed head
                view = Drive(self.store, self.target.key)
                seen = view.head.length if view.head is not None else 0
                try:
                    view.open_local()
                    self.version, self.length = view.version, view.length
                    self.live.step(f"{self.name}: serving version {self.version} (owned)", what,
                                   key=self.name, version=self.version, length=self.length)
                except P2pfsError as exc:  # served as it is; the readers verify what they get
                    self.length = view.head.length if view.head is not None else 0
                    self.live.step(f"{self.name}: serving, but it cannot be read here: {exc}",
                                   what, key=self.name, length=self.length, error=str(exc))
                what = "version"
                while drive.head is None or drive.head.length == seen:
                    await self._changed.wait()
                    self._changed = trio.Event()
        if drive.head is None:
            self.live.step(f"{self.name}: waiting for a peer that has it", "waiting",
                           key=self.name, reason="no signed version held yet")
            while drive.head is None:
                await self._changed.wait()
                self._changed = trio.Event()
        if self.target.named:
            self.store.set_pins(self.target.key, pinned=True)
        previous = None  # the Commit of the last version completed (--latest, folders)
        while True:
            self._changed = trio.Event()  # before looking: a head arriving now is not missed
            try:
                previous = await self._complete(previous)
            except BlockUnavailableError as exc:
                self._state("waiting")
                self.live.step(f"{self.name}: waiting for peers ({exc})", "waiting",
                               key=self.name, reason=str(exc))
                with trio.move_on_after(RETRY):
                    await self._changed.wait()
                continue
            except P2pfsError as exc:  # a bad drive: the others go on; a new version may be good
                self._state("failed")
                self.live.step(f"{self.name}: cannot be copied: {exc}", "failed", key=self.name,
                               reason=str(exc))
            await self._changed.wait()

    async def _complete(self, previous):
        """Fetch what the newest head held needs; the Commit it completed."""
        drive = self.drive
        await drive.open()
        length = drive.length
        mode = self.target.mode
        if length == self.length and self.state == "complete":
            return previous
        self.version, self.length = drive.version, length
        if mode == EVERY:
            self.total = download.log_bytes(drive, length)
            blocks = download.range_blocks(download.missing_ranges(drive, length))
            want = None
        else:
            paths = self.target.paths or (b"/",)
            if previous is not None:
                want = await download.changed_blocks(drive, previous, drive.commit, paths)
            else:
                want = await download.version_blocks(drive, paths)
            self.total = sum(want.values())
            self.done = sum(size for b, size in want.items() if drive.has_block(b))
            blocks = sorted(want)
        if mode == EVERY and self.total is not None:
            self.done = min(self.store.held(self.target.key)[1], self.total)
        left = size_text(self.total - self.done) if self.total is not None else "every block"
        self._state("fetching")
        self.live.restart(self.name)
        self.live.step(f"{self.name}: version {self.version}, length {length}: {left} to fetch "
                       f"({mode})", "version", key=self.name, version=self.version,
                       length=length, mode=mode, bytes_total=self.total, bytes_done=self.done)

        def done(chunk: list[int]) -> None:
            if want is not None:
                self.done += sum(want[b] for b in chunk)
            self.show()

        await download.fetch_blocks(drive, blocks, done)
        if mode == EVERY:
            self.total = download.log_bytes(drive, length)
            self.done = self.total or 0
        self.show()
        self._state("complete")
        held = self.store.held(self.target.key)[1]
        self.live.step(f"{self.name}: complete: version {self.version}, length {length}, "
                       f"{size_text(held)} held", "complete", key=self.name,
                       version=self.version, length=length, bytes_held=held, mode=mode)
        return drive.commit


class PeerLog:
    """-v: who connected, which drives they opened, what they were sent."""

    def __init__(self, live: Live, keys: list[bytes]):
        self.live = live
        self.keys = keys
        self.peers: dict[tuple, dict] = {}

    def update(self, swarm, now: float) -> None:
        current: dict[tuple, dict] = {}
        opened: dict[tuple, set[bytes]] = {}
        for key in self.keys:
            for p in swarm.peer_info(key):
                ident = (p["address"], p["node_key"], p["dialled"])
                current[ident] = p
                if p.get("open"):
                    opened.setdefault(ident, set()).add(key)
        for ident, p in current.items():
            seen = self.peers.get(ident)
            if seen is None:
                seen = self.peers[ident] = {"drives": set(), "sent": 0, "bytes": 0,
                                            "reported": now, "sent_reported": 0,
                                            "bytes_reported": 0, "changed": now}
                self.live.step(f"peer {p['address']} connected (node {(p['node_key'] or '?')[:16]}, "
                               f"{p['source']})", "peer", address=p["address"],
                               node_key=p["node_key"], source=p["source"], state="connected")
            for key in opened.get(ident, set()) - seen["drives"]:
                seen["drives"].add(key)
                self.live.step(f"peer {p['address']} opened drive {crypto.encode_key(key)}",
                               "peer", address=p["address"], key=crypto.encode_key(key),
                               state="opened")
            if p.get("blocks_sent", 0) != seen["sent"]:
                seen["changed"] = now
            seen["sent"], seen["bytes"] = p.get("blocks_sent", 0), p.get("bytes_sent", 0)
            quiet = now - seen["changed"] >= PEER_QUIET
            if seen["sent"] > seen["sent_reported"] and (quiet or now - seen["reported"] >= PEER_REPORT):
                self._served(p["address"], seen, now)
        for ident in list(self.peers):
            if ident not in current:
                seen = self.peers.pop(ident)
                self._served(ident[0], seen, now)
                self.live.step(f"peer {ident[0]} disconnected: sent {seen['sent']} blocks "
                               f"({size_text(seen['bytes'])}) in all", "peer", address=ident[0],
                               state="disconnected", blocks_sent=seen["sent"],
                               bytes_sent=seen["bytes"])

    def _served(self, address: str, seen: dict, now: float) -> None:
        blocks = seen["sent"] - seen["sent_reported"]
        nbytes = seen["bytes"] - seen["bytes_reported"]
        if blocks > 0:
            self.live.step(f"peer {address}: served {blocks} blocks ({size_text(nbytes)}) in "
                           f"{now - seen['reported']:.0f} s", "served", address=address,
                           blocks=blocks, bytes=nbytes)
        seen["reported"], seen["sent_reported"], seen["bytes_reported"] = now, seen["sent"], seen["bytes"]


async def seed(store: Store, keys: Sequence[bytes], net: NetOptions,
               on_listening: Callable[[list[str]], None], opts: Options | None = None,
               ready: Callable[[list[Target]], None] | None = None) -> None:
    """Seed `keys` (none: every owned or pinned drive of the home) on
    `net.listen` until SIGINT/SIGTERM.  `ready(targets)` once every drive is
    served.  NotFoundError when there is nothing to seed; UsageError for a
    drive not held when no peer can be found."""
    opts = opts or Options()
    todo = targets(store, keys, opts.latest)
    for t in todo:
        if t.mode != OWNED and store.latest_head(t.key) is None and not net.networked:
            raise UsageError(f"drive {crypto.encode_key(t.key)} is not held here and no peer "
                             "can be found: give --peer HOST:PORT (or turn on discovery)")
    live = Live("seed", json_lines=opts.json)
    addresses: list[str] = []

    def listening(found: list[str]) -> None:
        addresses.extend(found)
        on_listening(found)

    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_network(store, net, serve_all=True, on_listening=listening) as swarm:
                followers = [Follower(store, swarm, t, live) for t in todo]
                peer_log = PeerLog(live, [t.key for t in todo]) if opts.verbose else None

                def snapshot() -> dict:
                    return {"argv": ["seed", *(crypto.encode_key(k) for k in keys)],
                            "listen": addresses,
                            "drives": [f.snapshot() for f in followers],
                            "peers": len(swarm.peer_info(todo[0].key))}

                async with trio.open_nursery() as nursery:
                    published = await nursery.start(status_mod.publish, store.home, "seed",
                                                    snapshot, lambda: swarm.peer_info(todo[0].key))
                    for f in followers:
                        f.on_change = published.changed
                        nursery.start_soon(f.run)

                    async def tick() -> None:
                        while True:
                            await trio.sleep(TICK)
                            for f in followers:
                                f.show()
                            if peer_log is not None:
                                peer_log.update(swarm, trio.current_time())

                    nursery.start_soon(tick)
                    if ready is not None:
                        ready(todo)
                    async for _sig in signals:
                        nursery.cancel_scope.cancel()
                        break
    finally:
        live.stop()


def describe(todo: list[Target]) -> str:
    names = ", ".join(crypto.encode_key(t.key)[:12] + "…" for t in todo[:4])
    more = f" and {len(todo) - 4} more" if len(todo) > 4 else ""
    return f"{len(todo)} drive{'s' if len(todo) != 1 else ''} ({names}{more})"



LOG_NAME = "seed.log"  # in the home: what a --daemon seed would have printed


def seed_command(*, home, keys: Sequence[bytes], net: NetOptions, opts: Options,
                 daemon: bool, argv: Sequence[str] | None) -> int:
    """`p2pfs seed`: foreground by default; `daemon` re-runs `argv` detached and
    returns once every drive is served."""
    ready_fd = daemon_mod.ready_fd()
    if daemon and ready_fd is None:
        if argv is None:
            raise ValueError("daemon mode needs the command line to re-run")
        return daemon_mod.spawn(list(argv), "the seed process")
    store = open_store(home)
    addresses: list[str] = []

    def listening(found: list[str]) -> None:
        addresses.extend(found)
        if ready_fd is not None:
            return
        for a in found:
            if opts.json:
                print(json.dumps({"event": "listening", "address": a}), flush=True)
            else:
                print(f"listening on {a}", flush=True)

    def ready(todo: list[Target]) -> None:
        last = f"p2pfs: seeding {describe(todo)}"
        if ready_fd is None:
            if opts.json:
                print(json.dumps({"event": "ready", "drives": [crypto.encode_key(t.key)
                                                               for t in todo]}), flush=True)
            else:
                print(last + "; Ctrl-C to stop", file=sys.stderr, flush=True)
            return
        lines = [f"listening on {a}" for a in addresses]
        daemon_mod.detach(ready_fd, "\n".join(lines + [last]), os.path.join(store.home, LOG_NAME))

    try:
        trio.run(seed, store, keys, net, listening, opts, ready)
    finally:
        store.close()
    print("p2pfs: seed: stopped", file=sys.stderr, flush=True)
    return 0
