"""The owner's writable mount: thin pyfuse3 handlers over a `Workspace`.

Theory of operation
-------------------
`WritableFS` is a `fs.DriveFS` (inode numbering by hashing, lookup counts,
forget, readdir, the p2pfs xattrs, EIO for anything unforeseen) whose tree
is the workspace instead of a fixed version.  Here an inode stands for
kind and path only: a file written in place keeps its number (`_inode_tag`).
Every handler asks the workspace and turns its `WorkspaceError` into the
errno; attributes are read fresh from the workspace on each `getattr`
(all changes come through this process, so the kernel's caches stay true
between them).  A rename moves the numbers of the live inodes below it; an
unlinked inode leaves the path tables and keeps its `File` until the kernel
forgets it, so an open unlinked file keeps working (and its number is not
given to another path before then: see `_ino_held`).

History.  As in every mount, the hidden `/.p2pfs/versions/N/` holds every
committed version (`fs.DriveFS` answers for it through `snapshots`); the
uncommitted tree is only the live one.  It is read-only: every change under
`/.p2pfs` (and of the name itself) is EROFS, so what the owner writes is
what readers see (their mounts hide a drive's own root `.p2pfs` too, and
one already in a drive is left as it is, hidden).

Writeback cache.  `enable_writeback_cache` lets the kernel merge small writes
into large ones (MEASURED.md: 10x for 4 KiB writes).  The kernel may then
read from a file opened O_WRONLY (to fill a partly written page) and it
handles O_APPEND itself (libfuse's passthrough_ll notes): every handle here
can read, and writes go where the kernel says.  Since nothing changes the
drive behind the kernel's back (this process holds the writer lock), the
kernel's idea of a file's end is the truth.

Commits.  A change arms the committer: it commits `commit_interval` seconds
after the last change, and at most `max_interval` seconds after the first
under constant change; `fsync`/`fsyncdir` commit at once and answer once the
version is durable; the mount commits once more when it ends (`close`).
A commit runs in a worker thread (the trio loop keeps serving peers), while
every other handler waits at a gate: the commit sees one still tree, and
writers are held back while it copies what they staged (backpressure).
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat
from collections.abc import Callable

import pyfuse3
import trio

from .fs import HISTORY, ROOT, DriveFS, _guarded, _join
from .index import KIND_DIR, KIND_FILE, Entry
from .publish import WriteResult
from .snapshots import is_history
from .workspace import (DEFAULT_COMMIT_INTERVAL, MAX_COMMIT_INTERVAL, File, Workspace,
                        WorkspaceError)

__all__ = ["WritableFS", "DEFAULT_COMMIT_INTERVAL", "MAX_COMMIT_INTERVAL"]

log = logging.getLogger(__name__)

INODE_BYTES = 4096  # what `df -i` counts as one free inode's worth of free space


def _errno(exc: WorkspaceError) -> pyfuse3.FUSEError:
    if exc.errno == errno.EIO:
        log.warning("%s", exc)
    return pyfuse3.FUSEError(exc.errno)


class WritableFS(DriveFS):
    """The FUSE face of a `Workspace`.  Run `run()` in a nursery beside
    `pyfuse3.main()` and `await close()` after it (the last commit)."""

    enable_writeback_cache = True

    def __init__(self, workspace: Workspace, *, commit_interval: float = DEFAULT_COMMIT_INTERVAL,
                 max_interval: float | None = None,
                 on_commit: Callable[[WriteResult], None] | None = None,
                 uid: int | None = None, gid: int | None = None):
        super().__init__(workspace.drive, live=False, prefetch=False, uid=uid, gid=gid)
        self.ws = workspace
        self.commit_interval = commit_interval
        self.max_interval = max(commit_interval, max_interval if max_interval is not None
                                else MAX_COMMIT_INTERVAL)
        self.on_commit = on_commit
        self._handles: dict[int, File] = {}
        self._unlinked: dict[int, tuple[Entry, File | None]] = {}  # ino -> last entry, File
        self._gate = trio.Event()
        self._gate.set()
        self._commit_lock = trio.Lock()
        self._change = trio.Event()
        self._first_change: float | None = None
        self._last_change = 0.0

    @staticmethod
    def _inode_tag(path: bytes, entry: Entry) -> bytes:
        return bytes([entry.kind]) + path

    # --- the workspace --------------------------------------------------------------

    def _ws(self, fn, *args):
        try:
            return fn(*args)
        except WorkspaceError as exc:
            raise _errno(exc) from None

    def _changed(self) -> None:
        now = trio.current_time()
        self._last_change = now
        if self._first_change is None:
            self._first_change = now
        self._change.set()

    async def _lookup(self, path: bytes) -> Entry:
        if is_history(path):
            return await super()._lookup(path)
        entry = self._ws(self.ws.lookup, path)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def readlink(self, inode, ctx=None):
        path = self._path(inode)
        if is_history(path):
            return await super().readlink(inode, ctx)
        return self._ws(self.ws.readlink, path)

    async def _listdir(self, path: bytes) -> list[tuple[bytes, Entry]]:
        if is_history(path):
            return await super()._listdir(path)
        items = self._ws(self.ws.listdir, path)
        if path == b"/":  # the history is entered by name, never listed
            items = [(name, e) for name, e in items if name != HISTORY[1:]]
        return items

    def _tree_path(self, inode: int, name: bytes | None = None) -> bytes:
        """The path of `inode` (joined with `name`) for a change: EROFS in the
        history (`/.p2pfs` and below), which is read-only."""
        path = self._path(inode)
        if name is not None:
            path = _join(path, name)
        if is_history(path):
            raise pyfuse3.FUSEError(errno.EROFS)
        return path

    def _ino_of(self, path: bytes, kind: int) -> int | None:
        """The live inode at `path`, if the kernel knows one."""
        if path == b"/":
            return ROOT
        return self._inos.get(bytes([kind]) + path)

    def _known(self, path: bytes) -> pyfuse3.EntryAttributes:
        """The entry of a path just made, handed to the kernel (one lookup)."""
        entry = self._ws(self.ws.lookup, path)
        ino = self._ino_for(path, entry)
        self._remember(ino, path, entry)
        self._nlookup[ino] += 1
        return self._attr(ino, entry)

    def _dir_links(self, path: bytes, delta: int) -> None:
        """A directory gained (+1) or lost (-1) subdirectories: its link count,
        if known, follows (never listed again: a directory of a million entries
        would be read whole after each mkdir in it)."""
        ino = self._ino_of(path, KIND_DIR)
        if delta and ino is not None and ino in self._links:
            self._links[ino] += delta

    def _gone(self, path: bytes, entry: Entry, file: File | None = None) -> None:
        """`path` left the tree: its inode (if live) is kept only for its handles."""
        ino = self._ino_of(path, entry.kind)
        if ino is None or ino == ROOT:
            return
        self._inos.pop(self._inode_tag(path, entry), None)
        self._paths.pop(ino, None)
        self._entries.pop(ino, None)
        self._attrs.pop(ino, None)
        self._links.pop(ino, None)
        self._unlinked[ino] = (entry, file)

    def _drop(self, ino: int) -> None:
        super()._drop(ino)
        self._unlinked.pop(ino, None)

    def _ino_held(self, ino: int) -> bool:
        # an unlinked or replaced inode keeps its number until the kernel
        # forgets it: handed to a new file, the kernel would give that file
        # the old one's cached pages and size
        return ino in self._paths or ino in self._unlinked

    # --- attributes -------------------------------------------------------------------

    async def getattr(self, inode, ctx=None):
        gone = self._unlinked.get(inode)
        if gone is not None:
            entry, f = gone
            if f is not None:
                entry = Entry(KIND_FILE, entry.mode, f.mtime_ns, f.size)
            a = self._attr(inode, entry)
            a.st_nlink = 0
            return a
        path = self._path(inode)
        entry = await self._lookup(path)
        self._entries[inode] = entry
        if entry.kind == KIND_DIR:
            await self._count_links(inode, path)
        return self._attr(inode, entry)

    async def setattr(self, inode, attr, fields, fh, ctx=None):
        gone = self._unlinked.get(inode)
        f = self._handles.get(fh) if fh is not None else None
        if gone is not None:
            f = f or gone[1]
            if fields.update_size and f is not None:
                self._ws(self.ws.truncate, f, attr.st_size)
                self._changed()
            return await self.getattr(inode)
        path = self._tree_path(inode)
        if fields.update_size:
            if f is not None:
                self._ws(self.ws.truncate, f, attr.st_size)
            else:
                self._ws(self.ws.truncate_path, path, attr.st_size)
        if fields.update_mode:
            self._ws(self.ws.chmod, path, attr.st_mode)
        if fields.update_mtime:
            self._ws(self.ws.utimens, path, attr.st_mtime_ns)
        # Owners are not kept (every entry shows the mount's user, as sshfs
        # and vfat do): chown succeeds and changes nothing, so that tar and
        # rsync run as root do not fail.  atime is not kept either.
        if fields.update_size or fields.update_mode or fields.update_mtime:
            self._changed()
        return await self.getattr(inode)

    async def access(self, inode, mode, ctx=None):
        return True  # default_permissions: the kernel checks the modes

    async def statfs(self, ctx=None):
        """Used: the tree's bytes; available: the store's free space; inodes:
        every entry, and as many free as 4 KiB pieces of free space."""
        s = pyfuse3.StatvfsData()
        bs = self.drive.block_size
        s.f_bsize = s.f_frsize = bs
        free_bytes = self.drive.store.free_bytes()
        free = free_bytes // bs
        s.f_blocks = (self.ws.bytes + bs - 1) // bs + free
        s.f_bfree = s.f_bavail = free
        s.f_ffree = s.f_favail = free_bytes // INODE_BYTES
        s.f_files = self.ws.entries + s.f_ffree
        s.f_namemax = 255
        return s

    # --- extended attributes ----------------------------------------------------------

    async def getxattr(self, inode, name, ctx=None):
        if inode not in self._unlinked:
            await self.getattr(inode)  # the current entry, for DriveFS's answer
        return await super().getxattr(inode, name, ctx)

    async def listxattr(self, inode, ctx=None):
        if inode not in self._unlinked:
            await self.getattr(inode)
        return await super().listxattr(inode, ctx)

    async def setxattr(self, inode, name, value, ctx=None):
        self._ws(self.ws.setxattr, self._tree_path(inode), name, value)
        self._changed()

    async def removexattr(self, inode, name, ctx=None):
        self._ws(self.ws.removexattr, self._tree_path(inode), name)
        self._changed()

    # --- the namespace ----------------------------------------------------------------

    async def mkdir(self, parent_inode, name, mode, ctx=None):
        self._tree_path(parent_inode, name)
        parent = self._path(parent_inode)
        path = self._ws(self.ws.mkdir, parent, name, mode)
        self._changed()
        self._dir_links(parent, +1)
        return self._known(path)

    async def symlink(self, parent_inode, name, target, ctx=None):
        self._tree_path(parent_inode, name)
        path = self._ws(self.ws.symlink, self._path(parent_inode), name, target)
        self._changed()
        return self._known(path)

    async def mknod(self, parent_inode, name, mode, rdev, ctx=None):
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # a drive holds no fifos, sockets or devices
        self._tree_path(parent_inode, name)
        f = self._ws(self.ws.create, self._path(parent_inode), name, mode)
        self.ws.release(f)
        self._changed()
        return self._known(f.path)

    async def link(self, inode, new_parent_inode, new_name, ctx=None):
        raise pyfuse3.FUSEError(errno.EPERM)  # no hard links in a drive (see p2pfs(1))

    async def unlink(self, parent_inode, name, ctx=None):
        path = self._tree_path(parent_inode, name)
        entry = self._ws(self.ws.lookup, path)
        f = self.ws.by_path.get(path)
        self._ws(self.ws.unlink, self._path(parent_inode), name)
        self._changed()
        if entry is not None:
            self._gone(path, entry, f if f is not None and f.opens else None)

    async def rmdir(self, parent_inode, name, ctx=None):
        path = self._tree_path(parent_inode, name)
        parent = self._path(parent_inode)
        entry = self._ws(self.ws.lookup, path)
        self._ws(self.ws.rmdir, parent, name)
        self._changed()
        self._dir_links(parent, -1)
        if entry is not None:
            self._gone(path, entry)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags,
                     ctx=None):
        old = self._tree_path(parent_inode_old, name_old)
        new = self._tree_path(parent_inode_new, name_new)
        old_parent, new_parent = self._path(parent_inode_old), self._path(parent_inode_new)
        moving = self._ws(self.ws.lookup, old)
        there = self._ws(self.ws.lookup, new)
        replaced = self.ws.by_path.get(new)
        self._ws(self.ws.rename, old_parent, name_old, new_parent, name_new, flags)
        self._changed()
        exchange = bool(flags & 2)
        if there is not None and not exchange:
            self._gone(new, there, replaced if replaced is not None and replaced.opens else None)
        moves = self._live_below(old, new)
        if exchange:
            moves += self._live_below(new, old)
        for ino, _path, _to in moves:
            self._inos.pop(self._inode_tag(_path, self._entries[ino]), None)
        for ino, _path, to in moves:
            self._paths[ino] = to
            self._inos[self._inode_tag(to, self._entries[ino])] = ino
        if moving is not None:
            moved = int(moving.kind == KIND_DIR)
            over = int(there is not None and there.kind == KIND_DIR)
            if exchange:  # each parent gives its own and gets the other
                self._dir_links(old_parent, over - moved)
                self._dir_links(new_parent, moved - over)
            else:  # a directory replaced at `new` is gone
                self._dir_links(old_parent, -moved)
                self._dir_links(new_parent, moved - over)

    def _live_below(self, old: bytes, new: bytes) -> list[tuple[int, bytes, bytes]]:
        """(ino, path, new path) of every live inode at or below `old`."""
        cut = len(old)
        return [(ino, p, new + p[cut:]) for ino, p in self._paths.items()
                if ino != ROOT and ino in self._entries
                and (p == old or p.startswith(old + b"/"))]

    # --- files -------------------------------------------------------------------------

    def _handle(self, f: File) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._handles[fh] = f
        # the page cache stays valid across opens: only this mount changes files
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def create(self, parent_inode, name, mode, flags, ctx=None):
        self._tree_path(parent_inode, name)
        f = self._ws(self.ws.create, self._path(parent_inode), name, mode)
        self._changed()
        return self._handle(f), self._known(f.path)

    async def open(self, inode, flags, ctx=None):
        gone = self._unlinked.get(inode)
        if gone is not None:  # opened again through /proc/PID/fd
            if gone[1] is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            gone[1].opens += 1
            return self._handle(gone[1])
        path = self._path(inode)
        if is_history(path):  # an old version's file: DriveFS reads it (EROFS to write)
            return await super().open(inode, flags, ctx)
        f = self._ws(self.ws.open, path)
        if flags & os.O_TRUNC and f.size:
            try:
                self._ws(self.ws.truncate, f, 0)
            except pyfuse3.FUSEError:
                self.ws.release(f)
                raise
            self._changed()
        return self._handle(f)

    async def read(self, fh, off, size):
        f = self._handles.get(fh)
        if f is None:
            return await super().read(fh, off, size)  # an old version's file, or EBADF
        return self._ws(self.ws.read, f, off, size)

    async def write(self, fh, off, buf):
        f = self._handles.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        n = self._ws(self.ws.write, f, off, buf)
        self._changed()
        return n

    async def release(self, fh):
        f = self._handles.pop(fh, None)
        if f is not None:
            self.ws.release(f)
        else:
            await super().release(fh)

    async def flush(self, fh):
        return None  # close is not a durability point (fsync is), as on a disk

    async def fsync(self, fh, datasync):
        await self._commit_or_errno()

    async def fsyncdir(self, fh, datasync):
        await self._commit_or_errno()

    # --- commits -----------------------------------------------------------------------

    async def _commit_or_errno(self) -> None:
        try:
            await self.commit_now()
        except WorkspaceError as exc:
            raise _errno(exc) from None

    async def commit_now(self) -> WriteResult | None:
        """Commit what changed (None if nothing did); returns once durable.
        Raises WorkspaceError (ENOSPC, EIO)."""
        async with self._commit_lock:
            if not self.ws.changed:
                return None
            self._gate = trio.Event()
            try:
                result = await trio.to_thread.run_sync(self.ws.commit)
            finally:
                self._gate.set()
            self._first_change = None
            self.version = self.drive.version
            if result is not None and self.on_commit is not None:
                self.on_commit(result)
            return result

    async def _wait_gate(self) -> None:
        if not self._gate.is_set():
            await self._gate.wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The committer: commits after the idle and the longest interval; until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await self._change.wait()
                    while True:
                        first = self._first_change if self._first_change is not None \
                            else trio.current_time()
                        due = min(self._last_change + self.commit_interval,
                                  first + self.max_interval)
                        if trio.current_time() >= due:
                            break
                        await trio.sleep_until(due)
                    self._change = trio.Event()
                    try:
                        await self.commit_now()
                    except WorkspaceError as exc:
                        log.error("commit failed: %s", exc)
            finally:
                self._nursery = None

    async def close(self) -> WriteResult | None:
        """The last commit, when the mount ends (not cancellable)."""
        with trio.CancelScope(shield=True):
            return await self.commit_now()


def _gated(name: str, handler):
    """`handler` waiting while a commit runs (the commit sees one still tree)."""

    @functools.wraps(handler)
    async def gated(self, *args, **kwargs):
        await self._wait_gate()
        return await handler(self, *args, **kwargs)
    return gated


for _name, _handler in list(vars(pyfuse3.Operations).items()):
    if inspect.iscoroutinefunction(_handler) and _name not in ("forget", "statfs"):
        method = getattr(WritableFS, _name)
        if _name in ("fsync", "fsyncdir"):
            setattr(WritableFS, _name, _guarded(_name, method))  # they wait for the lock
        else:
            setattr(WritableFS, _name, _guarded(_name, _gated(_name, method)))
    elif _name in ("forget", "statfs"):
        setattr(WritableFS, _name, _guarded(_name, getattr(WritableFS, _name)))
del _name, _handler
