"""The owner's writable tree: a version of an owned drive plus what was
written since, and the commit that turns it into the next signed version.
No FUSE here: the writable mount (`p2pfs.wfs`) is a thin face over it, and
the tests drive it directly.

Theory of operation
-------------------
Namespace.  The tree is an `index.IndexWriter` on top of the version the
workspace started from (or last committed): every create, mkdir, symlink,
unlink, rmdir, rename, chmod, utimens and xattr change is a put, delete or
move on it, in memory (copy-on-write nodes, nothing is written until a
commit).  Lookups and listings read the same writer, so they see every
change at once.  POSIX rules (EEXIST, ENOTEMPTY, EISDIR, a directory moved
into itself, RENAME_NOREPLACE / RENAME_EXCHANGE) are checked here, and each
refusal is a `WorkspaceError` carrying its errno.

Content.  A regular file that is open, or was written since the last
commit, has a `File`: its size, mtime and block map.  Block j of the file is
either *staged* (its bytes are in the `store.Staging` area, written there
by the `write` that produced them, never only in memory), or a *base* block
(the log block of the committed version it started from), or a hole (reads
as zeros).  A stored block may be shorter than the block size; what is
missing up to the file's size reads as zeros, so truncating down and up
again shows zeros, as on a disk.  A write that covers a whole block stages
it as is; a partial one reads the block and stages the patched copy.  The
writer's entry of such a file keeps its metadata; its size and mtime are the
`File`'s until the commit writes them back.  Unlinking an open file keeps
its `File` (detached, no path) until the last handle releases it.

Commit (`commit`, one at a time, with no other call running: the caller
serialises).  Each changed file is sealed onto an `_Appender` after the
current version: a base block whose length is still right is reused as is
(one changed byte in a 1 GiB file appends one block), a staged block is
padded to its length and appended, a hole refers to a run of zero blocks
appended once per workspace.  The file's entry gets the new extents, and
`publish.seal_version` appends the changed index nodes and the Commit, signs
it and commits it to the store in one final transaction (durable).  Then
the staged blocks of the sealed files are deleted and their `File`s point
at the new version's blocks.

Failure.  A commit that cannot be sure of its disk space fails with ENOSPC
before it changes anything.  Any other failure half-way leaves the writer
with entries naming unsigned blocks, so the workspace is then *broken*:
every later change fails with EIO (reads go on), and the mount says why.

Crash.  Nothing of a commit is visible before its signed head is; what was
staged and not yet committed is in the staging area only, which the next
writer reports and deletes (`Staging.open_fresh`): a killed mount leaves
the last committed version, and every `fsync` commits.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from . import index
from .drive import MAX_TARGET, MODE_BITS, OWN_XATTRS, USER_XATTRS, Drive, entry_problem, sanitized
from .errors import P2pfsError
from .index import KIND_DIR, KIND_FILE, KIND_SYMLINK, MAX_NAME, MAX_PATH, Entry
from .publish import WriteResult, _extents, appender_at, seal_version
from .store import Staging

__all__ = ["Workspace", "File", "WorkspaceError", "RENAME_NOREPLACE", "RENAME_EXCHANGE",
           "ZERO_RUN", "MAX_HOLE"]

RENAME_NOREPLACE = 1  # linux/fs.h
RENAME_EXCHANGE = 2
ZERO_RUN = 64  # zero blocks appended once, shared by every hole of every file
MAX_HOLE = 16 << 30  # bytes of holes one file may have (each run of them is an extent)
DEFAULT_COMMIT_INTERVAL = 2.0  # s after the last change (the mount's committer)
MAX_COMMIT_INTERVAL = 10.0  # s after the first change, under constant change
FREE_MARGIN = 64 << 20  # bytes a commit leaves free on the store's disk
_TEMP = b"/.p2pfs-exchange"  # a name RENAME_EXCHANGE passes through (never committed)


class WorkspaceError(P2pfsError):
    """A file system call refused, with the errno the caller should see."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message or os.strerror(code))
        self.errno = code


def _fail(code: int, message: str = "") -> WorkspaceError:
    return WorkspaceError(code, message)


@dataclass(eq=False)
class File:
    """A regular file with content the workspace tracks (open or changed)."""

    fid: int
    path: bytes | None  # None: unlinked, kept while open
    size: int
    mtime_ns: int
    base: list[int]  # log block of each leading file block still as committed
    base_tail: int  # bytes of the last base block (the block size unless it is the file's end)
    staged: dict[int, int] = field(default_factory=dict)  # block number -> bytes staged
    opens: int = 0
    dirty: bool = False  # content, size or mtime changed since the last commit

    def base_len(self, j: int, bs: int) -> int:
        return self.base_tail if j == len(self.base) - 1 else bs


def _blocks_of(entry: Entry) -> list[int]:
    out: list[int] = []
    for start, count in entry.extents:
        out.extend(range(start, start + count))
    return out


def _join(parent: bytes, name: bytes) -> bytes:
    return (b"/" if parent == b"/" else parent + b"/") + name


def _under(path: bytes, top: bytes) -> bool:
    """Whether `path` is `top` or below it."""
    return path == top or path.startswith(top + b"/")


class Workspace:
    """The writable tree of an owned drive, opened at its newest version.

    The caller holds the drive's writer lock for the workspace's whole life,
    and gives it an empty `Staging` area.  Not thread-safe: one call at a
    time (a commit may run in a worker thread while no other call runs).
    Every method raises WorkspaceError (with `.errno`) for what a file system
    would refuse; `now` arguments are times in ns (default: the clock)."""

    def __init__(self, drive: Drive, staging: Staging, *, pad_to: int = 0,
                 clock: Callable[[], int] = time.time_ns):
        self.drive = drive
        self.seed = drive.seed()
        self.staging = staging
        self.bs = drive.block_size
        self.clock = clock
        self.pad_to = pad_to  # the first commit's log must pass this length
        self.writer = index.IndexWriter(drive.reader, drive.commit.root, drive.node_cache)
        commit = drive.commit
        self.files, self.bytes = commit.files, commit.bytes
        self.entries = commit.entries or sum(1 for _ in drive.walk_local())
        self.by_path: dict[bytes, File] = {}  # open or changed files at their path
        self.detached: set[File] = set()  # unlinked files still open
        self._next_fid = 1
        self.changed = False  # anything since the last commit
        self.broken: str | None = None  # why changes are refused (a failed commit)
        self._zero_run: int | None = None  # first of ZERO_RUN zero blocks in the drive

    # --- reading the tree ------------------------------------------------------------

    def _shown(self, path: bytes, entry: Entry | None) -> Entry | None:
        """What the mount shows of an entry: as readers see it (`sanitized`:
        no setuid/setgid/sticky bit, only user. xattrs), whatever an earlier
        version written elsewhere holds, and with an open file's size."""
        if entry is not None:
            entry = sanitized(entry)
        if entry is not None and entry.kind == KIND_FILE:
            f = self.by_path.get(path)
            if f is not None and (f.size != entry.size or f.mtime_ns != entry.mtime_ns):
                entry = msgspec.structs.replace(entry, size=f.size, mtime_ns=f.mtime_ns)
        return entry

    def lookup(self, path: bytes) -> Entry | None:
        """The entry at `path` as it is now (None: nothing there)."""
        return self._shown(path, self._get(path))

    def _get(self, path: bytes) -> Entry | None:
        try:
            return self.writer.get(path)
        except P2pfsError as exc:  # a damaged store: the caller answers EIO
            raise _fail(errno.EIO, str(exc)) from None

    def listdir(self, path: bytes) -> list[tuple[bytes, Entry]]:
        """(name, entry) of a directory's children, sorted by name."""
        entry = self._get(path)
        if entry is None:
            raise _fail(errno.ENOENT)
        if entry.kind != KIND_DIR:
            raise _fail(errno.ENOTDIR)
        # names no drive may hold (from a version written elsewhere) are not shown
        return [(name, self._shown(_join(path, name), e)) for name, e in self.writer.children(path)
                if index.valid_name(name)]

    def _content(self, path: bytes, entry: Entry) -> Entry:
        """`entry` at `path`, whose content (a file's extents, a link's
        target) is about to be used: EIO if it makes no sense in this
        version (`entry_problem`: an earlier version written elsewhere may
        hold anything).  Such an entry is still shown, so that it can be
        removed or replaced; it is never read as zeros or as a bad target."""
        problem = entry_problem(entry, self.drive.length, self.bs)
        if problem is not None:
            raise _fail(errno.EIO, f"drive {self.drive.key_text}: {index.shown(path)}: {problem}: "
                                   "a bad entry (remove it, or replace it by a rename)")
        return entry

    def readlink(self, path: bytes) -> bytes:
        """The target of the symbolic link at `path`."""
        entry = self._need(path)
        if entry.kind != KIND_SYMLINK:
            raise _fail(errno.EINVAL)
        return self._content(path, entry).target

    def _need(self, path: bytes) -> Entry:
        entry = self._get(path)
        if entry is None:
            raise _fail(errno.ENOENT)
        return entry

    def _child(self, parent: bytes, name: bytes) -> bytes:
        """The path of a new name in directory `parent` (checked)."""
        if len(name) > MAX_NAME:
            raise _fail(errno.ENAMETOOLONG)
        if not index.valid_name(name):
            raise _fail(errno.EINVAL, f"{name!r} cannot be a name in a drive")
        path = _join(parent, name)
        if len(path) > MAX_PATH:
            raise _fail(errno.ENAMETOOLONG)
        if self._need(parent).kind != KIND_DIR:
            raise _fail(errno.ENOTDIR)
        return path

    # --- changing the tree ------------------------------------------------------------

    def _changing(self) -> int:
        if self.broken is not None:
            raise _fail(errno.EIO, self.broken)
        self.changed = True
        return self.clock()

    def _put(self, path: bytes, entry: Entry) -> None:
        self.writer.put(path, entry)

    def _touch(self, directory: bytes, now: int) -> None:
        """A directory's entries changed: its mtime moves (as on a disk)."""
        entry = self._get(directory)
        if entry is not None and entry.mtime_ns != now:
            self._put(directory, msgspec.structs.replace(entry, mtime_ns=now))

    def _new(self, parent: bytes, name: bytes, entry: Entry) -> bytes:
        path = self._child(parent, name)
        if self._get(path) is not None:
            raise _fail(errno.EEXIST)
        self._put(path, entry)
        self.entries += 1
        self._touch(parent, entry.mtime_ns)
        return path

    def create(self, parent: bytes, name: bytes, mode: int) -> File:
        """A new empty regular file, open once (release it)."""
        now = self._changing()
        path = self._new(parent, name, Entry(KIND_FILE, mode & MODE_BITS, now))
        self.files += 1
        f = self._file(path, Entry(KIND_FILE, mode & MODE_BITS, now))
        f.opens += 1
        return f

    def mkdir(self, parent: bytes, name: bytes, mode: int) -> bytes:
        now = self._changing()
        return self._new(parent, name, Entry(KIND_DIR, mode & MODE_BITS, now))

    def symlink(self, parent: bytes, name: bytes, target: bytes) -> bytes:
        if not 0 < len(target) <= MAX_TARGET or b"\x00" in target:
            raise _fail(errno.ENAMETOOLONG if len(target) > MAX_TARGET else errno.EINVAL)
        now = self._changing()
        return self._new(parent, name, Entry(KIND_SYMLINK, 0o777, now, len(target), (), target))

    def _forget(self, path: bytes, entry: Entry) -> None:
        """`path` (not a non-empty directory) leaves the tree: totals, and its File."""
        self.entries -= 1
        if entry.kind == KIND_FILE:
            self.files -= 1
            f = self.by_path.pop(path, None)
            self.bytes -= f.size if f is not None else entry.size
            if f is not None:
                f.path = None
                if f.opens:
                    self.detached.add(f)
                else:
                    self.staging.drop(f.fid)

    def unlink(self, parent: bytes, name: bytes) -> None:
        path = _join(parent, name)
        entry = self._need(path)
        if entry.kind == KIND_DIR:
            raise _fail(errno.EISDIR)
        now = self._changing()
        self.writer.delete(path)
        self._forget(path, entry)
        self._touch(parent, now)

    def rmdir(self, parent: bytes, name: bytes) -> None:
        path = _join(parent, name)
        entry = self._need(path)
        if entry.kind != KIND_DIR:
            raise _fail(errno.ENOTDIR)
        if self.writer.children(path):
            raise _fail(errno.ENOTEMPTY)
        now = self._changing()
        self.writer.delete(path)
        self._forget(path, entry)
        self._touch(parent, now)

    def rename(self, old_parent: bytes, old_name: bytes, new_parent: bytes, new_name: bytes,
               flags: int = 0) -> None:
        """rename(2) and renameat2(2) with RENAME_NOREPLACE or RENAME_EXCHANGE
        (other flags: EINVAL)."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or \
                flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise _fail(errno.EINVAL)
        old = _join(old_parent, old_name)
        moving = self._need(old)
        new = self._child(new_parent, new_name)
        there = self._get(new)
        if old == new:
            if flags & RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            return
        if _under(new, old) or (flags & RENAME_EXCHANGE and _under(old, new)):
            raise _fail(errno.EINVAL)  # into itself (or, exchanging, an ancestor)
        if flags & RENAME_EXCHANGE:
            if there is None:
                raise _fail(errno.ENOENT)
            now = self._changing()
            temp, n = _TEMP, 0
            while self._get(temp) is not None:  # a name nothing has (only for this call)
                n += 1
                temp = _TEMP + b"-%d" % n
            self.writer.move(old, temp)
            self._moved(old, temp)
            self.writer.move(new, old)
            self._moved(new, old)
            self.writer.move(temp, new)
            self._moved(temp, new)
        else:
            if there is not None:
                if flags & RENAME_NOREPLACE:
                    raise _fail(errno.EEXIST)
                if moving.kind == KIND_DIR and there.kind != KIND_DIR:
                    raise _fail(errno.ENOTDIR)
                if moving.kind != KIND_DIR and there.kind == KIND_DIR:
                    raise _fail(errno.EISDIR)
                if there.kind == KIND_DIR and self.writer.children(new):
                    raise _fail(errno.ENOTEMPTY)
            now = self._changing()
            if there is not None:
                self._forget(new, there)
            self.writer.move(old, new)
            self._moved(old, new)
        self._touch(old_parent, now)
        if new_parent != old_parent:
            self._touch(new_parent, now)

    def _moved(self, old: bytes, new: bytes) -> None:
        """Files at or below `old` are now below `new`."""
        cut = len(old)
        for path in [p for p in self.by_path if p == old or p.startswith(old + b"/")]:
            f = self.by_path.pop(path)
            f.path = new + path[cut:]
            self.by_path[f.path] = f

    # --- metadata ---------------------------------------------------------------------

    def chmod(self, path: bytes, mode: int) -> None:
        """Permission bits only: setuid, setgid and sticky bits never enter a drive."""
        entry = self._need(path)
        if entry.kind == KIND_SYMLINK:
            return  # a link's mode means nothing (Linux cannot change it either)
        self._changing()
        self._put(path, msgspec.structs.replace(entry, mode=stat_mod.S_IMODE(mode) & MODE_BITS))

    def utimens(self, path: bytes, mtime_ns: int) -> None:
        entry = self._need(path)
        self._changing()
        if not index.I64_MIN <= mtime_ns <= index.U63_MAX:
            raise _fail(errno.EINVAL)
        f = self.by_path.get(path)
        if f is not None:
            f.mtime_ns = mtime_ns
            f.dirty = True
        else:
            self._put(path, msgspec.structs.replace(entry, mtime_ns=mtime_ns))

    def _xattr_name(self, path: bytes, name: bytes) -> Entry:
        entry = self._need(path)
        if not name.startswith(USER_XATTRS) or name.startswith(OWN_XATTRS) or \
                len(name) == len(USER_XATTRS):
            raise _fail(errno.EOPNOTSUPP)  # user.* only; user.p2pfs.* is the mount's own
        if len(name) > index.MAX_XATTR_NAME:
            raise _fail(errno.ERANGE)
        if entry.kind == KIND_SYMLINK:
            raise _fail(errno.EPERM)  # Linux keeps user.* on files and directories only
        return entry

    def setxattr(self, path: bytes, name: bytes, value: bytes) -> None:
        entry = self._xattr_name(path, name)
        if len(value) > index.MAX_XATTR_VALUE:
            raise _fail(errno.E2BIG)
        attrs = dict(entry.xattrs)
        attrs[name] = value
        # an entry must fit in an index node with room to spare: like ext4's one
        # block per inode, the attributes of an entry share a quarter block
        if len(attrs) > index.MAX_XATTRS or \
                sum(len(k) + len(v) for k, v in attrs.items()) > self.bs // 4:
            raise _fail(errno.ENOSPC)
        self._changing()
        attrs[name] = bytes(value)
        self._put(path, msgspec.structs.replace(entry, xattrs=tuple(sorted(attrs.items()))))

    def removexattr(self, path: bytes, name: bytes) -> None:
        entry = self._xattr_name(path, name)
        attrs = dict(entry.xattrs)
        if name not in attrs:
            raise _fail(errno.ENODATA)
        self._changing()
        del attrs[name]
        self._put(path, msgspec.structs.replace(entry, xattrs=tuple(sorted(attrs.items()))))

    # --- file content -----------------------------------------------------------------

    def _file(self, path: bytes, entry: Entry) -> File:
        f = File(self._next_fid, path, entry.size, entry.mtime_ns, _blocks_of(entry),
                 entry.size - (max(entry.size - 1, 0) // self.bs) * self.bs if entry.size else 0)
        self._next_fid += 1
        self.by_path[path] = f
        return f

    def open(self, path: bytes) -> File:
        """The File of a regular file, open once more (release it)."""
        entry = self._need(path)
        if entry.kind == KIND_DIR:
            raise _fail(errno.EISDIR)
        if entry.kind != KIND_FILE:
            raise _fail(errno.ELOOP)
        f = self.by_path.get(path) or self._file(path, self._content(path, entry))
        f.opens += 1
        return f

    def release(self, f: File) -> None:
        f.opens -= 1
        if f.opens > 0:
            return
        if f.path is None:
            self.detached.discard(f)
            self.staging.drop(f.fid)
        elif not f.dirty and self.by_path.get(f.path) is f:
            del self.by_path[f.path]

    def _block(self, f: File, j: int) -> bytes:
        """The stored bytes of file block j (b"" for a hole; zeros follow)."""
        if j in f.staged:
            data = self.staging.get(f.fid, j)
            if data is None:
                raise _fail(errno.EIO, f"staged block {j} of a file is missing")
            return data
        if j < len(f.base):
            try:
                data = self.drive.read_block_local(f.base[j])
            except P2pfsError as exc:
                raise _fail(errno.EIO, str(exc)) from None
            if data is None:
                raise _fail(errno.EIO, f"block {f.base[j]} of drive {self.drive.key_text} "
                                       "is not held")
            return data
        return b""

    def read(self, f: File, offset: int, size: int) -> bytes:
        end = min(f.size, offset + size)
        if offset >= end:
            return b""
        bs = self.bs
        out = bytearray()
        for j in range(offset // bs, (end - 1) // bs + 1):
            lo, hi = max(offset, j * bs) - j * bs, min(end, (j + 1) * bs) - j * bs
            piece = self._block(f, j)[lo:hi]
            out += piece
            if len(piece) < hi - lo:
                out += bytes(hi - lo - len(piece))
        return bytes(out)

    def _check_size(self, f: File, size: int) -> None:
        if size > index.U63_MAX:
            raise _fail(errno.EFBIG)
        held = len(f.base) * self.bs + len(f.staged) * self.bs
        if size - held > MAX_HOLE:
            raise _fail(errno.EFBIG, f"a file may have at most {MAX_HOLE >> 30} GiB of holes")

    def write(self, f: File, offset: int, data: bytes) -> int:
        """Write `data` at `offset` (beyond the end: the gap reads as zeros)."""
        if not data:
            return 0
        end = offset + len(data)
        self._check_size(f, end)
        now = self._changing()
        bs = self.bs
        items: list[tuple[int, bytes]] = []
        view = memoryview(data)
        pos = offset
        while pos < end:
            j = pos // bs
            lo = pos - j * bs
            take = min(bs - lo, end - pos)
            piece = view[pos - offset:pos - offset + take]
            current = f.staged[j] if j in f.staged else \
                (f.base_len(j, bs) if j < len(f.base) else 0)
            if lo == 0 and take >= current:
                block = bytes(piece)
            else:
                old = self._block(f, j)
                buf = bytearray(max(len(old), lo + take))
                buf[:len(old)] = old
                buf[lo:lo + take] = piece
                block = bytes(buf)
            items.append((j, block))
            pos += take
        grew = end > f.size
        if grew:
            self.bytes += end - f.size
            f.size = end
        self.staging.put(f.fid, items, mark=grew)
        for j, block in items:
            f.staged[j] = len(block)
        f.mtime_ns = now
        f.dirty = True
        return len(data)

    def truncate(self, f: File, size: int) -> None:
        if size < 0:
            raise _fail(errno.EINVAL)
        self._check_size(f, size)
        now = self._changing()
        bs = self.bs
        if size < f.size:
            keep, part = divmod(size, bs)
            edge = None
            if part and (keep in f.staged or keep < len(f.base)):
                edge = self._block(f, keep)[:part]
            if len(f.base) > keep:
                del f.base[keep:]
                f.base_tail = bs
            for j in [j for j in f.staged if j >= keep]:
                del f.staged[j]
            self.staging.drop(f.fid, keep)
            if edge is not None:
                self.staging.put(f.fid, [(keep, edge)])
                f.staged[keep] = len(edge)
        self.bytes += size - f.size
        f.size = size
        f.mtime_ns = now
        f.dirty = True
        self.staging.put(f.fid, [], mark=True)

    def truncate_path(self, path: bytes, size: int) -> None:
        """truncate(2) of a file that may not be open."""
        f = self.open(path)
        try:
            self.truncate(f, size)
        finally:
            self.release(f)

    # --- commit ------------------------------------------------------------------------

    def staged_bytes(self) -> int:
        return sum(n for f in self.by_path.values() for n in f.staged.values())

    def commit(self, message: str | None = None) -> WriteResult | None:
        """Seal every change since the last commit into the next signed version
        (durable when this returns); None if nothing changed.  ENOSPC before
        anything is written when the store's disk cannot hold it; EIO (and
        the workspace broken) if it fails half-way."""
        if self.broken is not None:
            raise _fail(errno.EIO, self.broken)
        if not self.changed:
            return None
        dirty = [f for f in self.by_path.values() if f.dirty]
        need = sum(sum(f.staged.values()) for f in dirty) + FREE_MARGIN
        if self.drive.store.free_bytes() < need:
            raise _fail(errno.ENOSPC, f"the disk holding the store in {self.drive.store.home} "
                                      f"cannot hold the next version ({need >> 20} MiB)")
        try:
            return self._commit(dirty, message)
        except BaseException as exc:
            self.broken = (f"a commit of drive {self.drive.key_text} failed ({exc}); the mount "
                           "takes no more changes: unmount it (what was not committed is lost)")
            raise

    def _commit(self, dirty: list[File], message: str | None) -> WriteResult:
        drive = self.drive
        app = appender_at(drive)
        try:  # the appender writes in a worker thread: wait for it on every exit
            sealed: list[tuple[File, list[int]]] = []
            reused = 0
            for f in dirty:
                blocks, kept = self._seal(app, f)
                reused += kept
                entry = self._get(f.path)
                self._put(f.path, msgspec.structs.replace(entry, size=f.size, mtime_ns=f.mtime_ns,
                                                          extents=_extents(blocks)))
                sealed.append((f, blocks))
            if message is None:
                message = f"rw: {len(dirty)} files written" if dirty else "rw: tree changed"
            head, idx_blocks = seal_version(drive, self.seed, app, self.writer, message=message,
                                            files=self.files, nbytes=self.bytes,
                                            entries=self.entries, pad_to=self.pad_to)
        finally:
            app.close()
        self.pad_to = 0
        for f, blocks in sealed:
            self.staging.drop(f.fid)
            f.base = blocks
            f.base_tail = f.size - (len(blocks) - 1) * self.bs if blocks else 0
            f.staged.clear()
            f.dirty = False
            if f.opens == 0 and self.by_path.get(f.path) is f:
                del self.by_path[f.path]
        self.changed = False
        return WriteResult(drive.key, drive.version, head.length, app.content_blocks, reused,
                           idx_blocks, self.files, self.bytes)

    def _zeros(self, app) -> int:
        if self._zero_run is None:
            zero = bytes(self.bs)
            self._zero_run = app.append(zero)
            for _ in range(ZERO_RUN - 1):
                app.append(zero)
        return self._zero_run

    def _seal(self, app, f: File) -> tuple[list[int], int]:
        """Append what file `f` needs; its log blocks in order, and how many were reused."""
        bs = self.bs
        n = -(-f.size // bs)
        blocks: list[int] = []
        reused = 0
        j = 0
        while j < n:
            need = bs if j < n - 1 else f.size - j * bs
            if j in f.staged:
                data = self._block(f, j)
            elif j < len(f.base):
                if f.base_len(j, bs) == need:
                    blocks.append(f.base[j])
                    reused += 1
                    j += 1
                    continue
                data = self._block(f, j)
            elif need == bs:  # a run of holes: the shared zero blocks
                run = 0
                while j + run < n - 1 and run < ZERO_RUN and j + run not in f.staged \
                        and j + run >= len(f.base):
                    run += 1
                if run == 0:
                    run = 1
                zero = self._zeros(app)
                blocks.extend(range(zero, zero + run))
                j += run
                continue
            else:
                data = b""
            if len(data) != need:
                data = data[:need] + bytes(max(0, need - len(data)))
            blocks.append(app.append(data))
            app.content_blocks += 1
            j += 1
        return blocks, reused
