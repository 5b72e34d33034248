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

from . import __version__, config, crypto, drive as drive_mod, heap, publish
from .cache import usage as cache_usage
from .errors import (BlockUnavailableError, NotFoundError, P2pfsError, StoreDamagedError,
                     UsageError, VerificationError)
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
    add_cache_option(parser)


def add_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-size", metavar="SIZE", default=None,
                        help="cap the cache of drives this home neither owns nor pins "
                             "(e.g. 100M, 10G; default: the configuration's cache_size, else none)")


def cache_size(args: argparse.Namespace) -> int | None:
    """The cache cap of a command: --cache-size, else the configuration file's."""
    value = getattr(args, "cache_size", None)
    if value is not None:
        return config.parse_size(value)
    return config.load().cache_size


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
    return {"net": net_options(args), "cache_size": cache_size(args)}


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


def _whole_drive(text: str, why: str) -> bytes:
    """The key of a command that acts on a drive, not a version: KEY@N is a
    usage error saying `why`."""
    key, version = parse_drive_ref(text)
    if version is not None:
        raise UsageError(f"{why}: give the key without @VERSION")
    return key


def cmd_import(args) -> int:
    store = _store(args)
    key = _whole_drive(args.key, "import writes a new version")
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


def _entry_json(path: bytes, name: bytes, entry: Entry) -> dict:
    from .history import KIND_NAMES
    out = {"path": os.fsdecode(path), "name": os.fsdecode(name),
           "kind": KIND_NAMES.get(entry.kind, str(entry.kind)), "mode": f"{entry.mode:04o}",
           "size": entry.size, "mtime_ns": entry.mtime_ns}
    if entry.kind == KIND_SYMLINK:
        out["target"] = os.fsdecode(entry.target)
    return out


async def _ls(args) -> int:
    store = _store(args)
    listed: list[dict] = []
    async with open_drive(store, args.key, hint=(os.fsencode(args.path), 0),
                          **read_options(args)) as drive:
        _note_newer(drive)
        path = normalize_path(args.path)
        entry = await drive.lookup(path)
        if entry.kind != KIND_DIR:
            if args.json:
                listed.append(_entry_json(path, path.rpartition(b"/")[2] or b"/", entry))
            else:
                _out(_entry_line(os.fsencode(args.path), entry, args.long))
        pending = [path] if entry.kind == KIND_DIR else []
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
            if args.recursive and not args.json:
                if not first:
                    _out(b"\n")
                _out(d + b":\n")
            first = False
            subdirs = []
            for name, e in children:
                child = d.rstrip(b"/") + b"/" + name
                if args.json:
                    listed.append(_entry_json(child, name, e))
                else:
                    _out(_entry_line(name, e, args.long))
                if e.kind == KIND_DIR:
                    subdirs.append(child)
            if args.recursive:
                pending[:0] = subdirs
        if args.json:
            print(json.dumps({"key": drive.key_text, "version": drive.version,
                              "entries": listed}, indent=2))
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
    info.update(cache_usage(store, key))
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
    listed = []
    for key, record in store.list_drives():
        try:
            info = _info(store, key, strict=False)
        except StoreDamagedError:
            raise  # the store, not one drive: one line for the whole command
        except P2pfsError as exc:
            info = {"key": crypto.encode_key(key), "damaged": str(exc)}
        listed.append(info)
        if args.json:
            continue
        if "version" not in info:
            print(f"{info['key']}  damaged: {info['damaged']}")
            continue
        print(f"{info['key']}  v{info['version']:<4} {_size(info['bytes_held']):>10}  "
              f"{'rw' if info['writable'] else 'ro'}  {info['state']}"
              + (f" {_size(info['bytes_cached'])} evictable" if info["bytes_cached"] else "")
              + ("  damaged" if "damaged" in info else ""))
    if args.json:
        print(json.dumps(listed, indent=2))
    else:
        from .cache import cache_held
        cap = cache_size(args)
        print(f"cache: {_size(cache_held(store))} held by drives neither owned nor pinned"
              + (f" (cap {_size(cap)})" if cap is not None else " (no cap)"), file=sys.stderr)
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
    p.add_argument("--json", action="store_true", help="JSON output")
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
    p.add_argument("--json", action="store_true", help="JSON output")
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

    keys = [parse_drive_ref(k)[0] for k in args.keys]
    listen = args.listen or config.load().listen or transport.DEFAULT_LISTEN
    transport.parse_address(listen)
    net = net_options(args, listen=listen)
    opts = seeder.Options(latest=args.latest, json=args.json, verbose=args.verbose)
    return seeder.seed_command(home=args.home, keys=keys, net=net, opts=opts,
                               daemon=args.daemon, argv=args.argv)


def _setup_seed(sub):
    from .net.transport import DEFAULT_LISTEN
    p = sub.add_parser("seed", help="download, verify, follow and serve drives (foreground)")
    p.add_argument("keys", metavar="KEY", nargs="*",
                   help="drives to seed (default: every drive of this home owned or pinned)")
    p.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help=f"address to accept peers on (default {DEFAULT_LISTEN}; port 0: any free port)")
    p.add_argument("--latest", action="store_true",
                   help="fetch only what the newest version references, not every version")
    p.add_argument("--json", action="store_true", help="JSON lines on standard output")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log the peers that connect and what they are sent")
    p.add_argument("--daemon", action="store_true",
                   help="run in the background; return once every drive is served")
    add_net_options(p)
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=None,
                   help="seconds before a fetch no peer answers is tried again later "
                        f"(default {DEFAULT_TIMEOUT:g})")
    p.set_defaults(func=cmd_seed)


# --- mirror -----------------------------------------------------------------------------

async def _mirror(args) -> int:
    import signal

    from . import mirror as mirror_mod, status
    from .progress import Live
    store = _store(args)
    key, version = parse_drive_ref(args.key)
    if args.live and version is not None:
        raise UsageError("--live follows new versions: give the key without @VERSION")
    live = Live("mirror", json_lines=args.json, quiet=args.quiet)
    opts = mirror_mod.Options(prune=not args.no_prune, full=args.full, safe_links=args.safe_links)
    directory = os.path.realpath(args.dir)
    now: dict = {"state": "starting"}

    def report(path: str, why: str) -> None:
        live.step(f"refused {path}: {why}", "refused", warning=True, path=path, reason=why)

    def on_version(st) -> None:
        now.update(state="idle", version=st.version, length=st.length)
        if "status" in now:
            now["status"].changed()
        for note in st.notes:
            live.step(f"note: {note}", "note", warning=True, text=note)
        live.step(f"version {st.version} in {directory}: {st.written} written ({_size(st.bytes)}), "
                  f"{st.dirs} directories made, {st.deleted} deleted, {st.unchanged} unchanged"
                  + (f", {st.refused} refused" if st.refused else ""), "version",
                  key=crypto.encode_key(key), directory=directory, **st.as_json())

    def progress(done: int, total: int) -> None:
        now.update(state="writing", bytes_done=done, bytes_total=total)
        live.update(f"{crypto.encode_key(key)[:12]}…", done=done, total=total, key=crypto.encode_key(key))

    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_drive(store, key, version, **read_options(args)) as drive:
                def snapshot() -> dict:
                    return {"argv": ["mirror", args.key, directory], "directory": directory,
                            "drives": [{"key": drive.key_text, "version": now.get("version", 0),
                                        "length": now.get("length", 0), "state": now["state"],
                                        "bytes_done": now.get("bytes_done", 0),
                                        "bytes_total": now.get("bytes_total")}],
                            "peers": len(drive.source.peer_info(key)) if drive.source else 0}

                refused = 0
                async with trio.open_nursery() as nursery:
                    now["status"] = await nursery.start(
                        status.publish, store.home, "mirror", snapshot,
                        (lambda: drive.source.peer_info(key)) if drive.source else None)

                    async def stop_on_signal():
                        async for _sig in signals:
                            nursery.cancel_scope.cancel()
                            return

                    nursery.start_soon(stop_on_signal)

                    def waiting(why: str) -> None:
                        now.update(state="waiting")
                        now["status"].changed()
                        live.step(f"waiting for peers ({why})", "waiting", reason=why)

                    refused = await mirror_mod.mirror(drive, args.dir, opts, args.live, report,
                                                      on_version, progress, waiting)
                    nursery.cancel_scope.cancel()
    finally:
        live.stop()
    if refused:
        _err(f"p2pfs: mirror: {refused} entries of the drive were refused (named above)")
        return 1
    return 0


def cmd_mirror(args) -> int:
    return trio.run(_mirror, args)


def _setup_mirror(sub):
    p = sub.add_parser("mirror", help="export a drive to a plain directory (incremental; "
                                      "--live: follow new versions)")
    p.add_argument("key", metavar="KEY[@VERSION]")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--live", action="store_true", help="keep following new versions")
    p.add_argument("--no-prune", action="store_true",
                   help="keep what the drive removed (and files DIR has that the drive lacks)")
    p.add_argument("--full", action="store_true",
                   help="compare every entry with DIR, not only what changed since the last run")
    p.add_argument("--safe-links", action="store_true",
                   help="refuse symbolic links that are absolute or point out of DIR")
    p.add_argument("--json", action="store_true", help="JSON lines on standard output")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress and no report of each version (what is refused is still named)")
    add_read_options(p)
    p.set_defaults(func=cmd_mirror)


# --- the cache: pin, unpin, gc, forget ------------------------------------------------

async def _pin(args) -> int:
    from . import download
    from .index import normalize_path
    store = _store(args)
    key = _whole_drive(args.key, "pin keeps a drive's newest version")
    path = normalize_path(args.path) if args.path is not None else None
    async with open_drive(store, key, **read_options(args)) as drive:
        usage = cache_usage(store, key)
        if usage["state"] == "owned":
            print(f"drive {drive.key_text} is owned by this home: it is always kept")
            return 0
        if path is None:
            store.set_pins(key, pinned=True)
        else:
            await drive.lookup(path)  # NotFoundError names it
            record = store.get_drive(key)
            store.set_pins(key, paths=[*record.paths, path])
        want = await download.version_blocks(drive, [path or b"/"])
        if drive.source is None:
            missing = sum(1 for b in want if not drive.has_block(b))
            if missing:
                raise BlockUnavailableError(f"pinned, but {missing} blocks of it are not held "
                                            "and no peer is known: give --peer HOST:PORT to fetch them")
        else:  # it fetches only what is not held
            await download.fetch_blocks(drive, sorted(want))
        where = f"{os.fsdecode(path)} of drive" if path is not None else "drive"
        print(f"pinned {where} {drive.key_text}@{drive.version}: {len(want)} content blocks "
              f"({_size(sum(want.values()))}) held and kept")
    return 0


def cmd_pin(args) -> int:
    return trio.run(_pin, args)


def cmd_unpin(args) -> int:
    from .index import normalize_path
    store = _store(args)
    key = _whole_drive(args.key, "unpin releases what pin kept, every version")
    drive = local_drive(store, key)
    record = store.get_drive(key)
    if args.path is None:
        if not record.pinned and not record.paths:
            raise UsageError(f"drive {drive.key_text} is not pinned")
        store.set_pins(key, pinned=False, paths=())
        what = f"drive {drive.key_text}"
    else:
        path = normalize_path(args.path)
        if path not in record.paths:
            pinned = ", ".join(os.fsdecode(p) for p in record.paths) or "none"
            raise UsageError(f"{os.fsdecode(path)} is not pinned in drive {drive.key_text} "
                             f"(pinned folders: {pinned})")
        store.set_pins(key, paths=[p for p in record.paths if p != path])
        what = f"{os.fsdecode(path)} of drive {drive.key_text}"
    if cache_usage(store, key)["state"] == "owned":
        print(f"{what} is owned by this home: it is always kept")
    else:
        print(f"unpinned {what}: what it holds may now be evicted from the cache")
    return 0


def cmd_gc(args) -> int:
    from .cache import cache_held, evict
    store = _store(args)
    cap = cache_size(args)
    before = cache_held(store)
    blocks, freed = evict(store, cap if cap is not None else 0)
    after = cache_held(store)
    limit = f"cap {_size(cap)}" if cap is not None else "no cap: every cached block"
    print(f"gc: evicted {blocks} blocks ({_size(freed)}); the cache held {_size(before)}, "
          f"now {_size(after)} ({limit})")
    return 0


def cmd_forget(args) -> int:
    store = _store(args)
    key = _whole_drive(args.key, "forget drops a whole drive")
    text = crypto.encode_key(key)
    if store.get_drive(key) is None and store.latest_head(key) is None:
        raise NotFoundError(f"unknown drive {text}: nothing to forget")
    if store.key_path(text).exists():
        raise UsageError(f"drive {text} is owned by this home: forgetting it would destroy "
                         f"its only copy; move {store.key_path(text)} away first if you mean it")
    _blocks, nbytes = store.held(key)
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"forget drive {text} and its {_size(nbytes)}? "
                             "Give --yes (standard input is not a terminal to ask on)")
        answer = input(f"forget drive {text} and the {_size(nbytes)} held of it? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            _err("p2pfs: forget: nothing done")
            return 1
    while store.forget_some(key):
        pass
    store.forget_drive(key)
    print(f"forgot drive {text} ({_size(nbytes)} freed)")
    return 0


def _setup_pin(sub):
    p = sub.add_parser("pin", help="keep a drive (or one folder of it) downloaded, never evicted")
    p.add_argument("key", metavar="KEY")
    p.add_argument("path", metavar="PATH", nargs="?", default=None)
    add_read_options(p)
    p.set_defaults(func=cmd_pin)


def _setup_unpin(sub):
    p = sub.add_parser("unpin", help="let a pinned drive (or folder) be evicted again")
    p.add_argument("key", metavar="KEY")
    p.add_argument("path", metavar="PATH", nargs="?", default=None)
    p.set_defaults(func=cmd_unpin)


def _setup_gc(sub):
    p = sub.add_parser("gc", help="evict cached blocks down to the cache cap (none: all of them)")
    add_cache_option(p)
    p.set_defaults(func=cmd_gc)


def _setup_forget(sub):
    p = sub.add_parser("forget", help="drop a drive and every block of it from this home")
    p.add_argument("key", metavar="KEY")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_forget)


# --- status ----------------------------------------------------------------------------

def cmd_status(args) -> int:
    from . import status
    store = _store(args)
    states = status.read_all(store.home)
    if args.json:
        print(json.dumps(states, indent=2))
        return 0
    if not states:
        print("no p2pfs process is using this home")
        return 0
    for st in states:
        where = st.get("mountpoint") or st.get("directory") or ""
        since = dt.datetime.fromtimestamp(st.get("started", 0)).astimezone()
        line = f"{st.get('kind', '?'):<7} pid {st.get('pid')}  since {since:%Y-%m-%d %H:%M:%S}"
        if where:
            line += f"  {where}"
        if st.get("listen"):
            line += "  listening on " + ", ".join(st["listen"])
        print(line)
        if "bytes_up" in st:
            print(f"        {_peers(st.get('peers', 0))}  up {_size(st['bytes_up'])} "
                  f"({_size(st.get('rate_up', 0))}/s)  down {_size(st['bytes_down'])} "
                  f"({_size(st.get('rate_down', 0))}/s)")
        for d in st.get("drives", []):
            total = d.get("bytes_total")
            part = f"  {_size(d.get('bytes_done', 0))} of {_size(total)}" if total else ""
            print(f"        {d.get('key')}  v{d.get('version', 0)}  {d.get('state', '')}{part}"
                  + (f"  {_peers(d['peers'])}" if "peers" in d else ""))
    return 0


def _peers(n: int) -> str:
    return f"{n} peer{'' if n == 1 else 's'}"


def _setup_status(sub):
    p = sub.add_parser("status", help="the p2pfs processes using this home and what they do")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_status)


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
    o = mount.parse_mount_options(args.options)
    if o.home is not None and args.home is None:
        args.home = o.home
    args.allow_other = args.allow_other or o.allow_other
    args.allow_non_empty = args.allow_non_empty or o.allow_non_empty
    args.peer = list(args.peer) + o.peers
    args.listen = args.listen or o.listen
    if args.timeout is None and o.timeout is not None:
        try:
            args.timeout = float(o.timeout)
        except ValueError:
            raise UsageError(f"timeout={o.timeout}: give a number of seconds") from None
    if args.cache_size is None:
        args.cache_size = o.cache_size
    if o.lan is not None and args.lan is None:
        args.lan = o.lan
    if o.dht is not None and args.dht is None:
        args.dht = o.dht
    if o.bootstrap is not None and args.bootstrap is None:
        args.bootstrap = o.bootstrap
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
                               argv=args.argv, net=net, writable=writable,
                               cache_size=cache_size(args), kernel=o.kernel)


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
    p.add_argument("-o", dest="options", metavar="OPT[,OPT...]", action="append", default=[],
                   help="mount options as mount(8) and /etc/fstab give them: allow_other, "
                        "timeout=S, cache_size=SIZE, peer=HOST:PORT, listen=HOST:PORT, "
                        "bootstrap=HOST:PORT, no_lan, no_dht, home=DIR, noexec, noatime, ...")
    add_read_options(p)
    p.set_defaults(func=cmd_mount)


def _setup_umount(sub):
    p = sub.add_parser("umount", help="unmount a p2pfs mount (lazily if files are open)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)


def cmd_units(args) -> int:
    from pathlib import Path
    source = Path(__file__).resolve().parent / "systemd"
    units = sorted(source.glob("*.service"))
    if not args.install:
        print(source)
        for u in units:
            print(f"  {u.name}")
        return 0
    target = Path(args.dir) if args.dir else \
        Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"
    target.mkdir(parents=True, exist_ok=True)
    script = Path(sys.executable).parent / "p2pfs"  # the console script of this installation
    program = str(script) if os.access(script, os.X_OK) else f"{sys.executable} -m p2pfs"
    for u in units:
        text = u.read_text().replace("/usr/bin/env p2pfs", program)
        (target / u.name).write_text(text)
        print(f"installed {target / u.name}")
    _err("p2pfs: units: run 'systemctl --user daemon-reload', then e.g. "
         "'systemctl --user enable --now p2pfs-seed@KEY.service'")
    return 0


def _setup_units(sub):
    p = sub.add_parser("units", help="the systemd user units shipped with p2pfs (--install: "
                                     "into ~/.config/systemd/user)")
    p.add_argument("--install", action="store_true", help="copy them, running this p2pfs")
    p.add_argument("--dir", metavar="DIR", default=None,
                   help="install into DIR (default $XDG_CONFIG_HOME/systemd/user)")
    p.set_defaults(func=cmd_units)


COMMANDS: list[tuple[str, Callable]] = [
    ("create", _setup_create), ("import", _setup_import), ("ls", _setup_ls),
    ("cat", _setup_cat), ("log", _setup_log), ("diff", _setup_diff), ("verify", _setup_verify),
    ("drives", _setup_drives), ("info", _setup_info), ("seed", _setup_seed),
    ("share", _setup_share), ("mirror", _setup_mirror), ("pin", _setup_pin),
    ("unpin", _setup_unpin), ("gc", _setup_gc), ("forget", _setup_forget),
    ("status", _setup_status),
    ("mount", _setup_mount), ("umount", _setup_umount), ("dht", _setup_dht),
    ("units", _setup_units),
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


def mount_helper_argv(argv: list[str]) -> list[str] | None:
    """mount(8)'s way of running a FUSE file system (through mount.fuse3, for
    `mount -t fuse.p2pfs KEY DIR -o OPTS` and fstab lines of type fuse.p2pfs):
    `p2pfs SOURCE MOUNTPOINT [-o OPTS]... [-f] [-n] [-s] [-v]`, as the `mount`
    command line that does it: in the background (mount(8) waits for its
    helper to return) unless -f.  None if `argv` is not that form."""
    names = {name for name, _setup in COMMANDS}
    if len(argv) < 2 or argv[0].startswith("-") or argv[0] in names:
        return None
    try:
        parse_drive_ref(argv[0])
    except UsageError:
        return None
    out = ["mount", argv[0], argv[1]]
    foreground = False
    rest = argv[2:]
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "-o" and i + 1 < len(rest):
            out += ["-o", rest[i + 1]]
            i += 1
        elif a.startswith("-o") and len(a) > 2:
            out += ["-o", a[2:]]
        elif a == "-f":
            foreground = True
        elif a not in ("-n", "-s", "-v"):
            raise UsageError(f"{a!r}: as a mount helper p2pfs takes SOURCE MOUNTPOINT "
                             "[-o OPTIONS] [-f]")
        i += 1
    return out if foreground else out + ["--daemon"]


def main(argv: list[str] | None = None) -> int:
    heap.tune()  # before the first large allocation: the store and the wire are built on it
    try:
        parser = build_parser()
        argv = list(argv) if argv is not None else sys.argv[1:]
        argv = mount_helper_argv(argv) or argv
        args = parser.parse_args(argv)
        args.argv = argv  # mount --daemon re-runs it
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
