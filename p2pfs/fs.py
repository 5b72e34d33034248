"""pyfuse3 Operations over one drive: a read-only, lazy, verified, live folder.

Theory of operation
-------------------
Inodes.  An inode number is derived by hashing what it stands for (`_tag`):
the kind and the path, and for a regular file also its content identity
(size and extents).  So a path keeps its number across versions and across
remounts without a table that grows with every path ever seen, as long as
it stays what it was; a path that turns from a file into a directory gets a
new inode (the kernel requires it), and so does a file whose content a new
version changes (see Reads), while a change of mode or mtime keeps it.  The
process keeps `ino -> path` only for inodes the kernel knows, i.e. whose
lookup count is positive: `lookup` and every `readdir` entry the kernel
accepted add one, `forget` subtracts, and at zero the inode is dropped.
The root is `pyfuse3.ROOT_INODE` and is never dropped.  A hash collision
with a live inode of another tag is resolved by probing (rehash with a
counter), so numbers are unique among live inodes.

Entries.  For every live inode we keep the `Entry` last reported to the
kernel (`_entries`).  `getattr` answers from it; it is kept current by the
version switch below, so it is never stale for longer than a switch takes.

Link counts.  A directory's `st_nlink` is 2 + its subdirectories, as on a
disk file system (`find` relies on it).  The count needs the directory's
listing, so it is known (`_links`, for the current version) once the
directory was listed (`opendir`) or looked up (`lookup` and `getattr` list
it).  A directory reported before that, as a child in a `readdir` reply,
gets the "unknown" count 1 with an attribute timeout of 0, so the kernel
asks `getattr` before showing it.  A version switch forgets every count and
invalidates the attributes of every live directory.

Versions.  A live mount follows the drive's newest signed version; a fixed
mount (`KEY@N`) never moves.  The follower task wakes when the drive reports
a new head (`drive.subscribe`) and, as a backstop for writers in other
processes sharing the store, every `poll_interval` seconds; it calls
`drive.refresh()`.  If the version moved, it looks up every live path in the
new version (grouped by directory: one `listdir` for a directory with many
live children, single lookups otherwise), then in one synchronous step
replaces the entries whose metadata changed, bumps `_generation`, and
finally, in a worker thread (the kernel may block a notification until a
request in flight completes, and that request needs this thread), tells
the kernel: `invalidate_inode` for changed inodes (attributes only for a
file, whose content is the same; data too for directories and links) and
`invalidate_entry` (as a deletion) for paths that vanished or whose inode
is now another one (a new kind or new content).  Such an old inode is
*detached*: it keeps its last entry and its page cache (its blocks never
change) for the handles open on it, and is not looked up again.

A handler that awaited the drive across a switch could otherwise store an
entry of the old version; handlers compare `_generation` before and after
and retry, so `_entries` only ever receives entries of the current version.

Reads.  An open file reads through `drive.read(entry, offset, size)`, which
maps the range onto blocks, fetches missing ones from the block source and
verifies everything.  An open handle is a snapshot: it reads the entry of
the version current when it was opened, like a file replaced by rename on a
local disk, so a reader never gets bytes that no single version held.  The
kernel's page cache is per inode and shared by every handle, which is why
new content means a new inode: new opens (and `stat`) see the new version
through the new inode, handles open on the old one keep reading the old
bytes, cached or not.  Sequential reads
grow a per-handle read-ahead window (doubling, capped) that prefetches the
next blocks in the background when the drive fetches from peers; a read
that is not at the previous end resets the window, so random readers fetch
only what they touch.

What a drive may say.  Every entry comes checked and sanitized by the
drive (no setuid, setgid or sticky bits; only `user.` extended attributes).
The mount serves those attributes, answers its own `user.p2pfs.*` by name
without listing them (so `cp -a` out of the mount copies none), and answers
`system.*`, `security.*` and `trusted.*` with EOPNOTSUPP: no ACLs,
capabilities or labels from a stranger.

Errors.  Handlers raise only `FUSEError`: missing path -> ENOENT, a block no
peer supplied in time, that failed verification, or a bad drive -> EIO, any
attempt to write -> EROFS.  Every handler is wrapped once (`_guarded`): any
other exception becomes EIO and one log line, never the end of the mount.
A read that timed out is remembered for a second on its handle: the kernel
retries a failed read-ahead page by page, and each retry would otherwise
wait the whole timeout again.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import logging
import os
import stat
from collections import defaultdict
from collections.abc import Callable

import msgspec
import pyfuse3
import trio

from p2pfs.crypto import encode_key
from p2pfs.errors import (
    BlockUnavailableError,
    NotFoundError,
    P2pfsError,
    UsageError,
    VerificationError,
)
from p2pfs.index import KIND_DIR, KIND_FILE, KIND_SYMLINK, MAX_NAME, MAX_PATH, Entry
from p2pfs.snapshots import PREFIX as HISTORY, Snapshots, is_history

__all__ = ["DriveFS", "XATTR_KEY", "XATTR_VERSION", "XATTR_BLOCKS_HELD"]

log = logging.getLogger(__name__)

XATTR_KEY = b"user.p2pfs.key"
XATTR_VERSION = b"user.p2pfs.version"
XATTR_BLOCKS_HELD = b"user.p2pfs.blocks_held"

ROOT = pyfuse3.ROOT_INODE
_INO_MASK = (1 << 63) - 1
_TYPE = {KIND_FILE: stat.S_IFREG, KIND_DIR: stat.S_IFDIR, KIND_SYMLINK: stat.S_IFLNK}
_USER_XATTRS = b"user."
_OWN_XATTRS = b"user.p2pfs."
_MANY_LIVE = 8  # live children of one directory above which a switch lists it whole

_STATFS_MAX = (1 << 63) - 1  # a drive's totals are the author's word: keep them in range
DIR_SIZE = 4096  # what ext4 and most disk file systems report for a small directory
FAILED_READ_MEMORY = 1.0  # s: a range that just timed out fails at once when retried
READAHEAD_FIRST = 4  # blocks prefetched after the second sequential read
READAHEAD_MAX = 64  # window cap in blocks (4 MiB of 64 KiB blocks)


def _join(parent: bytes, name: bytes) -> bytes:
    return b"/" + name if parent == b"/" else parent + b"/" + name


def _split(path: bytes) -> tuple[bytes, bytes]:
    head, _, name = path.rpartition(b"/")
    return (head or b"/"), name


def _tag(path: bytes, entry: Entry) -> bytes:
    """What an inode number stands for: kind and path; for a file also its
    content (size and extents), so that new content is a new inode."""
    tag = bytes([entry.kind]) + path
    if entry.kind == KIND_FILE:
        content = msgspec.msgpack.encode((entry.size, entry.extents))
        tag += b"\x00" + hashlib.blake2b(content, digest_size=16).digest()
    return tag


def _dir_tag(path: bytes) -> bytes:
    return bytes([KIND_DIR]) + path


class _File:
    """An open file: its inode, the entry it reads (through `drive`: the live
    view, or an old version's), and read-ahead state."""

    __slots__ = ("ino", "path", "entry", "drive", "expected", "window", "ahead_until",
                 "ahead_target", "ahead_running", "cancel", "closed", "failed")

    def __init__(self, ino: int, path: bytes, entry: Entry, drive):
        self.ino = ino
        self.path = path
        self.entry = entry
        self.drive = drive
        self.expected = 0  # offset a sequential reader asks for next
        self.window = 0  # read-ahead window in blocks; 0 = not sequential
        self.ahead_until = 0  # bytes [.., ahead_until) are fetched or being fetched
        self.ahead_target = 0  # the prefetcher works until ahead_until reaches this
        self.ahead_running = False
        self.cancel: trio.CancelScope | None = None  # the running prefetcher's scope
        self.closed = False
        self.failed: tuple[int, int, float] | None = None  # (start, end, until): EIO fast


class DriveFS(pyfuse3.Operations):
    """The FUSE face of one `Drive`.  Run `run()` in a nursery beside `pyfuse3.main()`.

    `live`: follow new versions (False for a `KEY@N` mount).  `prefetch`:
    whether sequential reads prefetch ahead (worth it only when blocks come
    from peers).  Timeouts are the kernel's entry/attribute cache lifetimes;
    correctness across versions comes from explicit invalidation, not from
    them expiring.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    # what an inode number stands for (see _tag); the writable mount, whose
    # files change content in place, keeps it to kind and path
    _inode_tag = staticmethod(_tag)

    def __init__(self, drive, *, live: bool = True, prefetch: bool = False,
                 poll_interval: float = 0.25, cache_timeout: float | None = None,
                 uid: int | None = None, gid: int | None = None):
        super().__init__()
        self.drive = drive
        self.live = live
        self.prefetch = prefetch
        self.poll_interval = poll_interval
        self.timeout = cache_timeout if cache_timeout is not None else (60.0 if live else 3600.0)
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self._paths: dict[int, bytes] = {ROOT: b"/"}
        self._inos: dict[bytes, int] = {}  # (kind byte + path) -> ino, live inodes only
        self._entries: dict[int, Entry] = {}
        self._attrs: dict[int, tuple[Entry, int, pyfuse3.EntryAttributes]] = {}  # live inodes
        self._links: dict[int, int] = {}  # live directory inode -> st_nlink, current version
        self._nlookup: dict[int, int] = defaultdict(int)
        self._files: dict[int, _File] = {}
        self._dirs: dict[int, tuple[bytes, int, list[tuple[bytes, int, Entry]]]] = {}
        self._recheck: set[int] = set()  # inodes given entries of an older version
        self._detached: set[int] = set()  # inodes no longer at their path (kept for open handles)
        self._next_fh = 1
        self._generation = 0
        self.version = drive.version  # the version shown: set once the kernel's caches agree
        self.snapshots = Snapshots(drive)  # the hidden /.p2pfs/versions/N/
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ---------------------------------------------------------------- inodes

    def _ino_for(self, path: bytes, entry: Entry) -> int:
        if path == b"/":
            return ROOT
        tag = self._inode_tag(path, entry)
        ino = self._inos.get(tag)
        if ino is not None:
            return ino
        probe = 0
        while True:
            digest = hashlib.blake2b(tag + (probe.to_bytes(4, "little") if probe else b""),
                                     digest_size=8).digest()
            ino = int.from_bytes(digest, "little") & _INO_MASK
            if ino > ROOT and not self._ino_held(ino):
                return ino
            probe += 1

    def _ino_held(self, ino: int) -> bool:
        """Whether the kernel may still hold inode `ino` (it is not free to
        stand for anything else until the kernel forgets it)."""
        return ino in self._paths

    def _remember(self, ino: int, path: bytes, entry: Entry) -> None:
        """Record a live inode (the caller then adds to its lookup count)."""
        if ino != ROOT:
            self._paths[ino] = path
            self._inos[self._inode_tag(path, entry)] = ino
            self._detached.discard(ino)
        self._entries[ino] = entry

    def _drop(self, ino: int) -> None:
        self._attrs.pop(ino, None)
        self._links.pop(ino, None)
        path = self._paths.pop(ino, None)
        entry = self._entries.pop(ino, None)
        self._nlookup.pop(ino, None)
        self._detached.discard(ino)
        if path is not None and entry is not None:
            tag = self._inode_tag(path, entry)
            if self._inos.get(tag) == ino:
                del self._inos[tag]

    def _path(self, ino: int) -> bytes:
        try:
            return self._paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _attr(self, ino: int, entry: Entry) -> pyfuse3.EntryAttributes:
        nlink = self._links.get(ino, 0) if entry.kind == KIND_DIR else 1
        hit = self._attrs.get(ino)
        if hit is not None and hit[0] is entry and hit[1] == nlink:
            return hit[2]  # listing a directory again: the same objects
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = self.timeout
        # a directory whose subdirectories are not counted yet: 1 ("unknown",
        # as find understands it), and the kernel asks again before using it
        a.attr_timeout = self.timeout if nlink else 0
        a.st_mode = _TYPE[entry.kind] | (entry.mode & 0o7777)
        a.st_nlink = nlink or 1
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_rdev = 0
        if entry.kind == KIND_FILE:
            size = entry.size
        elif entry.kind == KIND_SYMLINK:
            size = len(entry.target)
        else:
            size = DIR_SIZE
        a.st_size = size
        a.st_blksize = self.drive.block_size
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = entry.mtime_ns
        if ino in self._entries:  # cached for live inodes only, dropped with them
            self._attrs[ino] = (entry, nlink, a)
        return a

    @staticmethod
    def _nlink(listing) -> int:
        """st_nlink of a directory with these (name, entry) children."""
        return 2 + sum(1 for _, e in listing if e.kind == KIND_DIR)

    async def _count_links(self, ino: int, path: bytes) -> None:
        """Know the link count of a live directory inode (lists it once per version)."""
        if ino in self._links:
            return
        generation = self._generation
        try:
            nlink = self._nlink(await self._listdir(path))
        except pyfuse3.FUSEError:
            return  # unreadable listing: the count stays unknown (1)
        if generation == self._generation and ino in self._entries:
            self._links[ino] = nlink

    # ---------------------------------------------------------- drive calls

    async def _current(self, ask, path: bytes):
        """`await ask(path)` on the drive, answered by the current version.

        A version switch while we waited means the answer may be of the old
        version: ask again.  Domain errors become FUSEError here."""
        while True:
            generation = self._generation
            try:
                answer = await ask(path)
            except NotFoundError:
                if generation == self._generation:
                    raise pyfuse3.FUSEError(errno.ENOENT) from None
                continue
            except P2pfsError as exc:
                raise _fuse_error(exc, path) from None
            if generation == self._generation:
                return answer

    async def _lookup(self, path: bytes) -> Entry:
        """The current version's entry for `path` (or, under /.p2pfs, the
        history's); FUSEError on failure."""
        if is_history(path):
            return await self._current(self.snapshots.lookup, path)
        return await self._current(self.drive.lookup, path)

    async def _listdir(self, path: bytes) -> list[tuple[bytes, Entry]]:
        if is_history(path):
            return await self._current(self.snapshots.listdir, path)
        items = await self._current(self.drive.listdir, path)
        if path == b"/":  # the history is entered by name, never listed
            items = [(name, e) for name, e in items if name != HISTORY[1:]]
        return items

    # -------------------------------------------------------------- handlers

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._path(parent_inode)
        if len(name) > MAX_NAME or len(parent) + 1 + len(name) > MAX_PATH:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if name == b".":
            path = parent
        elif name == b"..":
            path = _split(parent)[0] if parent != b"/" else b"/"
        else:
            path = _join(parent, name)
        entry = await self._lookup(path)
        ino = self._ino_for(path, entry)
        self._remember(ino, path, entry)
        self._nlookup[ino] += 1
        if entry.kind == KIND_DIR:
            await self._count_links(ino, path)
        return self._attr(ino, entry)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            if ino == ROOT:
                continue
            left = self._nlookup.get(ino, 0) - n
            if left > 0:
                self._nlookup[ino] = left
            else:
                self._drop(ino)

    async def getattr(self, inode, ctx=None):
        entry = self._entries.get(inode)
        if entry is None:
            if inode != ROOT:
                raise pyfuse3.FUSEError(errno.ESTALE)
            entry = await self._lookup(b"/")
            self._entries[ROOT] = entry
        if entry.kind == KIND_DIR:
            await self._count_links(inode, self._path(inode))
            entry = self._entries.get(inode, entry)  # a switch meanwhile: its entry
        return self._attr(inode, entry)

    async def readlink(self, inode, ctx=None):
        entry = self._entries.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if entry.kind != KIND_SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return entry.target

    async def opendir(self, inode, ctx=None):
        path = self._path(inode)
        entry = self._entries.get(inode)
        if entry is None and inode == ROOT:
            entry = self._entries[ROOT] = await self._lookup(b"/")
        if entry is not None and entry.kind != KIND_DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        generation = self._generation
        items = await self._listdir(path)
        if generation == self._generation and inode in self._entries:
            self._links[inode] = self._nlink(items)
        # A snapshot, so that offsets stay valid for the whole listing.  "."
        # and ".." come first; the kernel keeps no lookup count for them.
        listing: list[tuple[bytes, int, Entry]] = []
        if entry is not None:
            listing.append((b".", inode, entry))
            parent_ino = ROOT if path == b"/" else self._inos.get(_dir_tag(_split(path)[0]), ROOT)
            listing.append((b"..", parent_ino, self._entries.get(parent_ino, entry)))
        for name, e in items:
            listing.append((name, self._ino_for(_join(path, name), e), e))
        fh = self._new_fh()
        self._dirs[fh] = (path, self._generation, listing)
        return fh

    async def readdir(self, fh, start_id, token):
        try:
            path, generation, listing = self._dirs[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        for i in range(start_id, len(listing)):
            name, ino, entry = listing[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino, entry), i + 1):
                return
            if name == b"." or name == b"..":
                continue
            # The kernel now holds this inode (readdirplus counts as a lookup).
            # An entry listed before a version switch may be stale; the kernel
            # still gets the count, and the current entry is looked up anew.
            if generation == self._generation:
                if self._entries.get(ino) is not entry:
                    self._remember(ino, _join(path, name), entry)
            elif ino not in self._entries:
                self._remember(ino, _join(path, name), entry)
                self._recheck.add(ino)
                self._wakeup.set()
            self._nlookup[ino] += 1

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    async def open(self, inode, flags, ctx=None):
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        entry = self._entries.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if entry.kind == KIND_DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if entry.kind != KIND_FILE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        path = self._paths[inode]
        drive = self.drive
        if is_history(path):
            try:
                drive = await self.snapshots.drive_for(path)
            except P2pfsError as exc:
                raise _fuse_error(exc, path) from None
        fh = self._new_fh()
        self._files[fh] = _File(inode, path, entry, drive)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh, off, size):
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        entry = f.entry
        if off >= entry.size or size <= 0:
            return b""
        size = min(size, entry.size - off)
        if f.failed is not None and f.failed[0] <= off < f.failed[1] \
                and trio.current_time() < f.failed[2]:
            # The kernel retries a failed read-ahead page by page; each retry
            # would wait the whole fetch timeout again.
            raise pyfuse3.FUSEError(errno.EIO)
        self._note_read(f, off, size)
        try:
            return await f.drive.read(entry, off, size, f.path)
        except P2pfsError as exc:
            if isinstance(exc, BlockUnavailableError):
                f.failed = (off, off + size, trio.current_time() + FAILED_READ_MEMORY)
            raise _fuse_error(exc, f.path) from None

    async def release(self, fh):
        f = self._files.pop(fh, None)
        if f is not None:
            f.closed = True
            if f.cancel is not None:
                f.cancel.cancel()

    async def statfs(self, ctx=None):
        """The drive's size against the free space of the store (where blocks
        read from peers are kept), as network file systems report theirs;
        every entry is an inode, and none can be created."""
        s = pyfuse3.StatvfsData()
        bs = self.drive.block_size
        s.f_bsize = bs
        s.f_frsize = bs
        commit = self.drive.commit
        total_bytes, entries = ((commit.bytes, commit.entries or commit.files)
                                if commit is not None else (0, 0))
        free = self.drive.store.free_bytes() // bs
        s.f_blocks = min((total_bytes + bs - 1) // bs + free, _STATFS_MAX)
        s.f_bfree = s.f_bavail = min(free, s.f_blocks)
        s.f_files = min(entries, _STATFS_MAX)
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    async def access(self, inode, mode, ctx=None):
        if inode not in self._entries and inode != ROOT:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def getxattr(self, inode, name, ctx=None):
        entry = self._entries.get(inode)
        if entry is None and inode != ROOT:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if not name.startswith(_USER_XATTRS):
            # No ACLs, capabilities or security labels here (the drive's are
            # never served).  Saying so (rather than "no such attribute") lets
            # `ls -l` stop asking for every file: two round trips per entry.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if name == XATTR_KEY:
            return encode_key(self.drive.key).encode()
        if name == XATTR_VERSION:
            return str(self.version).encode()
        if name == XATTR_BLOCKS_HELD and entry is not None and entry.kind == KIND_FILE:
            if self.drive.source is not None:
                await self.drive.source.drain(self.drive)  # what reads took from memory counts
            try:
                return str(self.drive.blocks_held(entry)).encode()
            except P2pfsError as exc:
                raise _fuse_error(exc, self._paths.get(inode, b"?")) from None
        if not name.startswith(_OWN_XATTRS):  # a drive's user.p2pfs.* is never served
            for key, value in (entry.xattrs if entry is not None else ()):
                if key == name:
                    return value
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx=None):
        """The drive's `user.` attributes only: p2pfs's own are answered by
        name but not listed, so that `cp -a` out of the mount copies none."""
        entry = self._entries.get(inode)
        if entry is None and inode != ROOT:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return [k for k, _ in (entry.xattrs if entry is not None else ())]

    # Every way of changing the tree is refused: the drive is read-only here.
    async def _readonly(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _readonly
    write = create = setxattr = removexattr = _readonly

    async def flush(self, fh):
        return None

    async def fsync(self, fh, datasync):
        return None

    async def fsyncdir(self, fh, datasync):
        return None

    # ------------------------------------------------------------ read-ahead

    def _note_read(self, f: _File, off: int, size: int) -> None:
        """Track sequential reads; grow the window and kick the prefetcher."""
        if off == f.expected and off > 0:
            f.window = min(READAHEAD_MAX, f.window * 2 if f.window else READAHEAD_FIRST)
        elif f.window or f.ahead_running:
            # A seek: stop fetching ahead of where the reader used to be.
            f.window = 0
            f.ahead_until = f.ahead_target = 0
            if f.cancel is not None:
                f.cancel.cancel()
        f.expected = off + size
        if not self.prefetch or f.window == 0 or self._nursery is None or f.closed:
            return
        bs = self.drive.block_size
        end = min(f.entry.size, (f.expected // bs + f.window) * bs)
        f.ahead_until = max(f.ahead_until, f.expected)
        if end <= f.ahead_until:
            return
        f.ahead_target = max(f.ahead_target, end)
        if not f.ahead_running:
            try:
                self._nursery.start_soon(self._prefetcher, f)
            except RuntimeError:  # shutting down: the nursery takes no new tasks
                return
            f.ahead_running = True

    async def _prefetcher(self, f: _File) -> None:
        """Fetch [ahead_until, ahead_target) of `f` one window piece at a time."""
        bs = self.drive.block_size
        f.cancel = trio.CancelScope()
        try:
            with f.cancel:
                while f.ahead_until < f.ahead_target:
                    start = f.ahead_until
                    stop = min(f.ahead_target, start + READAHEAD_MAX * bs)
                    f.ahead_until = stop
                    await f.drive.prefetch(f.entry, start, stop - start)
        except P2pfsError as exc:
            # The reader's own read will hit the same block and report EIO.
            log.debug("read-ahead of %r stopped: %s", f.path, exc)
            f.ahead_until = f.expected
        except Exception:
            # Read-ahead is only a hint: a bug here must not take the mount down.
            log.exception("read-ahead of %r failed", f.path)
            f.ahead_until = f.expected
        finally:
            f.ahead_running = False
            f.cancel = None

    # ------------------------------------------------------ following versions

    def _head_moved(self, head=None) -> None:
        self._wakeup.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the background work (follower, read-ahead); runs until cancelled."""
        unsubscribe: Callable[[], None] | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.live:
                    unsubscribe = self.drive.subscribe(self._head_moved)
                task_status.started()
                while True:
                    with trio.move_on_after(self.poll_interval if self.live else float("inf")):
                        await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    await self.sync()
        finally:
            self._nursery = None
            if unsubscribe is not None:
                unsubscribe()

    async def sync(self) -> bool:
        """Move a live view to the newest version and fix the kernel's caches.

        Returns True if the version moved.  Also re-checks inodes that a
        directory listing taken before the last switch handed to the kernel.
        """
        moved = False
        if self.live:
            before = self.drive.version
            try:
                await self.drive.refresh()
            except P2pfsError as exc:
                log.warning("cannot follow the drive: %s", exc)
                return False
            moved = self.drive.version != before
        if moved:
            self._generation += 1
            self._links.clear()  # subdirectories may have come or gone anywhere
            check = set(self._entries)
            self._recheck.clear()
        else:
            check, self._recheck = self._recheck, set()
            if not check:
                return False
        generation = self._generation
        try:
            current = await self._current_entries(check)
        except P2pfsError as exc:
            # The new version's index is not reachable: drop every cache so
            # that the kernel asks again (and gets an honest error if need be).
            log.warning("cannot read the new version's index: %s", exc)
            current = None
        if generation != self._generation:
            return moved  # another switch started meanwhile; it rechecks all
        changed: list[tuple[int, bool]] = []  # (inode, attributes only)
        gone: list[tuple[int, bytes, int]] = []
        for ino in check:
            if ino not in self._entries or ino in self._detached:
                continue  # forgotten meanwhile, or no longer at its path
            old = self._entries[ino]
            path = self._paths.get(ino, b"/")
            new = None if current is None else current.get(ino)
            if ino == ROOT:
                if new != old:
                    if new is not None:
                        self._entries[ino] = new
                    changed.append((ino, False))
            elif new is None or _tag(path, new) != _tag(path, old):
                # Vanished, or another inode now (new kind or new content):
                # this one keeps its entry and cache for the handles open on it.
                parent, name = _split(path)
                parent_ino = ROOT if parent == b"/" else self._inos.get(_dir_tag(parent), 0)
                gone.append((parent_ino, name, ino))
                self._detached.add(ino)
                if new is None or new.kind != old.kind:
                    changed.append((ino, False))
            elif new != old:
                self._entries[ino] = new
                changed.append((ino, old.kind == KIND_FILE))
        if moved:  # the kernel must ask every directory's link count again
            listed = {i for i, _ in changed}
            changed.extend((ino, True) for ino, e in self._entries.items()
                           if e.kind == KIND_DIR and ino not in listed)
        if changed or gone:
            await trio.to_thread.run_sync(_invalidate, changed, gone, abandon_on_cancel=True)
        if generation == self._generation:
            self.version = self.drive.version
        return moved

    async def _current_entries(self, inos: set[int]) -> dict[int, Entry]:
        """ino -> entry in the current version for those of `inos` that still exist."""
        by_dir: dict[bytes, list[tuple[int, bytes]]] = defaultdict(list)
        result: dict[int, Entry] = {}
        for ino in inos:
            path = self._paths.get(ino)
            if path is None:
                continue
            if is_history(path):  # old versions never change (versions/ only grows)
                result[ino] = self._entries[ino]
                continue
            if path == b"/":
                result[ino] = await self.drive.lookup(b"/")
                continue
            parent, name = _split(path)
            by_dir[parent].append((ino, name))
        for parent, children in by_dir.items():
            if len(children) >= _MANY_LIVE:
                try:
                    listing = dict(await self.drive.listdir(parent))
                except (NotFoundError, UsageError):  # gone, or no longer a directory
                    continue
                for ino, name in children:
                    if name in listing:
                        result[ino] = listing[name]
            else:
                for ino, name in children:
                    try:
                        result[ino] = await self.drive.lookup(_join(parent, name))
                    except NotFoundError:
                        pass
        return result

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh


def _guarded(name: str, handler):
    """`handler` answering EIO, with one log line, for any exception but
    FUSEError: a bug or a drive nobody foresaw must not end the mount
    (pyfuse3 ends its main loop on any other exception).  `forget` gets no
    reply at all, so there it is only logged."""

    @functools.wraps(handler)
    async def guarded(self, *args, **kwargs):
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            frame = exc.__traceback__
            while frame.tb_next is not None:
                frame = frame.tb_next
            where = f"{os.path.basename(frame.tb_frame.f_code.co_filename)}:{frame.tb_lineno}"
            log.error("%s failed (%s: %s, at %s); answered EIO", name, type(exc).__name__,
                      exc, where)
            if name == "forget":
                return None
            raise pyfuse3.FUSEError(errno.EIO) from None
    return guarded


for _name, _handler in list(vars(pyfuse3.Operations).items()):
    if inspect.iscoroutinefunction(_handler):
        setattr(DriveFS, _name, _guarded(_name, getattr(DriveFS, _name)))
del _name, _handler


def _invalidate(changed: list[tuple[int, bool]], gone: list[tuple[int, bytes, int]]) -> None:
    """Tell the kernel (from a worker thread: these calls may block)."""
    for parent_ino, name, ino in gone:
        if not parent_ino:
            continue
        try:
            pyfuse3.invalidate_entry(parent_ino, name, deleted=ino)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.warning("invalidate_entry(%d, %r): %s", parent_ino, name, exc)
    for ino, attr_only in changed:
        try:
            pyfuse3.invalidate_inode(ino, attr_only)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("invalidate_inode(%d): %s", ino, exc)


def _fuse_error(exc: P2pfsError, path: bytes) -> pyfuse3.FUSEError:
    """The boundary: a domain error becomes an errno (and a log line for EIO)."""
    if isinstance(exc, NotFoundError):
        return pyfuse3.FUSEError(errno.ENOENT)
    if isinstance(exc, UsageError):  # a name the drive cannot hold (NUL, too long)
        return pyfuse3.FUSEError(errno.EINVAL)
    if isinstance(exc, (BlockUnavailableError, VerificationError)):
        log.warning("%s: %s", path.decode(errors="replace"), exc)
        return pyfuse3.FUSEError(errno.EIO)
    log.warning("%s: %s", path.decode(errors="replace"), exc)
    return pyfuse3.FUSEError(errno.EIO)
