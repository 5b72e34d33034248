"""`p2pfs share DIR`: publish a directory as it changes, and serve it.

Theory of operation
-------------------
One process, one trio loop, three parts:

* the `watch.Watcher` (inotify over the whole tree) gathers changes into
  batches; its watches are in place *before* the first scan, so nothing
  that changes during the first import is missed;
* a `publish.Publisher` turns each batch into one signed version, in a
  worker thread (the loop keeps reading events and serving peers
  meanwhile); it holds the drive's writer lock for the whole run, so a
  second `share` or an `import` of the same drive is refused;
* a swarm (the seeder's serving code) serves the drive; after each version
  the serving Drive adopts the new head at once, so connected peers hear of
  it without waiting for the store poll.

The home remembers which drive shares which directory (by real path) in
`HOME/shares/<hash>.json` (key, path, excludes), so a second run reuses the
drive and first catches up with what changed while it was down (a rescan
of the whole tree: at most one version).  `--exclude` patterns given on a
run replace the remembered ones.

Stopping: SIGINT/SIGTERM set the publisher's stop event, so a version in
progress is either finished (it was already signing) or abandoned before
it is signed (its blocks are garbage past the signed length, deleted by
the next write); a `kill -9` leaves the same.  Either way the next run
catches up.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import trio

from . import crypto, daemon as daemon_mod, status
from .drive import Drive
from .net.transport import parse_address
from .errors import NotFoundError, StoreError
from .ignore import Rules
from .node import NetOptions, local_drive, open_network, open_store
from .progress import Bar
from .publish import Abandoned, Changes, Publisher, WriteResult, create_drive
from .store import Store
from .watch import DEFAULT_MAX_DELAY, DEFAULT_QUIET, Watcher

LOG_NAME = "share.log"  # in the home: what a --daemon share would have printed
DEFAULT_PREFIX = "share: "


# --- which drive shares which directory ----------------------------------------------

@dataclass
class ShareRecord:
    path: str
    key: str
    excludes: list[str]


def _record_path(home: Path, directory: str) -> Path:
    digest = hashlib.blake2b(os.fsencode(directory), digest_size=16).hexdigest()
    return home / "shares" / f"{digest}.json"


def load_record(home: Path, directory: str) -> ShareRecord | None:
    """The drive this home shares `directory` (a real path) with, if any."""
    path = _record_path(home, directory)
    try:
        raw = json.loads(path.read_bytes())
        record = ShareRecord(raw["path"], raw["key"], list(raw.get("excludes", [])))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{path} is unreadable or damaged ({exc}); remove it to share "
                         f"{directory} as a new drive") from None
    return record if record.path == directory else None


def save_record(home: Path, record: ShareRecord) -> None:
    path = _record_path(home, record.path)
    data = json.dumps({"path": record.path, "key": record.key, "excludes": record.excludes})
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from None


# --- the process ---------------------------------------------------------------------------

def _log(text: str) -> None:
    print(f"p2pfs: share: {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def version_line(r: WriteResult) -> str:
    return (f"version {r.version}: {r.summary()}; {r.new_content_blocks} new content blocks, "
            f"{r.reused_blocks} reused, {r.index_blocks} index blocks, length {r.length}")


@dataclass
class Options:
    listen: str
    net: NetOptions | None = None  # peers and discovery (None: none)
    excludes: list[str] | None = None  # None: the remembered ones
    message_prefix: str = DEFAULT_PREFIX
    quiet: float = DEFAULT_QUIET
    max_delay: float = DEFAULT_MAX_DELAY
    progress: bool = True


async def share(store: Store, directory: str, opts: Options,
                ready: Callable[[str, list[str]], None], log: Callable[[str], None] = _log) -> None:
    """Share `directory` until SIGINT/SIGTERM: `ready(key, addresses)` once the
    first version is published and peers can connect."""
    parse_address(opts.listen)
    root = os.path.realpath(directory)
    if not os.path.isdir(root):
        raise NotFoundError(f"{directory}: no such directory")
    record = load_record(store.home, root)
    excludes = opts.excludes if opts.excludes is not None else (record.excludes if record else [])
    rules = Rules.load(root, excludes)
    stop = threading.Event()
    watcher = Watcher(root, rules, excludes=excludes, quiet=opts.quiet,
                      max_delay=opts.max_delay, log=log)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal():
                    async for _ in signals:
                        stop.set()  # abandon a version in progress before it is signed
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                now: dict = {}  # what `p2pfs status` shows, filled in as the share starts
                await nursery.start(status.publish, store.home, "share",
                                    lambda: _state(root, now), lambda: _peers(now))
                watcher.watch_tree()  # before the first scan: nothing is missed
                await nursery.start(watcher.run)
                try:
                    await _share(store, root, record, excludes, rules, watcher, stop, opts,
                                 ready, log, now)
                except Abandoned:
                    pass
                nursery.cancel_scope.cancel()
    finally:
        watcher.close()


def _state(root: str, now: dict) -> dict:
    drive = now.get("drive")
    drives = [] if drive is None else [{"key": drive.key_text, "state": "sharing",
                                        "length": drive.head.length if drive.head else 0,
                                        "version": now.get("version", 0)}]
    return {"directory": root, "listen": now.get("addresses", []), "drives": drives,
            "peers": len(_peers(now))}


def _peers(now: dict) -> list[dict]:
    swarm, drive = now.get("swarm"), now.get("drive")
    return swarm.peer_info(drive.key) if swarm is not None and drive is not None else []


async def _share(store: Store, root: str, record: ShareRecord | None, excludes: list[str],
                 rules: Rules, watcher: Watcher, stop: threading.Event, opts: Options,
                 ready, log, now: dict) -> None:
    progress = Bar(not opts.progress, "share")
    prefix = opts.message_prefix
    if record is None:
        def first():
            try:
                return create_drive(store, root, message=f"{prefix}{root}", warn=log,
                                    progress=progress, rules=rules, stop=stop)
            finally:
                progress.stop()
        result = await trio.to_thread.run_sync(first)
        key = crypto.encode_key(result.key)
        record = ShareRecord(root, key, list(excludes))
        save_record(store.home, record)
        log(f"created drive {key} for {root}: version 1, {result.files} files")
    else:
        record.excludes = list(excludes)
        save_record(store.home, record)
        result = None
    key = crypto.decode_key(record.key)
    drive = local_drive(store, key)
    drive.seed()  # ReadOnlyError: the home lost the secret key
    publisher = Publisher(drive, root, rules, warn=log, progress=progress, stop=stop)
    with store.writer_lock(key, f"drive {record.key} (is it shared already?)"):
        if result is None:  # catch up with what changed while no share ran
            def catch_up():
                try:
                    return publisher.publish(Changes.everything(), f"{prefix}catch up")
                finally:
                    progress.stop()
            result = await trio.to_thread.run_sync(catch_up)
            watcher.requeue(result.retry)
            if result.published:
                log(version_line(result))
        publisher.progress = None
        addresses: list[str] = []
        net = replace(opts.net or NetOptions(), listen=opts.listen)
        async with open_network(store, net, on_listening=addresses.extend) as swarm:
            serving = swarm.add_drive(Drive(store, key))
            now.update(swarm=swarm, drive=serving, addresses=addresses, version=result.version)
            ready(record.key, addresses)
            while True:
                changes = await watcher.next_batch()
                publisher.rules = watcher.rules
                result = await trio.to_thread.run_sync(
                    lambda: publisher.publish(changes, lambda summary: prefix + summary))
                watcher.requeue(result.retry)
                if result.published:
                    serving.reload_head()  # peers hear of it now, not at the next store poll
                    now["version"] = result.version
                    log(version_line(result))


def share_command(*, home, directory: str, opts: Options, daemon: bool,
                  argv: Sequence[str] | None) -> int:
    """`p2pfs share`: foreground by default; `daemon` re-runs `argv` detached."""
    ready_fd = daemon_mod.ready_fd()
    if daemon and ready_fd is None:
        if argv is None:
            raise ValueError("daemon mode needs the command line to re-run")
        return daemon_mod.spawn(list(argv), f"the share process for {directory}")
    store = open_store(home)
    if ready_fd is not None:
        opts.progress = False

    def ready(key: str, addresses: list[str]) -> None:
        lines = [key] + [f"listening on {a}" for a in addresses]
        last = f"p2pfs: sharing {os.path.realpath(directory)} as {key}"
        if ready_fd is None:
            print("\n".join(lines), flush=True)
            print(last + "; Ctrl-C to stop", file=sys.stderr, flush=True)
            return
        daemon_mod.detach(ready_fd, "\n".join(lines + [last]), store.home / LOG_NAME)

    try:
        trio.run(share, store, directory, opts, ready)
    finally:
        store.close()
    print("p2pfs: share: stopped", file=sys.stderr, flush=True)
    return 0
