"""The p2pfs command line.

Each subcommand is a small function `cmd_<name>(args) -> int`; `main` is the
only place that turns exceptions into exit codes: a `P2pfsError` prints
``p2pfs: <message>`` on stderr and exits with its `exit_code`; ^C exits 130;
a closed stdout (``| head``) exits 141 quietly, for every command.

Seams for later commands: `add_read_options(parser)` is called for every
command that reads a drive (the network adds ``--peer``/``--timeout``
there), `read_options(args)` turns them into `open_drive` keywords, and
`COMMANDS` lists (name, setup function) pairs in help order.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import stat as stat_mod
import sys
from typing import Callable

import trio

from . import __version__, config, crypto, drive as drive_mod, publish
from .errors import (BlockUnavailableError, P2pfsError, StoreDamagedError, UsageError,
                     VerificationError)
from .ignore import Rules
from .index import KIND_DIR, KIND_SYMLINK, Entry, normalize_path, shown
from .node import DEFAULT_TIMEOUT, DHT_PORT, NetOptions, local_drive, open_drive, open_store, parse_drive_ref
from .progress import Bar, size_text as _size
from .store import check_structure
from .workspace import DEFAULT_COMMIT_INTERVAL, MAX_COMMIT_INTERVAL

CAT_CHUNK = 4 << 20
CAT_FIRST = 1 << 20  # bytes a cold cat asks for with its first request


# --- output helpers ------------------------------------------------------------

def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _warning(text: str) -> None:
    _err(f"p2pfs: warning: {text}")


def _note_newer(drive) -> None:
    """Say so when a newer signed version is known than the one shown."""
    note = drive.newer_note()
    if note is not None:
        _err(f"p2pfs: note: {note}")


def _report_drive_content() -> None:
    """Problems of a drive's content (entries left out of a listing) go to
    stderr as warnings, once each (the mount's go to its log the same way)."""
    logger = logging.getLogger("p2pfs.drive")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("p2pfs: warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _mode_string(entry: Entry) -> str:
    kind = {KIND_DIR: stat_mod.S_IFDIR, KIND_SYMLINK: stat_mod.S_IFLNK}.get(entry.kind, stat_mod.S_IFREG)
    return stat_mod.filemode(kind | entry.mode)


def _time(ns: int) -> str:
    t = dt.datetime.fromtimestamp(ns // 1_000_000_000).astimezone()
    return f"{t:%Y-%m-%d %H:%M:%S}.{ns % 1_000_000_000:09d} {t:%z}"


def _entry_line(name: bytes, entry: Entry, long: bool) -> bytes:
    if not long:
        return name + b"\n"
    line = f"{_mode_string(entry)} {entry.size:>12} {_time(entry.mtime_ns)} ".encode() + name
    if entry.kind == KIND_SYMLINK:
        line += b" -> " + entry.target
    return line + b"\n"


# --- seams -----------------------------------------------------------------------

def add_net_options(parser: argparse.ArgumentParser) -> None:
    """Where peers come from: options of every command that reads or serves a drive."""
    parser.add_argument("--peer", metavar="HOST:PORT", action="append", default=[],
                        help="also use this peer (repeatable; adds to discovery)")
    parser.add_argument("--no-lan", dest="lan", action="store_false", default=None,
                        help="do not look for peers on the local network")
    parser.add_argument("--no-dht", dest="dht", action="store_false", default=None,
                        help="do not look for peers through the Mainline DHT")
    parser.add_argument("--bootstrap", metavar="HOST:PORT", action="append", default=None,
                        help="DHT bootstrap node (repeatable; default: the public routers)")


def add_read_options(parser: argparse.ArgumentParser) -> None:
    """Options of every command that reads a drive."""
    add_net_options(parser)
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=None,
                        help=f"give up when no block arrives for this long (default {DEFAULT_TIMEOUT:g})")


def add_exclude_option(parser: argparse.ArgumentParser) -> None:
    """--exclude of the commands that publish a directory (create, import, share)."""
    parser.add_argument("--exclude", metavar="PATTERN", action="append", default=[],
                        help="leave out paths matching this gitignore pattern (repeatable; "
                             "after the patterns of DIR/.p2pfsignore)")


def net_options(args: argparse.Namespace, listen: str | None = None) -> NetOptions:
    """NetOptions from the command line over the configuration file."""
    cfg = config.load()
    timeout = getattr(args, "timeout", None) or cfg.timeout or DEFAULT_TIMEOUT
    if timeout <= 0:
        raise UsageError("--timeout must be above 0 seconds")
    lan = cfg.lan if getattr(args, "lan", None) is None else args.lan
    dht = cfg.dht if getattr(args, "dht", None) is None else args.dht
    bootstrap = getattr(args, "bootstrap", None)
    return NetOptions(peers=tuple(dict.fromkeys(list(getattr(args, "peer", None) or ()) + cfg.peers)),
                      lan=lan, dht=dht, timeout=timeout, listen=listen,
                      bootstrap=tuple(bootstrap) if bootstrap is not None else
                      (tuple(cfg.bootstrap) if cfg.bootstrap is not None else None))


def read_options(args: argparse.Namespace) -> dict:
    """open_drive keywords from the read options."""
    return {"net": net_options(args)}


_open_stores: list = []


def _store(args):
    """The store of --home, closed by `main` when the command ends."""
    store = open_store(args.home)
    _open_stores.append(store)
    return store


# --- commands ----------------------------------------------------------------------

def cmd_create(args) -> int:
    store = _store(args)
    progress = Bar(args.quiet, "create")
    try:
        result = publish.create_drive(store, args.dir, message=args.message,
                                      block_size=args.block_size, warn=_warning,
                                      progress=progress, rules=Rules.load(args.dir, args.exclude))
    finally:
        progress.stop()
    key = crypto.encode_key(result.key)
    print(f"created version 1: {result.files} files, {_size(result.bytes)}, "
          f"{result.new_content_blocks} content blocks, length {result.length}")
    print(key)
    return 0


def cmd_import(args) -> int:
    store = _store(args)
    key, version = parse_drive_ref(args.key)
    if version is not None:
        raise UsageError("import writes a new version: give the key without @VERSION")
    drive = local_drive(store, key)
    progress = Bar(args.quiet, "import")
    try:
        result = publish.import_directory(drive, args.dir, message=args.message,
                                          checksum=args.checksum, warn=_warning,
                                          progress=progress,
                                          rules=Rules.load(args.dir, args.exclude))
    finally:
        progress.stop()
    print(f"version {result.version}: {result.new_content_blocks} new content blocks, "
          f"{result.reused_blocks} reused, {result.index_blocks} index blocks, "
          f"length {result.length}")
    return 0


async def _ls(args) -> int:
    store = _store(args)
    async with open_drive(store, args.key, hint=(os.fsencode(args.path), 0),
                          **read_options(args)) as drive:
        _note_newer(drive)
        path = args.path
        entry = await drive.lookup(path)
        if entry.kind != KIND_DIR:
            _out(_entry_line(os.fsencode(path), entry, args.long))
            return 0
        pending = [normalize_path(path)]
        first = True
        status = 0
        while pending:
            d = pending.pop(0)
            try:
                children = await drive.listdir(d)
            except (VerificationError, BlockUnavailableError) as exc:
                if first:
                    raise
                _err(f"p2pfs: cannot list {shown(d)}: {exc}")  # like ls -R: go on, exit 1
                status = 1
                continue
            if args.recursive:
                if not first:
                    _out(b"\n")
                _out(d + b":\n")
            first = False
            subdirs = []
            for name, e in children:
                _out(_entry_line(name, e, args.long))
                if e.kind == KIND_DIR:
                    subdirs.append((d.rstrip(b"/") + b"/" + name))
            if args.recursive:
                pending[:0] = subdirs
    return status


def cmd_ls(args) -> int:
    return trio.run(_ls, args)


async def _cat(args) -> int:
    store = _store(args)
    # the first bytes come with the index path, in the first round trip
    async with open_drive(store, args.key, hint=(os.fsencode(args.path), CAT_FIRST),
                          **read_options(args)) as drive:
        _note_newer(drive)
        path = normalize_path(args.path)
        entry = await drive.lookup(path)
        if entry.kind == KIND_DIR:
            raise UsageError(f"{args.path}: is a directory")
        if entry.kind == KIND_SYMLINK:
            raise UsageError(f"{args.path}: is a symbolic link to "
                             f"{os.fsdecode(entry.target)}; cat the target instead")
        out = sys.stdout.buffer
        offset = 0
        while offset < entry.size:
            data = await drive.read(entry, offset, CAT_CHUNK, path)
            if not data:
                break
            out.write(data)
            offset += len(data)
        out.flush()
    return 0


def cmd_cat(args) -> int:
    return trio.run(_cat, args)


async def _log(args) -> int:
    store = _store(args)
    async with open_drive(store, args.key, **read_options(args)) as drive:
        _note_newer(drive)
        if args.json:
            print(json.dumps([{"version": c.version, "length": length, "time_ns": c.time_ns,
                               "time": dt.datetime.fromtimestamp(c.time_ns / 1e9).astimezone()
                               .isoformat(), "files": c.files, "bytes": c.bytes,
                               "message": c.message} async for length, c in drive.history()],
                             indent=2))
            return 0
        async for length, c in drive.history():
            t = dt.datetime.fromtimestamp(c.time_ns / 1e9).astimezone()
            line = (f"version {c.version:<5} length {length:<10} {t:%Y-%m-%d %H:%M:%S %z}  "
                    f"{c.files} files  {_size(c.bytes)}")
            if c.message:
                line += f"  {c.message}"
            print(line)
    return 0


def cmd_log(args) -> int:
    return trio.run(_log, args)


RECOVERY = ("to recover: stop every p2pfs process using {home}, move {home}/store aside "
            "(keep {home}/keys), then fetch the drives again with "
            "--peer; see A DAMAGED STORE in p2pfs(1)")


_SHOWN = 8  # structural problems listed by verify


def _report(message: str) -> None:
    _err(f"p2pfs: verify: {message}")


def _verify_drive(store, key: bytes, version: int | None) -> bool:
    """Verify one drive (at `version`: that version and those before it), print
    the outcome; True if no problem was found."""
    drive = local_drive(store, key)
    length = None
    ref = drive.key_text
    if version is not None:
        try:
            drive.open_local(version)
        except VerificationError as exc:
            _report(str(exc))
            _report(f"drive {ref}@{version}: 1 problem(s) found")
            return False
        length = drive.length
        ref = f"{ref}@{version}"
    problems = drive_mod.verify_drive(drive, report=_report, length=length)
    _note_newer(drive)
    if problems:
        _report(f"drive {ref}: {len(problems)} problem(s) found")
        return False
    limit = drive.head.length if length is None else length
    held = sum(min(b, limit) - a for a, b in store.held_ranges(key) if a < limit)
    line = f"ok: drive {ref}, length {limit}, {held} blocks"
    if length is None:
        line += f" ({_size(store.held(key)[1])})"
    line += " and every signed head verified"
    if held < limit:
        line += f"; {limit - held} blocks not held here were not checked"
    print(line)
    return True


def _verify_damaged(exc: StoreDamagedError) -> int:
    """verify of a store whose file is damaged: what is wrong and how to recover."""
    _report(f"the store in {exc.home} is damaged: {exc.detail}")
    problems = check_structure(exc.home)
    for problem in problems[:_SHOWN]:
        _report(problem)
    if len(problems) > _SHOWN:
        _report(f"... and {len(problems) - _SHOWN} more problems in data.mdb")
    _report(RECOVERY.format(home=exc.home))
    return 1


async def _fetch_heads(args) -> None:
    """Learn the newest signed head from the peers (stored, verified)."""
    store = _store(args)
    async with open_drive(store, args.key, **read_options(args)):
        pass


def _version_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{text!r} is not a version number: give N >= 1 (see 'p2pfs log KEY')")
    return int(text)


async def _diff(args) -> int:
    from .history import classify
    key, at = parse_drive_ref(args.key)
    if at is not None:
        raise UsageError("give the versions to compare after the key: p2pfs diff KEY V1 [V2]")
    v1 = _version_arg(args.v1)
    v2 = _version_arg(args.v2) if args.v2 is not None else None
    async with open_drive(_store(args), key, **read_options(args)) as drive:
        _, old = await drive.commit_at(v1)
        _, new = await drive.commit_at(v2)
        changes = classify(await drive.diff(old, new))
    if args.json:
        print(json.dumps({"key": crypto.encode_key(key), "from": old.version, "to": new.version,
                          "changes": [c.as_json() for c in changes]}, indent=2))
        return 0
    for c in changes:
        _out(c.line() + b"\n")
    return 0


def cmd_diff(args) -> int:
    return trio.run(_diff, args)


def cmd_verify(args) -> int:
    try:
        if args.peer:
            if args.key is None:
                raise UsageError("verify --peer needs a KEY")
            trio.run(_fetch_heads, args)
        store = _store(args)
        ok = True
        if args.key is None:
            targets = [(key, None) for key, _ in store.list_drives()]
            for problem in store.check_structure():
                _report(problem)
                ok = False
            if not ok:
                _report(RECOVERY.format(home=store.home))
        else:
            targets = [parse_drive_ref(args.key)]
        for key, version in targets:
            ok = _verify_drive(store, key, version) and ok
        return 0 if ok else 1
    except StoreDamagedError as exc:
        return _verify_damaged(exc)


def _info(store, key: bytes, version: int | None = None, strict: bool = True) -> dict:
    """What `info` shows (of `version`, default the newest).  A damaged drive
    raises VerificationError, or with strict=False is marked "damaged" (so
    `drives` still lists the others)."""
    drive = local_drive(store, key)
    blocks, nbytes = store.held(key)
    info = {"key": drive.key_text, "version": 0, "length": drive.head.length,
            "newest_length": drive.head.length,
            "blocks_held": blocks, "bytes_held": nbytes, "writable": drive.writable,
            "block_size": None, "files": None, "bytes": None,
            "discovery_key": crypto.discovery_key(key).hex(),
            "forks": len(store.forks(key))}
    try:
        drive.open_local(version)
        info.update(version=drive.version, length=drive.length, block_size=drive.block_size,
                    files=drive.commit.files, bytes=drive.commit.bytes)
        note = drive.newer_note()
        if note is not None:
            info["note"] = note
    except BlockUnavailableError:
        if version is not None:
            raise
        pass  # a partial copy without the newest commit: version unknown
    except VerificationError as exc:
        if strict:
            raise
        info["damaged"] = str(exc)
    return info


async def _info_with_peers(args, net: NetOptions) -> dict:
    store = _store(args)
    key, version = parse_drive_ref(args.key)
    async with open_drive(store, key, version, net=net) as drive:
        info = _info(store, key, version)
        swarm = drive.source
        info["peers"] = swarm.peer_info(key) if swarm is not None else []
        info["discovery"] = swarm.discovery_info() if swarm is not None else {}
    return info


def cmd_info(args) -> int:
    net = net_options(args)
    store = _store(args)
    key, version = parse_drive_ref(args.key)
    owned = store.key_path(crypto.encode_key(key)).exists()
    if net.networked and (net.peers or not owned):
        info = trio.run(_info_with_peers, args, net)
    else:
        info = _info(store, key, version)
        info["peers"] = []
        info["discovery"] = {}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            if k == "peers":
                print(f"{k:14} {len(v)} connected")
                for p in v:
                    print(f"  {p['address']}  from {p['source']}  node {(p['node_key'] or '?')[:16]}  "
                          f"length {p['length']}  {p['blocks']} blocks announced")
            elif k == "discovery":
                for name, st in v.items():
                    print(f"{name:14} " + ", ".join(f"{a} {b}" for a, b in st.items()
                                                   if not isinstance(b, (dict, list))))
            else:
                print(f"{k:14} {v}")
    return 0


def cmd_drives(args) -> int:
    store = _store(args)
    for key, record in store.list_drives():
        try:
            info = _info(store, key, strict=False)
        except StoreDamagedError:
            raise  # the store, not one drive: one line for the whole command
        except P2pfsError as exc:
            print(f"{crypto.encode_key(key)}  damaged: {exc}")
            continue
        print(f"{info['key']}  v{info['version']:<4} {_size(info['bytes_held']):>10}  "
              f"{'rw' if info['writable'] else 'ro'}" + ("  damaged" if "damaged" in info else ""))
    return 0


# --- parser ------------------------------------------------------------------------

def _setup_create(sub):
    p = sub.add_parser("create", help="new drive from DIR (version 1); prints its key last")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-m", "--message", default="", help="version message")
    p.add_argument("--block-size", type=int, default=drive_mod.DEFAULT_BLOCK_SIZE,
                   help="content block size in bytes (power of two, default 65536)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_exclude_option(p)
    p.set_defaults(func=cmd_create)


def _setup_import(sub):
    p = sub.add_parser("import", help="new version of an owned drive, equal to DIR")
    p.add_argument("key", metavar="KEY")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-m", "--message", default="", help="version message")
    p.add_argument("-c", "--checksum", action="store_true",
                   help="hash every file instead of trusting size+mtime+mode")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_exclude_option(p)
    p.set_defaults(func=cmd_import)


def _setup_ls(sub):
    p = sub.add_parser("ls", help="list a directory of a drive")
    p.add_argument("-l", dest="long", action="store_true", help="long listing")
    p.add_argument("-R", dest="recursive", action="store_true", help="recursive")
    p.add_argument("key", metavar="KEY[@VERSION]")
    p.add_argument("path", metavar="PATH", nargs="?", default="/")
    add_read_options(p)
    p.set_defaults(func=cmd_ls)


def _setup_cat(sub):
    p = sub.add_parser("cat", help="write a file's bytes to stdout")
    p.add_argument("key", metavar="KEY[@VERSION]")
    p.add_argument("path", metavar="PATH")
    add_read_options(p)
    p.set_defaults(func=cmd_cat)


def _setup_log(sub):
    p = sub.add_parser("log", help="versions of a drive, newest first (KEY@N: from version N down)")
    p.add_argument("key", metavar="KEY[@VERSION]")
    p.add_argument("--json", action="store_true", help="JSON output")
    add_read_options(p)
    p.set_defaults(func=cmd_log)


def _setup_diff(sub):
    p = sub.add_parser("diff", help="what changed between two versions (default V2: the newest)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("v1", metavar="V1")
    p.add_argument("v2", metavar="V2", nargs="?", default=None)
    p.add_argument("--json", action="store_true", help="JSON output")
    add_read_options(p)
    p.set_defaults(func=cmd_diff)


def _setup_verify(sub):
    p = sub.add_parser("verify", help="re-check every held block, tree node and signature "
                                      "(no KEY: the whole store and every drive)")
    p.add_argument("key", metavar="KEY[@VERSION]", nargs="?", default=None)
    add_read_options(p)
    p.set_defaults(func=cmd_verify)


def _setup_drives(sub):
    p = sub.add_parser("drives", help="drives in this home")
    p.set_defaults(func=cmd_drives)


def _setup_info(sub):
    p = sub.add_parser("info", help="a drive's version, length and what is held")
    p.add_argument("key", metavar="KEY[@VERSION]")
    p.add_argument("--json", action="store_true", help="JSON output")
    add_read_options(p)
    p.set_defaults(func=cmd_info)


def cmd_seed(args) -> int:
    from . import seeder
    from .net import transport

    store = _store(args)
    keys = [parse_drive_ref(k)[0] for k in args.keys]
    listen = args.listen or config.load().listen or transport.DEFAULT_LISTEN
    transport.parse_address(listen)
    net = net_options(args, listen=listen)

    def listening(addresses: list[str]) -> None:
        for a in addresses:
            print(f"listening on {a}", flush=True)

    trio.run(seeder.seed, store, keys, net, listening)
    _err("p2pfs: seed: stopped")
    return 0


def _setup_seed(sub):
    from .net.transport import DEFAULT_LISTEN
    p = sub.add_parser("seed", help="serve drives of this home to peers (foreground)")
    p.add_argument("keys", metavar="KEY", nargs="+")
    p.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help=f"address to accept peers on (default {DEFAULT_LISTEN}; port 0: any free port)")
    add_net_options(p)
    p.set_defaults(func=cmd_seed)


def cmd_share(args) -> int:
    from . import share
    from .net import transport
    listen = args.listen or config.load().listen or transport.DEFAULT_LISTEN
    opts = share.Options(listen=listen, net=net_options(args, listen=listen),
                         excludes=args.exclude or None, message_prefix=args.message_prefix,
                         quiet=args.debounce, max_delay=args.max_delay, progress=not args.quiet)
    if opts.quiet < 0 or opts.max_delay < opts.quiet:
        raise UsageError("--debounce must be >= 0 and --max-delay at least as long")
    return share.share_command(home=args.home, directory=args.dir, opts=opts,
                               daemon=args.daemon, argv=args.argv)


def _setup_share(sub):
    from .net.transport import DEFAULT_LISTEN
    from .watch import DEFAULT_MAX_DELAY, DEFAULT_QUIET
    p = sub.add_parser("share", help="publish DIR as it changes and serve it (foreground); "
                                     "prints its key")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help=f"address to accept peers on (default {DEFAULT_LISTEN}; port 0: any free port)")
    p.add_argument("--message-prefix", metavar="TEXT", default="share: ",
                   help="start of every version's message (default 'share: ')")
    add_exclude_option(p)
    p.add_argument("--debounce", metavar="SECONDS", type=float, default=DEFAULT_QUIET,
                   help=f"publish this long after the last change (default {DEFAULT_QUIET:g})")
    p.add_argument("--max-delay", metavar="SECONDS", type=float, default=DEFAULT_MAX_DELAY,
                   help=f"... but at most this long after the first (default {DEFAULT_MAX_DELAY:g})")
    p.add_argument("--daemon", action="store_true",
                   help="run in the background; return once the key is published and served")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar for the first import")
    add_net_options(p)
    p.set_defaults(func=cmd_share)


def cmd_dht(args) -> int:
    import signal

    from .node import run_dht_node
    listen = args.listen or f"0.0.0.0:{DHT_PORT}"

    def listening(addresses: list[str]) -> None:
        for a in addresses:
            print(f"dht listening on {a}", flush=True)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_dht_node, net_options(args), listen, listening)
                async for _sig in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    _err("p2pfs: dht: stopped")
    return 0


def _setup_dht(sub):
    p = sub.add_parser("dht", help="run a Mainline DHT node only (e.g. a bootstrap node; foreground)")
    p.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help=f"UDP address (default 0.0.0.0:{DHT_PORT}; port 0: any free port)")
    p.add_argument("--bootstrap", metavar="HOST:PORT", action="append", default=None,
                   help="bootstrap node (repeatable; default: the public routers)")
    p.set_defaults(func=cmd_dht)


def cmd_mount(args) -> int:
    from . import mount  # pyfuse3 is loaded only by the commands that mount
    from .net import transport
    net = net_options(args)
    if net.discovery or args.listen:
        # a mount found through discovery is announced there too: it serves
        # what it holds to other readers
        net.listen = args.listen or config.load().listen or transport.EPHEMERAL_LISTEN
    writable = None
    if args.rw:
        if args.commit_interval <= 0:
            raise UsageError("--commit-interval must be above 0 seconds")
        writable = mount.Writable(commit_interval=args.commit_interval)
    elif args.commit_interval != DEFAULT_COMMIT_INTERVAL:
        raise UsageError("--commit-interval is for a writable mount: give --rw too")
    return mount.mount_command(home=args.home, ref=args.key, mountpoint=args.mountpoint,
                               daemon=args.daemon, allow_other=args.allow_other,
                               allow_non_empty=args.allow_non_empty,
                               argv=args.argv, net=net, writable=writable)


def cmd_umount(args) -> int:
    from . import mount
    return mount.umount_command(args.mountpoint)


def _setup_mount(sub):
    p = sub.add_parser("mount", help="mount a drive as a folder (live; KEY@N: that version, fixed)")
    p.add_argument("key", metavar="KEY[@VERSION]")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--daemon", action="store_true",
                   help="run in the background; return once the mount is ready")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users read the mount (needs user_allow_other in "
                        "/etc/fuse.conf unless root)")
    p.add_argument("--allow-non-empty", action="store_true",
                   help="mount even if MOUNTPOINT has files (they are hidden while mounted)")
    p.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help="accept peers here and serve them what the mount holds "
                        "(default with discovery: any free port)")
    p.add_argument("--rw", action="store_true",
                   help="writable (a drive whose secret key is in this home): every commit "
                        "is a new signed version")
    p.add_argument("--commit-interval", metavar="SECONDS", type=float,
                   default=DEFAULT_COMMIT_INTERVAL,
                   help=f"with --rw: commit this long after the last change (default "
                        f"{DEFAULT_COMMIT_INTERVAL:g}; at most {MAX_COMMIT_INTERVAL:g} s, or "
                        "this long if more, after the first); fsync commits at once")
    add_read_options(p)
    p.set_defaults(func=cmd_mount)


def _setup_umount(sub):
    p = sub.add_parser("umount", help="unmount a p2pfs mount (lazily if files are open)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)


COMMANDS: list[tuple[str, Callable]] = [
    ("create", _setup_create), ("import", _setup_import), ("ls", _setup_ls),
    ("cat", _setup_cat), ("log", _setup_log), ("diff", _setup_diff), ("verify", _setup_verify),
    ("drives", _setup_drives), ("info", _setup_info), ("seed", _setup_seed),
    ("share", _setup_share),
    ("mount", _setup_mount), ("umount", _setup_umount), ("dht", _setup_dht),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2pfs", description="Mount a peer-to-peer drive as a folder.")
    parser.add_argument("--home", metavar="DIR", default=None,
                        help="node home (default $P2PFS_HOME or ~/.local/share/p2pfs)")
    parser.add_argument("--version", action="version", version=f"p2pfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for _name, setup in COMMANDS:
        setup(sub)
    return parser


def _is_noise(exc: BaseException) -> bool:
    """Exceptions that ride along with a real error out of a nursery."""
    return isinstance(exc, (KeyboardInterrupt, trio.Cancelled))


def _only(group: BaseExceptionGroup, kind: type) -> bool:
    """Whether `group` holds `kind` and nothing else but noise."""
    found, rest = group.split(kind)
    return found is not None and (rest is None or rest.split(_is_noise)[1] is None)


def _broken_pipe() -> int:
    """The reader of our stdout went away (`| head`): exit quietly, as a
    command killed by SIGPIPE would.  Whatever is still buffered for stdout
    goes to /dev/null, so the interpreter's last flush is quiet too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(argv) if argv is not None else sys.argv[1:]  # mount --daemon re-runs it
        _report_drive_content()
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here for small outputs
        return code
    except BrokenPipeError:
        return _broken_pipe()
    except P2pfsError as exc:
        _err(f"p2pfs: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _err("p2pfs: interrupted")
        return 130
    except BaseExceptionGroup as group:
        # A trio nursery wraps what its tasks raised.  A user-facing error in
        # it is reported like any other; anything else keeps its traceback.
        if _only(group, BrokenPipeError):
            return _broken_pipe()
        if not _only(group, P2pfsError):
            raise
        first = _first_leaf(group.split(P2pfsError)[0])
        _err(f"p2pfs: {first}")
        return first.exit_code
    finally:
        while _open_stores:
            _open_stores.pop().close()
