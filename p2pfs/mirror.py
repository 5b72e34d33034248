"""`p2pfs mirror KEY[@N] DIR`: a drive exported to a plain directory,
incrementally, never writing outside DIR.

Theory of operation
-------------------
*What changes.*  A run compares two versions of the drive's index, never
the bytes in DIR.  `HOME/mirrors/<hash of DIR's real path>.json` records the
drive and version last written completely into DIR; the next run takes
`Drive.diff_keys` from that version to the target (only the changed
entries: O(changes)).  The first run, a run for another drive or into an
empty DIR, and `--full` take every entry of the target (a diff from an empty index) and also list
each directory of DIR to remove what the drive does not have.  Either way
each entry is compared with what DIR holds by `lstat` alone (kind, size,
mtime in ns, permission bits; a link's target), so a run interrupted
anywhere (`kill -9`) and run again rewrites only what is not yet right;
the blocks it had fetched are in the home, so nothing is fetched twice.
Before writing, the blocks of every file to write are fetched in bulk
(`download.fetch_blocks`), verified like every block.

*Writing* (`Exporter`).  Every path is walked from a descriptor of DIR one
component at a time with `openat(O_DIRECTORY | O_NOFOLLOW)`: a symbolic
link, or anything else that is not a directory, where the drive puts a
directory is never followed, and the entry is refused.  A file is written
to a temporary name in its directory (`.p2pfs-<hash>.tmp`, `O_CREAT |
O_EXCL | O_NOFOLLOW`), given its permission bits (never setuid, setgid or
sticky: `mode & 0o777`) and its mtime in ns, then renamed over the old
one, so a reader of DIR sees the old file or the new one, whole.  Links are
made the same way (`symlinkat` to a temporary name, `lutimes`, rename).
A directory gets its mode and mtime once everything in it is written.
Removing walks the tree in a loop (a drive's tree may be deeper than
Python's recursion limit and than the descriptors a process may hold),
opening each directory the same way and never following a link.  Leftover temporary files of an interrupted run are
removed when their file is written again, and by every full run.

*Untrusted names.*  The drive's keys are taken apart here (`parse_key`)
and each name checked before any system call sees it: empty, "." or "..",
containing "/" or NUL, longer than 255 bytes; a path longer than 4096
bytes; a link target with NUL or longer than 4096 bytes, and (with
`--safe-links`) one that is absolute or climbs out of DIR.  Each refused
entry is reported, with its path shown escaped, and skipped together with
everything below it; the rest goes on.  A file whose blocks fail
verification is reported and skipped the same way.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

from . import download
from .drive import Drive
from .errors import (BlockUnavailableError, NotFoundError, StoreError, UsageError,
                     VerificationError)
from .index import KIND_DIR, KIND_FILE, KIND_SYMLINK, MAX_PATH, Commit, Entry, name_problem, shown
from .store import make_private_dir, open_private, write_private_file

READ_CHUNK = 4 << 20   # bytes read from the drive (and written) at a time
MAX_DIR_FDS = 64       # directory descriptors kept open while writing
POLL = 0.25            # s between looks at the store for a newer head (--live)
RETRY = 5.0            # s before a version no peer supplied is tried again (--live)
TMP_PREFIX = b".p2pfs-"
TMP_SUFFIX = b".tmp"
STATE_DIR = "mirrors"


class Refused(Exception):
    """An entry the mirror will not write (the message says why)."""


def parse_key(key: bytes) -> tuple[tuple[bytes, ...], str | None]:
    """(path components, None) of an index key, or (what can be shown, why not)."""
    if key == b"":
        return (), None
    parent, _sep, name = key.partition(b"\x00")
    if not parent.startswith(b"/"):
        return (parent, name), "not an absolute path"
    parts = tuple(parent.split(b"/")[1:]) if parent != b"/" else ()
    parts += (name,)
    for p in parts:
        why = name_problem(p)
        if why is not None:
            return parts, why
    if sum(len(p) + 1 for p in parts) > MAX_PATH:
        return parts, f"path longer than {MAX_PATH} bytes"
    return parts, None


def path_of(parts: tuple[bytes, ...]) -> bytes:
    return b"/" + b"/".join(parts)


def link_problem(parts: tuple[bytes, ...], target: bytes, safe: bool) -> str | None:
    """Why a link with `target` at `parts` is refused, or None."""
    if not target:
        return "empty link target"
    if b"\x00" in target:
        return "link target contains a NUL byte"
    if len(target) > MAX_PATH:
        return f"link target longer than {MAX_PATH} bytes"
    if safe:
        if target.startswith(b"/"):
            return "absolute link target (--safe-links)"
        # '..' only before the first name: after a name it would climb out
        # of wherever that name leads, and the name may be another link
        # (d/up -> '..' then x -> 'd/up/..' is DIR/..)
        depth = len(parts) - 1
        named = False
        for p in target.split(b"/"):
            if p == b"..":
                if named:
                    return "link target climbs up after a name (--safe-links)"
                depth -= 1
                if depth < 0:
                    return "link target leaves the directory (--safe-links)"
            elif p not in (b"", b"."):
                named = True
    return None


def tmp_name(name: bytes) -> bytes:
    return TMP_PREFIX + hashlib.blake2b(name, digest_size=8).hexdigest().encode() + TMP_SUFFIX


def is_tmp(name: bytes) -> bool:
    return name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX) and len(name) == 27


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Exporter:
    """Writes entries below one directory, never outside it (see the module
    docstring).  Paths are tuples of checked names."""

    def __init__(self, root: str):
        self.root = root
        self._fds: OrderedDict[tuple, int] = OrderedDict()
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.loosened: set[tuple] = set()  # directories made writable for us

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self._root_fd)

    # --- directories -------------------------------------------------------------

    def dir(self, parts: tuple[bytes, ...], create: bool = False) -> int:
        """Descriptor of DIR/parts (cached; do not close).  Missing directories
        are made (mode 0700 until finished) if `create`, else FileNotFoundError.
        Refused if a component is not a directory (a link is never followed)."""
        # from the deepest cached ancestor down, one level at a time (a loop:
        # a drive's tree may be deeper than Python's recursion limit)
        depth, fd = len(parts), None
        while depth and (fd := self._fds.get(parts[:depth])) is None:
            depth -= 1
        if depth:
            self._fds.move_to_end(parts[:depth])
        else:
            fd = self._root_fd
        for depth in range(depth + 1, len(parts) + 1):
            fd = self._open_dir(parts[:depth], fd, create)
        return fd

    def _open_dir(self, parts: tuple[bytes, ...], parent: int, create: bool) -> int:
        """Open (making it if `create`) DIR/parts in its parent's descriptor; cache it."""
        name = parts[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Refused(f"{shown(path_of(parts))} is not a directory here "
                              "(a link or a file is in the way)") from None
            raise
        self._fds[parts] = fd
        while len(self._fds) > MAX_DIR_FDS:
            _p, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _forget(self, parts: tuple[bytes, ...]) -> None:
        """Close cached descriptors of `parts` and below (it was removed or replaced)."""
        n = len(parts)
        for p in [p for p in self._fds if p[:n] == parts]:
            os.close(self._fds.pop(p))

    def _writable(self, parts: tuple[bytes, ...]) -> int:
        """The descriptor of a directory to write into, made writable for us if needed."""
        fd = self.dir(parts, create=True)
        if os.geteuid() != 0:
            mode = os.fstat(fd).st_mode
            if mode & 0o300 != 0o300:
                os.fchmod(fd, stat.S_IMODE(mode) | 0o700)
                self.loosened.add(parts)
        return fd

    def lstat(self, parts: tuple[bytes, ...]) -> os.stat_result | None:
        try:
            return os.stat(parts[-1], dir_fd=self.dir(parts[:-1]), follow_symlinks=False)
        except FileNotFoundError:
            return None

    def names(self, parts: tuple[bytes, ...]) -> list[bytes]:
        return [os.fsencode(n) for n in os.listdir(self.dir(parts))]

    def make_dir(self, parts: tuple[bytes, ...]) -> bool:
        """DIR/parts is a directory (made if missing, replacing anything else).
        True if it had to be made."""
        if not parts:
            return False
        st = self.lstat(parts)
        if st is not None and stat.S_ISDIR(st.st_mode):
            return False
        parent = self._writable(parts[:-1])
        if st is not None:
            os.unlink(parts[-1], dir_fd=parent)
        os.mkdir(parts[-1], 0o700, dir_fd=parent)
        return True

    def finish_dir(self, parts: tuple[bytes, ...], entry: Entry) -> None:
        """A directory's mode and mtime, once everything in it is written."""
        fd = self.dir(parts)
        os.fchmod(fd, entry.mode & 0o777)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        self.loosened.discard(parts)

    # --- files and links ------------------------------------------------------------

    def matches(self, parts: tuple[bytes, ...], entry: Entry) -> bool:
        """Whether DIR holds this file or link as the entry says (lstat only)."""
        try:
            st = self.lstat(parts)
        except (Refused, FileNotFoundError):
            return False
        if st is None or st.st_mtime_ns != entry.mtime_ns:
            return False
        if entry.kind == KIND_FILE:
            return (stat.S_ISREG(st.st_mode) and st.st_size == entry.size
                    and stat.S_IMODE(st.st_mode) == entry.mode & 0o777)
        if entry.kind == KIND_SYMLINK and stat.S_ISLNK(st.st_mode):
            return os.readlink(parts[-1], dir_fd=self.dir(parts[:-1])) == entry.target
        return False

    def open_file(self, parts: tuple[bytes, ...]) -> tuple[int, int, bytes]:
        """(directory fd, file fd, temporary name) to write a file's bytes to."""
        d = self._writable(parts[:-1])
        tmp = tmp_name(parts[-1])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=d)
        except FileExistsError:  # an interrupted run's leftover
            self._remove_any(parts[:-1], tmp)
            d = self._writable(parts[:-1])
            fd = os.open(tmp, flags, 0o600, dir_fd=d)
        return d, fd, tmp

    def close_file(self, parts: tuple[bytes, ...], d: int, fd: int, tmp: bytes,
                   entry: Entry) -> str | None:
        """Give the written file its mode and mtime and rename it into place.
        Returns a note if the mtime could not be set."""
        note = None
        try:
            os.fchmod(fd, entry.mode & 0o777)
            try:
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            except (OverflowError, OSError) as exc:
                note = f"mtime {entry.mtime_ns} not set ({exc})"
        finally:
            os.close(fd)
        self._into_place(parts, d, tmp)
        return note

    def abandon_file(self, d: int, fd: int, tmp: bytes) -> None:
        os.close(fd)
        os.unlink(tmp, dir_fd=d)  # ours, just made: a file

    def put_link(self, parts: tuple[bytes, ...], entry: Entry) -> str | None:
        d = self._writable(parts[:-1])
        tmp = tmp_name(parts[-1])
        try:
            os.symlink(entry.target, tmp, dir_fd=d)
        except FileExistsError:
            self._remove_any(parts[:-1], tmp)
            d = self._writable(parts[:-1])
            os.symlink(entry.target, tmp, dir_fd=d)
        note = None
        try:
            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=d, follow_symlinks=False)
        except (OverflowError, OSError) as exc:
            note = f"mtime {entry.mtime_ns} not set ({exc})"
        self._into_place(parts, d, tmp)
        return note

    def _into_place(self, parts: tuple[bytes, ...], d: int, tmp: bytes) -> None:
        name = parts[-1]
        try:
            os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                os.unlink(tmp, dir_fd=d)
                raise
            self._remove_any(parts[:-1], name)  # a directory was there
            d = self.dir(parts[:-1])  # (removing may have closed the descriptor we had)
            os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)

    def remove(self, parts: tuple[bytes, ...]) -> bool:
        """Remove DIR/parts and everything below it; False if nothing was there."""
        try:
            return self._remove_any(parts[:-1], parts[-1])
        except FileNotFoundError:
            return False

    def _remove_any(self, parent: tuple[bytes, ...], name: bytes) -> bool:
        """Remove DIR/parent/name, a directory with everything below it or
        anything else; False if nothing was there."""
        d = self.dir(parent)
        try:
            st = os.stat(name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=d)
            return True
        # depth first, in a loop: each directory is opened by `dir` (at
        # most MAX_DIR_FDS descriptors held, a link never followed) and
        # listed again after each subdirectory it held is gone
        stack = [parent + (name,)]
        while stack:
            top = stack[-1]
            fd = self.dir(top)
            if os.geteuid() != 0 and stat.S_IMODE(os.fstat(fd).st_mode) & 0o300 != 0o300:
                os.fchmod(fd, 0o700)  # a drive's read-only directory: ours to empty
            below = None
            with os.scandir(fd) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        below = top + (os.fsencode(e.name),)
                        break
                    os.unlink(e.name, dir_fd=fd)
            if below is not None:
                stack.append(below)
                continue
            self._forget(top)
            self.loosened.discard(top)
            os.rmdir(top[-1], dir_fd=self.dir(top[:-1]))
            stack.pop()
        return True


# --- the state of a mirror directory ---------------------------------------------------

@dataclass
class State:
    directory: str
    key: str
    version: int
    length: int


def _state_path(home: Path, directory: str) -> Path:
    digest = hashlib.blake2b(os.fsencode(directory), digest_size=16).hexdigest()
    return Path(home) / STATE_DIR / f"{digest}.json"


def load_state(home: Path, directory: str) -> State | None:
    """The version last written completely into `directory` (a real path), if any."""
    path = _state_path(home, directory)
    try:
        raw = json.loads(path.read_bytes())
        state = State(raw["directory"], raw["key"], int(raw["version"]), int(raw["length"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # damaged: the next run is a full one, which is always right
    return state if state.directory == directory else None


def save_state(home: Path, state: State) -> None:
    path = _state_path(home, state.directory)
    try:
        make_private_dir(path.parent)
        write_private_file(path, json.dumps(state.__dict__).encode() + b"\n")
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from None


def lock_directory(home: Path, directory: str) -> int:
    """An exclusive lock on mirroring `directory` (released when the fd closes)."""
    path = _state_path(home, directory).with_suffix(".lock")
    try:
        fd = open_private(make_private_dir(path.parent) / path.name, os.O_RDWR)
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"another p2pfs mirror is writing {directory}; stop it first") from None
    return fd


# --- one version ------------------------------------------------------------------------

@dataclass
class Stats:
    version: int = 0
    length: int = 0
    written: int = 0        # files and links written
    dirs: int = 0           # directories made
    deleted: int = 0
    unchanged: int = 0
    refused: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"version": self.version, "length": self.length, "written": self.written,
                "dirs": self.dirs, "deleted": self.deleted, "unchanged": self.unchanged,
                "refused": self.refused, "bytes": self.bytes}


@dataclass
class Options:
    prune: bool = True
    full: bool = False
    safe_links: bool = False


async def write_version(drive: Drive, exp: Exporter, old: Commit | None, opts: Options,
                        report: Callable[[str, str], None],
                        progress: Callable[[int, int], None] | None = None) -> Stats:
    """Make DIR equal to the version `drive` shows, from the version `old`
    it held (None: anything; a full pass).  `report(path, why)` for each
    refused entry; `progress(done, total)` in bytes.  Raises
    BlockUnavailableError when blocks cannot be fetched (nothing is lost:
    run again)."""
    st = Stats(version=drive.version, length=drive.length)
    full = old is None or opts.full
    changes = await drive.diff_keys(None if full else old, drive.commit)
    refused_dirs: set[tuple] = set()
    finish: dict[tuple, Entry | None] = {}  # directories whose mode and mtime to set last
    children: dict[tuple, set[bytes]] = {}  # full pass: the names each directory should hold
    todo: list[tuple[tuple, Entry]] = []    # files and links to compare and write

    def refuse(shown_path: str, why: str) -> None:
        st.refused += 1
        report(shown_path, why)

    for key, _old_entry, entry in changes:
        parts, why = parse_key(key)
        if why is not None:
            refuse(shown(path_of(parts)), why)
            continue
        if any(parts[:i] in refused_dirs for i in range(len(parts))):
            continue  # below a refused directory: reported there
        if entry is not None:
            try:  # the drive's checks (extents against the log, ...) and what a reader may see
                entry = drive.check_entry(path_of(parts), entry)
            except VerificationError as exc:
                if entry.kind == KIND_DIR:
                    refused_dirs.add(parts)
                refuse(shown(path_of(parts)), str(exc))
                continue
        if parts:
            finish.setdefault(parts[:-1], None)
        if entry is None:
            if opts.prune:
                try:
                    if exp.remove(parts):
                        st.deleted += 1
                except Refused as exc:
                    refuse(shown(path_of(parts)), str(exc))
            continue
        if full and parts:
            children.setdefault(parts[:-1], set()).add(parts[-1])
        if entry.kind == KIND_DIR:
            try:
                if exp.make_dir(parts):
                    st.dirs += 1
            except Refused as exc:
                refused_dirs.add(parts)
                refuse(shown(path_of(parts)), str(exc))
                continue
            finish[parts] = entry
            if full:
                children.setdefault(parts, set())
        elif not parts:
            refuse("/", "the drive's root is not a directory")
            return st
        elif entry.kind == KIND_SYMLINK:
            why = link_problem(parts, entry.target, opts.safe_links)
            if why is not None:
                refused_dirs.add(parts)  # nothing is made below it either
                refuse(shown(path_of(parts)), why)
                continue
            todo.append((parts, entry))
        else:
            todo.append((parts, entry))

    # What to write: the entries DIR does not already hold as they are.
    writes = []
    for parts, entry in todo:
        if exp.matches(parts, entry):
            st.unchanged += 1
        else:
            writes.append((parts, entry))
    total = sum(e.size for _p, e in writes if e.kind == KIND_FILE)
    if drive.source is not None:
        want: dict[int, int] = {}
        for _p, e in writes:
            if e.kind == KIND_FILE:
                want.update(download.file_blocks(e, drive.block_size, drive.length))
        await download.fetch_blocks(drive, sorted(want))
    done = 0
    for parts, entry in writes:
        try:
            if entry.kind == KIND_SYMLINK:
                note = exp.put_link(parts, entry)
            else:
                note = await _write_file(drive, exp, parts, entry)
                done += entry.size
                st.bytes += entry.size
                if progress is not None:
                    progress(done, total)
        except Refused as exc:
            refuse(shown(path_of(parts)), str(exc))
            continue
        except VerificationError as exc:
            refuse(shown(path_of(parts)), f"not written: {exc}")
            continue
        st.written += 1
        if note is not None:
            st.notes.append(f"{shown(path_of(parts))}: {note}")

    if full:  # what DIR holds that the drive does not (and an interrupted run's leftovers)
        for d, names in children.items():
            if d in refused_dirs:
                continue
            try:
                on_disk = exp.names(d)
            except (Refused, FileNotFoundError):
                continue
            for name in on_disk:
                if name not in names and (opts.prune or is_tmp(name)):
                    exp.remove(d + (name,))
                    if not is_tmp(name):
                        st.deleted += 1
                        finish.setdefault(d, None)
    for parts in exp.loosened:
        finish.setdefault(parts, None)
    for parts in sorted(finish, key=len, reverse=True):  # deepest first
        if parts in refused_dirs:
            continue
        entry = finish[parts]
        if entry is None:
            try:
                entry = await drive.lookup(path_of(parts))
            except (NotFoundError, VerificationError, UsageError):
                continue  # gone from the drive, or bad: left as it is
            if entry.kind != KIND_DIR:
                continue
        try:
            exp.finish_dir(parts, entry)
        except (Refused, FileNotFoundError):
            pass
        except (OverflowError, OSError) as exc:
            st.notes.append(f"{shown(path_of(parts))}: mode or mtime not set ({exc})")
    return st


async def _write_file(drive: Drive, exp: Exporter, parts: tuple, entry: Entry) -> str | None:
    d, fd, tmp = exp.open_file(parts)
    try:
        offset = 0
        while offset < entry.size:
            data = await drive.read(entry, offset, READ_CHUNK)
            if not data:
                raise VerificationError(f"drive {drive.key_text}: {shown(path_of(parts))} "
                                        f"ends at {offset} of its {entry.size} bytes")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            offset += len(data)
    except BaseException:
        exp.abandon_file(d, fd, tmp)
        raise
    return exp.close_file(parts, d, fd, tmp, entry)


# --- the command ------------------------------------------------------------------------

async def mirror(drive: Drive, directory: str, opts: Options, live: bool,
                 report: Callable[[str, str], None],
                 on_version: Callable[[Stats], None],
                 progress: Callable[[int, int], None] | None = None,
                 waiting: Callable[[str], None] | None = None) -> int:
    """Mirror `drive` (opened) into `directory`; with `live`, follow its new
    versions until cancelled (a version whose blocks no peer supplies is
    tried again every RETRY seconds, `waiting(why)` told).  Returns the
    number of refused entries of the last version written.  Raises
    BlockUnavailableError (not live) when blocks cannot be fetched."""
    home = drive.store.home
    root = os.path.realpath(directory)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{directory}: cannot make the directory ({exc.strerror})") from None
    if not os.path.isdir(root):
        raise UsageError(f"{directory} is not a directory")
    lock = lock_directory(home, root)
    exp = Exporter(root)
    try:
        state = load_state(home, root)
        old = None
        empty = not os.listdir(root)  # removed or emptied since: a full pass, not a diff
        if state is not None and state.key == drive.key_text and not empty:
            try:
                length, commit = await drive.commit_at(state.version)
                old = commit if length == state.length else None
            except (NotFoundError, VerificationError):
                old = None  # not a version this drive has: a full pass puts it right
        changed = trio.Event()
        if live:
            def heard(_head) -> None:
                changed.set()
            drive.subscribe(heard)
        while True:
            try:
                st = await write_version(drive, exp, old, opts, report, progress)
            except BlockUnavailableError as exc:
                if not live:
                    raise
                if waiting is not None:
                    waiting(str(exc))
                with trio.move_on_after(RETRY):  # what was fetched is kept: nothing is lost
                    await changed.wait()
                changed = trio.Event()
                await _newest(drive)
                continue
            save_state(home, State(root, drive.key_text, drive.version, drive.length))
            on_version(st)
            old = drive.commit
            if not live:
                return st.refused
            opts.full = False
            while True:
                changed = trio.Event()
                if await _newest(drive):
                    break
                with trio.move_on_after(POLL):
                    await changed.wait()
    finally:
        exp.close()
        os.close(lock)


async def _newest(drive: Drive) -> bool:
    """Move a live view to the newest head; False (and still where it was)
    when it did not move or its commit cannot be fetched yet."""
    try:
        return await drive.refresh()
    except BlockUnavailableError:
        return False
