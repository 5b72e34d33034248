"""The local store: one LMDB environment per node home.  The only lmdb importer.

Theory of operation
-------------------
A home directory holds::

    store/data.mdb, store/lock.mdb   the LMDB environment (sparse, map 1 TiB)
    keys/<zbase32 key>.key           a drive's secret seed
    locks/<key hex>.lock             writer locks (flock)
    node.key, mount.log              the node's Noise key; a daemon mount's log

*The home is private*: the store holds the plaintext of every drive in it.
The home and every directory in it are created mode 0700, every file 0600,
through `make_private_dir` and `open_private` (code that adds a file to the
home uses them, so it cannot forget).  A home made by an older version is
tightened when a Store opens it (`tighten_home`), and the caller's `warn`
hears of it once.

*Damage.*  Every LMDB error is turned into a `StoreError` naming the home:
`StoreDamagedError` for damaged pages (``the store in HOME is damaged: ...;
run 'p2pfs verify'``), a one-line full-disk message with the free space for
ENOSPC.  LMDB maps the data file; a page past its end is SIGBUS, not an
error, so before mapping, the meta pages are checked against the file's
size (`check_data_file`): a truncated file or a meta page pointing past it
is reported instead of killing the process.  `check_structure` walks every
page (py-lmdb's offline verifier) for `p2pfs verify`.

Sub-databases (all keys begin with the 32-byte drive key, integers are u64
big-endian so that one drive's records are one sorted range):

    blocks   key || block        -> block bytes
    nodes    key || node         -> hash (32) || u64le size     tree nodes
    heads    key || length       -> root (32) || signature (64) [|| DHT signature (64)]
    forks    key || length || root -> signature                 fork evidence
    drives   key                 -> DriveRecord (msgpack)
    held     key                 -> u64le blocks || u64le bytes accounting
    lastread key || block        -> u64be tick || u32le size    cache bookkeeping
    lru      tick || key || block -> b""                        ... ordered by tick
    cached   key                 -> u64le blocks || u64le bytes  evictable, counted

Every public method is one transaction.  Several processes may share the
environment (LMDB's lock file); write transactions are kept short by
callers writing content in batches of at most `WRITE_BATCH_BYTES`.

The crash-safety rule: blocks may be written before they are signed (a
version in progress), but tree nodes, the signed head and the drive record
of a version are written together in one final transaction
(`commit_version`).  A reader only believes blocks below a signed head's
length, so a process killed at any moment leaves either no drive (create)
or the last complete version (import); blocks at or past the signed length
are garbage that the next write deletes (`discard_blocks_from`).

The environment runs with MDB_NOMETASYNC: each commit flushes its data
pages, the meta page is flushed lazily, so an operating-system crash can
lose the last transactions but cannot damage the store.  `commit_version`
flushes everything before returning, so a version reported as written is
durable.

The `held` counters are updated in the same transaction as the blocks they
count, so `blocks_held`/`bytes_held` are exact and cost one read.

*The cache.*  Content blocks of drives this home neither owns nor pins are
a cache (the policy is `p2pfs.cache`'s).  A block enters the bookkeeping
when a reader reports it read (`touch_blocks`, batched by the caller): its
last-read tick goes to `lastread` and `(tick, key, block)` to `lru`, so the
least recently read block is the first key of `lru`.  Blocks never touched
(index blocks, tree nodes, heads) are not in it and are never evicted.
`evict` deletes blocks from the front of `lru`, in one transaction,
updating `held` and `cached`; `cached` counts what is in the bookkeeping,
so the size of the cache costs one scan of a small sub-database.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat
import struct
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import lmdb
import msgspec

from .errors import DiskFullError, KeyFileError, StoreDamagedError, StoreError
from .types import Head, Node

# MDB_NOMETASYNC: data pages are flushed at every commit, the meta page
# lazily, so an OS crash may drop the last transactions but never damages
# the store (full MDB_NOSYNC could).  Measured here: the disk, not the
# flush, bounds writing a version.
SYNC_EACH_COMMIT = True
MAP_SIZE = 1 << 40  # 1 TiB; the file is sparse and grows as it is used
MAX_READERS = 512
WRITE_BATCH_BYTES = 32 << 20  # callers keep write transactions below this (fewer, larger
# transactions: 4 MiB ones write 1 GiB at 0.7 GB/s here, 32 MiB ones at 1.0, each fsynced)
KEY_BYTES = 32
HASH_BYTES = 32
SIGNATURE_BYTES = 64
_SIGNED = HASH_BYTES + SIGNATURE_BYTES  # a heads value: root, signature [, DHT signature]

_U64 = struct.Struct(">Q")
_NODE = struct.Struct("<Q")
_HELD = struct.Struct("<QQ")
_LAST = struct.Struct(">QI")  # lastread value: tick, block size
_TICK = struct.Struct(">Q")
EVICT_BATCH = 4096  # blocks evicted (or forgotten) per transaction at most


class DriveRecord(msgspec.Struct, array_like=True, frozen=True):
    """What the store remembers about a drive besides its log."""

    created_ns: int = 0
    owned: bool = False  # created on this node (a secret key file is expected)
    pinned: bool = True  # never evicted (owned, seeded or pinned)
    paths: tuple[bytes, ...] = ()  # pinned folders of a drive that is not pinned whole

    @property
    def kept(self) -> bool:
        """Whether none of this drive's blocks may be evicted."""
        return self.owned or self.pinned


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(DriveRecord)


def default_home() -> Path:
    """$P2PFS_HOME, else $XDG_DATA_HOME/p2pfs, else ~/.local/share/p2pfs."""
    env = os.environ.get("P2PFS_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "p2pfs"


def _bk(key: bytes, n: int) -> bytes:
    return key + _U64.pack(n)


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError("drive key must be 32 bytes")


# --- the home is private ------------------------------------------------------------

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# What older versions wrote into a home, tightened when a Store opens it:
# these directories and the files in the first two, and these files.  Secret
# key files (keys/*.key, node.key) are left alone: one that others could read
# is refused with the chmod that fixes it (its secret may have been copied).
_HOME_DIRS = ("store", "locks", "keys", "run", "mirrors")
_HOME_FILES = ("mount.log", "share.log", "seed.log")
_tightened: set[str] = set()  # homes checked by this process


def make_private_dir(path: str | os.PathLike) -> Path:
    """Create directory `path` mode 0700 if it is missing (parents as `mkdir -p`
    would).  An existing directory is left as it is.  Raises OSError."""
    path = Path(path)
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return make_private_dir(path)
    return path


def open_private(path: str | os.PathLike, flags: int) -> int:
    """os.open(path, flags) creating the file mode 0600; an existing file that
    others could read is made private.  Raises OSError."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, mode & ~0o077)
    except OSError:
        os.close(fd)
        raise
    return fd


def _tighten(path: str, st: os.stat_result) -> bool:
    """Take group and other bits off one path we own; True if it had any."""
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return False
    os.chmod(path, mode & ~0o077, follow_symlinks=False)
    return True


def tighten_home(home: str | os.PathLike, warn: Callable[[str], None] | None = None) -> None:
    """Make a home private: the home 0700, p2pfs's files in it 0600.

    Only what p2pfs writes is touched, never a user's other files if the
    home is a directory they also use (secret key files neither: they are
    checked where they are read).  The home directory itself is tightened
    if this user owns it and it is not a shared sticky directory like /tmp.
    `warn` hears one line if a store that existed was readable by others, or
    a line saying what could not be changed.  Once per home per process."""
    home = os.path.abspath(home)
    if home in _tightened:
        return
    _tightened.add(home)
    try:
        top = os.stat(home)
    except OSError:
        return  # not there yet: created private by the Store
    is_ours = os.path.exists(os.path.join(home, "store", "data.mdb"))
    exposed = False
    try:
        if top.st_uid == os.geteuid() and not top.st_mode & stat.S_ISVTX:
            exposed = _tighten(home, top) and is_ours
        paths = [os.path.join(home, name) for name in _HOME_FILES]
        for name in _HOME_DIRS:
            d = os.path.join(home, name)
            paths.append(d)
            if name != "keys" and os.path.isdir(d) and not os.path.islink(d):
                paths.extend(os.path.join(d, n) for n in os.listdir(d))
        for path in paths:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                exposed |= _tighten(path, st)
    except OSError as exc:
        if warn is not None:
            warn(f"p2pfs: warning: cannot make the home {home} private "
                 f"({exc.strerror}); other users may read it")
        return
    if exposed and warn is not None:
        warn(f"p2pfs: the home {home} was readable by other users; made it private "
             "(directories 0700, files 0600)")


# --- LMDB errors -----------------------------------------------------------------------

_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
           lmdb.PanicError, lmdb.VersionMismatchError)


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _disk_full(home) -> DiskFullError:
    try:
        free = free_bytes(home)
    except OSError:
        free = None
    return DiskFullError(home, free)


def _os_error(home, exc: OSError, what: str) -> StoreError:
    """`what` failed writing into the home: the full-disk message for ENOSPC."""
    if exc.errno == errno.ENOSPC:
        return _disk_full(home)
    return StoreError(f"{what}: {exc.strerror}")


def _store_error(home, exc: lmdb.Error) -> StoreError:
    """The user's view of an LMDB error."""
    if isinstance(exc, (lmdb.DiskError, lmdb.MapFullError)):
        return _disk_full(home)
    if "Input/output error" in str(exc):
        # LMDB reports a short write (the usual way a disk fills up) as EIO
        try:
            if free_bytes(home) < 2 * WRITE_BATCH_BYTES:
                return _disk_full(home)
        except OSError:
            pass
    if isinstance(exc, _DAMAGE):
        return StoreDamagedError(home, str(exc))
    return StoreError(f"cannot use the store in {home}: {exc}")


def _guard(fn):
    """A Store method whose LMDB errors become StoreError (one line, naming the home)."""
    @functools.wraps(fn)
    def guarded(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except lmdb.Error as exc:
            raise _store_error(self.home, exc) from None
    return guarded


def _guard_iter(fn):
    """`_guard` for a Store method that is a generator."""
    @functools.wraps(fn)
    def guarded(self, *args, **kwargs):
        try:
            yield from fn(self, *args, **kwargs)
        except lmdb.Error as exc:
            raise _store_error(self.home, exc) from None
    return guarded


# --- the data file before it is mapped ---------------------------------------------------

# LMDB 0.9 on a 64-bit host (the layout py-lmdb's verifier documents): a page
# header of 16 bytes (u16 flags at 10), then the meta record: magic, data
# version, address, map size, the free and main DB records (48 bytes each,
# the free DB's first u32 is the page size, the root page number last) and
# the last page number and transaction id.
_META_MAGIC = 0xBEEFC0DE
_P_META = 0x08
_P_INVALID = (1 << 64) - 1
_META = struct.Struct("=10xH4xII16xI36xQ40xQQQ")


def _parse_meta(page: bytes):
    """(page size, free root, main root, last page, txn id), or None if it is no meta page."""
    if len(page) < _META.size:
        return None
    flags, magic, version, psize, free_root, main_root, last_pg, txnid = _META.unpack_from(page)
    if not flags & _P_META or magic != _META_MAGIC or version != 1:
        return None
    return psize, free_root, main_root, last_pg, txnid


def check_data_file(path: str | os.PathLike) -> str | None:
    """What makes an LMDB data file unsafe to map, or None.

    LMDB maps the file and trusts the meta page it picks (the one with the
    higher transaction id): a file shorter than that meta's last page, or a
    root page number past it, would be read through the map past the end of
    the file, which kills the process with SIGBUS.  Those are reported here.
    Anything LMDB itself reports as an error (a bad magic number, a wrong
    page type) is left to it.  Reads the meta pages first and the size after,
    so a writer growing the file meanwhile is never mistaken for damage."""
    try:
        with open(path, "rb") as f:
            first = f.read(4096)
            if not first:
                return None  # a new environment
            meta0 = _parse_meta(first)
            if meta0 is None:
                return None  # LMDB reports it: "not an LMDB file" / version mismatch
            psize = meta0[0]
            if psize < 512 or psize > 65536 or psize & (psize - 1):
                return f"data.mdb has a meta page with a page size of {psize}"
            f.seek(psize)
            meta1 = _parse_meta(f.read(psize))
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None  # a new environment
    except OSError as exc:
        return f"data.mdb cannot be read ({exc.strerror})"
    if meta1 is None:
        return "data.mdb has no second meta page (the file is cut short or overwritten)"
    if meta1[0] != psize:
        return f"data.mdb's meta pages disagree on the page size ({psize}, {meta1[0]})"
    meta = meta1 if meta1[4] > meta0[4] else meta0
    _, free_root, main_root, last_pg, txnid = meta
    needed = (last_pg + 1) * psize
    if needed > size:
        return (f"data.mdb is {size} bytes but its last transaction ({txnid}) needs "
                f"{needed} (the file was cut short or its meta page is damaged)")
    for root in (free_root, main_root):
        if root != _P_INVALID and root > last_pg:
            return f"data.mdb's meta page points at page {root}, past its last page {last_pg}"
    return None


def check_structure(home: str | os.PathLike) -> list[str]:
    """Every page of the home's LMDB file walked (py-lmdb's offline verifier,
    which never maps the file): the problems found, each one line."""
    import lmdb.verify

    path = os.path.join(os.path.abspath(home), "store")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return []
    try:
        return [f"data.mdb: {p}" for p in lmdb.verify.verify(path, subdir=True)]
    except lmdb.verify.VerifyError as exc:
        return [f"data.mdb: {exc}"]
    except OSError as exc:
        return [f"data.mdb cannot be read ({exc.strerror})"]


# LMDB allows one open environment per file per process: Store handles of
# one home in one process share it (reference counted).
_envs: dict[str, list] = {}
_envs_lock = threading.Lock()
_DB_NAMES = (b"blocks", b"nodes", b"heads", b"forks", b"drives", b"held",
             b"lastread", b"lru", b"cached")


# LMDB 0.9's lock file: a 128-byte header and a reader table, each entry a
# 64-byte cache line (what LMDB itself sizes it to for MAX_READERS).
LOCK_FILE_BYTES = 2 * 64 + MAX_READERS * 64


def _reserve_lock_file(path: str) -> None:
    """Allocate the lock file's blocks before LMDB maps it.

    LMDB writes reader slots through a shared map of the lock file; a slot in
    a hole of a sparse file, on a full disk, is SIGBUS rather than an error.
    Raises OSError (ENOSPC on a full disk)."""
    fd = open_private(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, LOCK_FILE_BYTES)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def _acquire_env(path: str, home: Path):
    with _envs_lock:
        got = _envs.get(path)
        if got is not None:
            got[2] += 1
            return got[0], got[1]
        try:
            make_private_dir(home)
            make_private_dir(path)
            _reserve_lock_file(os.path.join(path, "lock.mdb"))
        except OSError as exc:
            raise _os_error(home, exc, f"cannot open the store in {path}") from None
        problem = check_data_file(os.path.join(path, "data.mdb"))
        if problem is not None:
            raise StoreDamagedError(home, problem)
        try:
            env = lmdb.open(
                path,
                map_size=MAP_SIZE,
                max_dbs=16,
                max_readers=MAX_READERS,
                lock=True,
                sync=SYNC_EACH_COMMIT,  # see the module docstring
                metasync=False,
                readahead=True,  # without it a cold 64 KiB block faults in as 16 single-page reads: 10x slower
                subdir=True,
                mode=PRIVATE_DIR_MODE,  # LMDB creates its files with this & ~0o111: 0600
            )
        except OSError as exc:
            raise StoreError(f"cannot open the store in {path}: {exc.strerror}") from None
        except lmdb.Error as exc:
            raise _store_error(home, exc) from None
        try:
            dbs = tuple(env.open_db(name) for name in _DB_NAMES)
        except lmdb.Error as exc:
            env.close()
            raise _store_error(home, exc) from None
        _envs[path] = [env, dbs, 1]
        return env, dbs


def _release_env(path: str) -> None:
    with _envs_lock:
        got = _envs[path]
        got[2] -= 1
        if got[2] == 0:
            del _envs[path]
            got[0].close()


def _command_line() -> str:
    """This process as a person would have typed it (for lock files)."""
    args = " ".join(sys.argv[1:])
    return f"p2pfs {args}"[:MAX_HOLDER] if args else "p2pfs"


MAX_HOLDER = 300  # bytes of a lock holder's description read back


def _lock_holder(fd: int) -> str:
    """"pid N: what" of the process holding a writer lock, from its lock file
    ("" if it wrote nothing readable)."""
    try:
        raw = os.pread(fd, MAX_HOLDER + 32, 0)
    except OSError:
        return ""
    pid, _, what = raw.decode(errors="replace").strip().partition(" ")
    if not pid.isdigit():
        return ""
    what = "".join(c if c.isprintable() else "?" for c in what)
    return f"pid {pid}: {what}" if what else f"pid {pid}"


class Store:
    """A node's LMDB environment plus its key directory.

    Several Store objects for one home in one process share one environment.
    `warn` hears a line if an existing home had to be made private.

    Raises StoreError when the home cannot be opened or written (every
    method: StoreDamagedError for a damaged file, a full-disk message).
    """

    def __init__(self, home: str | os.PathLike, warn: Callable[[str], None] | None = None):
        self.home = Path(os.path.abspath(home))
        self.keys_dir = self.home / "keys"
        self._path = os.path.realpath(self.home / "store")
        self._closed = False
        tighten_home(self.home, warn)
        self.env, dbs = _acquire_env(self._path, self.home)
        (self._blocks, self._nodes, self._heads, self._forks, self._drives,
         self._held, self._lastread, self._lru, self._cached) = dbs

    def close(self) -> None:
        """Release this handle; the environment closes with its last handle."""
        if not self._closed:
            self._closed = True
            _release_env(self._path)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self):
        return self.env.begin(write=True, buffers=True)

    @_guard
    def sync(self) -> None:
        """Flush every committed transaction to disk."""
        self.env.sync(True)

    def free_bytes(self) -> int:
        """Bytes still free for the store on its disk (0 if it cannot be told)."""
        try:
            return free_bytes(self._path)
        except OSError:
            return 0

    @_guard
    def check_structure(self) -> list[str]:
        """`check_structure` of this home, inside a read transaction so that
        writers in other processes cannot reuse the pages being walked."""
        with self.env.begin():
            return check_structure(self.home)

    # --- drives -------------------------------------------------------------

    @_guard
    def get_drive(self, key: bytes) -> DriveRecord | None:
        with self.env.begin(db=self._drives) as txn:
            raw = txn.get(key)
        return None if raw is None else _record_decoder.decode(raw)

    @_guard
    def list_drives(self) -> list[tuple[bytes, DriveRecord]]:
        with self.env.begin(db=self._drives) as txn:
            return [(bytes(k), _record_decoder.decode(v)) for k, v in txn.cursor()]

    @_guard
    def set_pins(self, key: bytes, *, pinned: bool | None = None,
                 paths: Iterable[bytes] | None = None) -> DriveRecord:
        """Change whether a drive is pinned whole and which of its folders are
        pinned (the drive must be known: LookupError if not).  Returns the new record.
        Blocks of a drive pinned whole leave the cache bookkeeping at once."""
        with self._write() as txn:
            raw = txn.get(key, db=self._drives)
            if raw is None:
                raise LookupError("unknown drive")
            record = _record_decoder.decode(raw)
            record = msgspec.structs.replace(
                record, pinned=record.pinned if pinned is None else pinned,
                paths=record.paths if paths is None else tuple(sorted(set(paths))))
            txn.put(key, _record_encoder.encode(record), db=self._drives)
        if record.kept:
            while self.untrack_blocks(key, None):
                pass
        return record

    # --- blocks -------------------------------------------------------------

    @_guard
    def get_block(self, key: bytes, index: int) -> bytes | None:
        with self.env.begin(db=self._blocks) as txn:
            return txn.get(_bk(key, index))

    @_guard
    def get_blocks(self, key: bytes, indices: Iterable[int]) -> list[bytes | None]:
        """Several blocks in one read transaction (None where not held)."""
        with self.env.begin(db=self._blocks) as txn:
            get = txn.get
            return [get(key + _U64.pack(i)) for i in indices]

    @_guard
    def with_blocks(self, key: bytes, indices: Iterable[int], fn):
        """Call fn(list of zero-copy buffers or None) inside one read transaction
        and return its result; the buffers are valid only during the call."""
        with self.env.begin(db=self._blocks, buffers=True) as txn:
            get = txn.get
            return fn([get(key + _U64.pack(i)) for i in indices])

    @_guard
    def has_block(self, key: bytes, index: int) -> bool:
        with self.env.begin(db=self._blocks, buffers=True) as txn:
            return txn.get(_bk(key, index)) is not None

    @_guard
    def put_blocks(self, key: bytes, first: int, blocks: Iterable[bytes]) -> None:
        """Store blocks first, first+1, ... (unsigned until commit_version)."""
        _check_key(key)
        with self._write() as txn:
            self._put_blocks(txn, key, enumerate(blocks, first))

    @_guard
    def put_block_items(self, key: bytes, items: Iterable[tuple[int, bytes]],
                        nodes: Iterable[Node] = (),
                        touches: tuple[Iterable[int], int] | None = None) -> None:
        """Store (index, data) blocks and verified tree nodes in one
        transaction; with `touches` (blocks, tick), also `touch_blocks` them
        in it (a cold read's bookkeeping rides on its block writes: one
        commit, one flush to disk, instead of two)."""
        _check_key(key)
        with self._write() as txn:
            self._put_blocks(txn, key, items)
            self._put_nodes(txn, key, nodes)
            if touches is not None:
                self._touch(txn, key, *touches)

    def _put_blocks(self, txn, key: bytes, items: Iterable[tuple[int, bytes]]) -> None:
        # existence is checked with zero-copy gets, then one putmulti: several
        # times faster than txn.replace for 64 KiB values
        pairs = [(key + _U64.pack(index), data) for index, data in items]
        if not pairs:
            return
        get = txn.get
        count = len(pairs)
        nbytes = 0
        for k, data in pairs:
            old = get(k, db=self._blocks)
            if old is None:
                nbytes += len(data)
            else:
                count -= 1
                nbytes += len(data) - len(old)
        txn.cursor(db=self._blocks).putmulti(pairs, overwrite=True)
        if count or nbytes:
            self._add_held(txn, key, count, nbytes)

    def _add_held(self, txn, key: bytes, count: int, nbytes: int) -> None:
        self._add_counter(txn, self._held, key, count, nbytes)

    @_guard
    def held(self, key: bytes) -> tuple[int, int]:
        """(blocks held, bytes held) for a drive: one read."""
        with self.env.begin() as txn:
            return self._counter(txn, self._held, key)

    @_guard_iter
    def block_indices(self, key: bytes, start: int = 0) -> Iterator[int]:
        """Indices of held blocks >= start, ascending (one read transaction)."""
        with self.env.begin(db=self._blocks, buffers=True) as txn:
            cur = txn.cursor()
            if not cur.set_range(_bk(key, start)):
                return
            for k in cur.iternext(keys=True, values=False):
                k = bytes(k)
                if k[:KEY_BYTES] != key:
                    return
                yield _U64.unpack_from(k, KEY_BYTES)[0]

    def held_ranges(self, key: bytes) -> list[tuple[int, int]]:
        """Held blocks as sorted (start, end) ranges, end exclusive."""
        ranges: list[list[int]] = []
        for i in self.block_indices(key):
            if ranges and ranges[-1][1] == i:
                ranges[-1][1] = i + 1
            else:
                ranges.append([i, i + 1])
        return [(a, b) for a, b in ranges]

    @_guard_iter
    def iter_blocks(self, key: bytes, start: int = 0, end: int | None = None,
                    ) -> Iterator[tuple[int, memoryview]]:
        """(index, data) for held blocks in [start, end); zero-copy buffers
        valid until the next iteration step.  One read transaction."""
        with self.env.begin(db=self._blocks, buffers=True) as txn:
            cur = txn.cursor()
            if not cur.set_range(_bk(key, start)):
                return
            for k, v in cur:
                if bytes(k[:KEY_BYTES]) != key:
                    return
                i = _U64.unpack_from(k, KEY_BYTES)[0]
                if end is not None and i >= end:
                    return
                yield i, v

    @contextmanager
    def writer_lock(self, key: bytes, what: str = "a drive", holder: str | None = None):
        """Hold the exclusive right to append to a drive's log (a flock on
        locks/<key hex>.lock, released when the process dies).

        The holder writes its pid and `holder` (default: this process's
        command line) into the lock file, so that a refused writer can name
        it.  Raises StoreError at once if another process holds it."""
        path = self.home / "locks" / f"{key.hex()}.lock"
        try:
            make_private_dir(path.parent)
            fd = open_private(path, os.O_RDWR)
        except OSError as exc:
            raise _os_error(self.home, exc, f"cannot create lock file {path}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _lock_holder(fd)
                raise StoreError(f"another p2pfs process is writing {what}"
                                 f"{f' ({other})' if other else ''}; "
                                 "try again when it has finished") from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {holder or _command_line()}\n".encode(), 0)
            except OSError:
                pass  # only a name for messages
            yield
        finally:
            os.close(fd)

    @_guard
    def orphan_keys(self) -> list[bytes]:
        """Keys with blocks but no signed head: creates that were interrupted
        (or are running now; callers check `writer_lock`)."""
        out = []
        with self.env.begin(buffers=True) as txn:
            cur = txn.cursor(db=self._blocks)
            heads = txn.cursor(db=self._heads)
            ok = cur.first()
            while ok:
                key = bytes(cur.key()[:KEY_BYTES])
                if not (heads.set_range(key) and bytes(heads.key()[:KEY_BYTES]) == key):
                    out.append(key)
                ok = cur.set_range(key + b"\xff" * 8) and (
                    bytes(cur.key()[:KEY_BYTES]) != key or cur.next())
        return out

    @_guard
    def discard_blocks_from(self, key: bytes, length: int) -> int:
        """Delete blocks >= length (an interrupted write's garbage).  Returns how many."""
        doomed = list(self.block_indices(key, length))
        if not doomed:
            return 0
        with self._write() as txn:
            count = nbytes = 0
            for i in doomed:
                old = txn.pop(_bk(key, i), db=self._blocks)
                if old is not None:
                    count += 1
                    nbytes += len(old)
            self._add_held(txn, key, -count, -nbytes)
        return count

    # --- the cache's bookkeeping (see the module docstring) ------------------

    @_guard
    def touch_blocks(self, key: bytes, blocks: Iterable[int], tick: int) -> None:
        """Record that held `blocks` were read at `tick` (any increasing
        number, the same clock for every process of the home; the caller's
        time in ms).  Blocks not held are skipped.  One transaction."""
        _check_key(key)
        with self._write() as txn:
            self._touch(txn, key, blocks, tick)

    def _touch(self, txn, key: bytes, blocks: Iterable[int], tick: int) -> None:
        get, put, delete = txn.get, txn.put, txn.delete
        count = nbytes = 0
        new = _TICK.pack(tick)
        for b in blocks:
            k = key + _U64.pack(b)
            data = get(k, db=self._blocks)
            if data is None:
                continue
            old = get(k, db=self._lastread)
            if old is not None:
                old_tick, _size = _LAST.unpack(old)
                if old_tick >= tick:
                    continue
                delete(bytes(old[:8]) + k, db=self._lru)
            else:
                count += 1
                nbytes += len(data)
            put(k, _LAST.pack(tick, len(data)), db=self._lastread)
            put(new + k, b"", db=self._lru)
        if count:
            self._add_counter(txn, self._cached, key, count, nbytes)

    @_guard
    def untrack_blocks(self, key: bytes, blocks: Iterable[int] | None) -> int:
        """Take blocks out of the cache's bookkeeping (they are kept: pinned);
        None: up to EVICT_BATCH of the drive's.  Returns how many were taken
        out (call again while it returns EVICT_BATCH with None)."""
        with self._write() as txn:
            if blocks is None:
                cur = txn.cursor(db=self._lastread)
                ks = []
                if cur.set_range(key):
                    for k in cur.iternext(keys=True, values=False):
                        if k[:KEY_BYTES] != key or len(ks) >= EVICT_BATCH:
                            break
                        ks.append(bytes(k))
            else:
                ks = [key + _U64.pack(b) for b in blocks]
            count = nbytes = 0
            for k in ks:
                old = txn.pop(k, db=self._lastread)
                if old is None:
                    continue
                tick, size = _LAST.unpack(old)
                txn.delete(_TICK.pack(tick) + k, db=self._lru)
                count += 1
                nbytes += size
            if count:
                self._add_counter(txn, self._cached, key, -count, -nbytes)
        return count

    @_guard
    def cached(self, key: bytes) -> tuple[int, int]:
        """(blocks, bytes) of a drive in the cache's bookkeeping (evictable)."""
        with self.env.begin() as txn:
            return self._counter(txn, self._cached, key)

    @_guard
    def cache_usage(self) -> tuple[int, int]:
        """(blocks, bytes) in the cache's bookkeeping, every drive together."""
        blocks = nbytes = 0
        with self.env.begin(db=self._cached) as txn:
            for _k, v in txn.cursor():
                b, n = _HELD.unpack(v)
                blocks += b
                nbytes += n
        return blocks, nbytes

    @_guard
    def evict(self, nbytes: int, keep=None) -> tuple[int, int]:
        """Delete the least recently read blocks until `nbytes` are freed (at
        most EVICT_BATCH blocks: call again for more).  `keep(key, block)`
        -> True spares a block and takes it out of the bookkeeping (pinned
        meanwhile).  Returns (blocks, bytes) freed.  One transaction."""
        freed = freed_bytes = 0
        seen = 0
        with self._write() as txn:
            cur = txn.cursor(db=self._lru)
            counts: dict[bytes, list[int]] = {}
            held: dict[bytes, list[int]] = {}
            if not cur.first():
                return 0, 0
            while freed_bytes < nbytes and seen < EVICT_BATCH:
                lk = bytes(cur.key())
                k = lk[8:]
                key, block = k[:KEY_BYTES], _U64.unpack_from(k, KEY_BYTES)[0]
                seen += 1
                old = txn.pop(k, db=self._lastread)
                size = _LAST.unpack(old)[1] if old is not None else 0
                c = counts.setdefault(key, [0, 0])
                c[0] -= 1
                c[1] -= size
                if keep is None or not keep(key, block):
                    data = txn.pop(k, db=self._blocks)
                    if data is not None:
                        h = held.setdefault(key, [0, 0])
                        h[0] -= 1
                        h[1] -= len(data)
                        freed += 1
                        freed_bytes += len(data)
                if not cur.delete() or not cur.key():  # delete moves to the next record
                    break
            for key, (b, n) in counts.items():
                self._add_counter(txn, self._cached, key, b, n)
            for key, (b, n) in held.items():
                self._add_counter(txn, self._held, key, b, n)
        return freed, freed_bytes

    @_guard
    def settle(self) -> None:
        """Commit a transaction that changes nothing (a drive record put
        again as it is).  LMDB reuses the pages a commit freed only from the
        commit after the next one: after an eviction this lets the next
        write reuse the evicted blocks' pages, where it would otherwise grow
        the file by its own size."""
        with self._write() as txn:
            cur = txn.cursor(db=self._drives)
            if cur.first():  # evicted blocks are a known drive's: there is a record
                txn.put(bytes(cur.key()), bytes(cur.value()), db=self._drives)

    @staticmethod
    def _counter(txn, db, key: bytes) -> tuple[int, int]:
        """A drive's (blocks, bytes) counter in `db` (held or cached); (0, 0) if none."""
        raw = txn.get(key, db=db)
        return _HELD.unpack(raw) if raw is not None else (0, 0)

    def _add_counter(self, txn, db, key: bytes, count: int, nbytes: int) -> None:
        blocks, size = self._counter(txn, db, key)
        blocks, size = max(0, blocks + count), max(0, size + nbytes)
        if blocks or size:
            txn.put(key, _HELD.pack(blocks, size), db=db)
        else:
            txn.delete(key, db=db)  # none left: no record (a no-op if there was none)

    @_guard
    def forget_some(self, key: bytes) -> int:
        """Delete up to EVICT_BATCH of a drive's blocks and tree nodes (with
        their accounting): the first steps of forgetting it.  Returns how many
        records went; 0 when none are left (then call `forget_drive`)."""
        _check_key(key)
        gone = 0
        held = [0, 0]
        cached = [0, 0]
        with self._write() as txn:
            for db in (self._blocks, self._nodes):
                cur = txn.cursor(db=db)
                if not cur.set_range(key):
                    continue
                while gone < EVICT_BATCH and cur.key() and bytes(cur.key()[:KEY_BYTES]) == key:
                    k = bytes(cur.key())
                    if db is self._blocks:
                        held[0] -= 1
                        held[1] -= len(cur.value())
                        old = txn.pop(k, db=self._lastread)
                        if old is not None:
                            txn.delete(bytes(old[:8]) + k, db=self._lru)
                            cached[0] -= 1
                            cached[1] -= _LAST.unpack(old)[1]
                    gone += 1
                    if not cur.delete():
                        break
            self._add_counter(txn, self._held, key, *held)
            self._add_counter(txn, self._cached, key, *cached)
        return gone

    @_guard
    def forget_drive(self, key: bytes) -> None:
        """The last step of forgetting a drive (after `forget_some` returned
        0): its heads, fork evidence, record and counters.  One transaction."""
        _check_key(key)
        with self._write() as txn:
            for db in (self._heads, self._forks):
                cur = txn.cursor(db=db)
                if cur.set_range(key):
                    while cur.key() and bytes(cur.key()[:KEY_BYTES]) == key:
                        if not cur.delete():
                            break
            for db in (self._drives, self._held, self._cached):
                txn.delete(key, db=db)

    # --- tree nodes ---------------------------------------------------------

    @_guard
    def get_node(self, key: bytes, index: int) -> Node | None:
        with self.env.begin(db=self._nodes) as txn:
            raw = txn.get(_bk(key, index))
        if raw is None:
            return None
        return Node(index, raw[:HASH_BYTES], _NODE.unpack_from(raw, HASH_BYTES)[0])

    @_guard
    def get_nodes(self, key: bytes, indices: Iterable[int]) -> list[Node | None]:
        out: list[Node | None] = []
        with self.env.begin(db=self._nodes) as txn:
            get = txn.get
            for i in indices:
                raw = get(key + _U64.pack(i))
                out.append(None if raw is None else
                           Node(i, raw[:HASH_BYTES], _NODE.unpack_from(raw, HASH_BYTES)[0]))
        return out

    @_guard
    def node_range(self, key: bytes, lo: int, hi: int) -> dict[int, Node]:
        """Stored nodes with lo <= index < hi (one cursor scan)."""
        out: dict[int, Node] = {}
        end = key + _U64.pack(hi)
        with self.env.begin(db=self._nodes) as txn:
            cur = txn.cursor()
            if not cur.set_range(key + _U64.pack(lo)):
                return out
            for k, raw in cur:
                if k >= end:
                    break
                i = _U64.unpack_from(k, KEY_BYTES)[0]
                out[i] = Node(i, raw[:HASH_BYTES], _NODE.unpack_from(raw, HASH_BYTES)[0])
        return out

    @_guard_iter
    def iter_nodes(self, key: bytes) -> Iterator[Node]:
        with self.env.begin(db=self._nodes) as txn:
            cur = txn.cursor()
            if not cur.set_range(key):
                return
            for k, raw in cur:
                if k[:KEY_BYTES] != key:
                    return
                yield Node(_U64.unpack_from(k, KEY_BYTES)[0], raw[:HASH_BYTES],
                           _NODE.unpack_from(raw, HASH_BYTES)[0])

    @_guard
    def put_nodes(self, key: bytes, nodes: Iterable[Node]) -> None:
        with self._write() as txn:
            self._put_nodes(txn, key, nodes)

    def _put_nodes(self, txn, key: bytes, nodes: Iterable[Node]) -> None:
        db = self._nodes
        for n in nodes:
            txn.put(key + _U64.pack(n.index), n.hash + _NODE.pack(n.size), db=db)

    # --- heads and forks ----------------------------------------------------

    @_guard
    def latest_head(self, key: bytes) -> Head | None:
        with self.env.begin(db=self._heads) as txn:
            cur = txn.cursor()
            # the last record with this prefix: position after it, step back
            if cur.set_range(key + b"\xff" * 8):
                if cur.key()[:KEY_BYTES] == key:
                    return self._head(cur.key(), cur.value())
                if not cur.prev():
                    return None
            elif not cur.last():
                return None
            if cur.key()[:KEY_BYTES] != key:
                return None
            return self._head(cur.key(), cur.value())

    @staticmethod
    def _head(k: bytes, v: bytes) -> Head:
        return Head(_U64.unpack_from(k, KEY_BYTES)[0], bytes(v[:HASH_BYTES]), bytes(v[HASH_BYTES:_SIGNED]))

    @_guard
    def get_head(self, key: bytes, length: int) -> Head | None:
        with self.env.begin(db=self._heads) as txn:
            raw = txn.get(_bk(key, length))
        return None if raw is None else Head(length, raw[:HASH_BYTES], raw[HASH_BYTES:_SIGNED])

    @_guard
    def dht_signature(self, key: bytes, length: int) -> bytes:
        """The owner's BEP 44 signature of the head of `length` (its DHT item),
        if this home has it (b"" if not)."""
        with self.env.begin(db=self._heads) as txn:
            raw = txn.get(_bk(key, length))
        return b"" if raw is None else bytes(raw[_SIGNED:_SIGNED + SIGNATURE_BYTES])

    @_guard
    def put_dht_signature(self, key: bytes, length: int, signature: bytes) -> None:
        """Keep the (verified) DHT signature of a head already held."""
        if len(signature) != SIGNATURE_BYTES:
            raise ValueError("a DHT signature is 64 bytes")
        with self._write() as txn:
            raw = txn.get(_bk(key, length), db=self._heads)
            if raw is not None:
                txn.put(_bk(key, length), bytes(raw[:_SIGNED]) + signature, db=self._heads)

    @_guard
    def heads(self, key: bytes) -> list[Head]:
        """Every signed head held, by length ascending."""
        out = []
        with self.env.begin(db=self._heads) as txn:
            cur = txn.cursor()
            if cur.set_range(key):
                for k, v in cur:
                    if k[:KEY_BYTES] != key:
                        break
                    out.append(self._head(k, v))
        return out

    @_guard
    def put_head(self, key: bytes, head: Head, nodes: Iterable[Node] = ()) -> None:
        """Store a verified signed head (and nodes it makes trusted) in one transaction."""
        _check_key(key)
        with self._write() as txn:
            self._put_nodes(txn, key, nodes)
            txn.put(_bk(key, head.length), head.root + head.signature, db=self._heads)
            if txn.get(key, db=self._drives) is None:
                txn.put(key, _record_encoder.encode(DriveRecord(pinned=False)), db=self._drives)

    @_guard
    def put_fork(self, key: bytes, head: Head) -> None:
        """Keep a conflicting signed head as evidence."""
        with self._write() as txn:
            txn.put(_bk(key, head.length) + head.root, head.signature, db=self._forks)

    @_guard
    def forks(self, key: bytes) -> list[Head]:
        out = []
        with self.env.begin(db=self._forks) as txn:
            cur = txn.cursor()
            if cur.set_range(key):
                for k, v in cur:
                    if k[:KEY_BYTES] != key:
                        break
                    out.append(Head(_U64.unpack_from(k, KEY_BYTES)[0], k[KEY_BYTES + 8:], v))
        return out

    # --- the final transaction of a version ----------------------------------

    @_guard
    def commit_version(self, key: bytes, head: Head, nodes: Iterable[Node],
                       record: DriveRecord | None = None,
                       blocks: Iterable[tuple[int, bytes]] = (), dht_signature: bytes = b"") -> None:
        """Write the last blocks, tree nodes, signed head and drive record of a
        version in one transaction, then flush to disk.  Before this returns
        the version does not exist; after, it is durable."""
        _check_key(key)
        with self._write() as txn:
            self._put_blocks(txn, key, blocks)
            self._put_nodes(txn, key, nodes)
            txn.put(_bk(key, head.length), head.root + head.signature + dht_signature, db=self._heads)
            if record is not None or txn.get(key, db=self._drives) is None:
                txn.put(key, _record_encoder.encode(record or DriveRecord()), db=self._drives)
        self.sync()

    # --- secret keys ----------------------------------------------------------

    def key_path(self, key_text: str) -> Path:
        return self.keys_dir / f"{key_text}.key"

    def save_secret(self, key_text: str, seed: bytes) -> Path:
        """Write a drive's secret seed to keys/<key>.key, mode 0600, durably."""
        if len(seed) != 32:
            raise ValueError("secret seed must be 32 bytes")
        path = self.key_path(key_text)
        try:
            make_private_dir(self.keys_dir)
            write_key_file(path, seed)
        except OSError as exc:
            raise _os_error(self.home, exc,
                            f"cannot write the secret key file in {self.keys_dir}") from None
        return path

    def load_secret(self, key_text: str) -> bytes | None:
        """The secret seed of a drive, or None if this node does not hold it.

        Raises KeyFileError if the file is readable by group or others, or malformed.
        """
        return read_key_file(self.key_path(key_text), "secret key file")


# --- key files -------------------------------------------------------------------

def write_key_file(path: Path, secret: bytes, *, keep_existing: bool = False) -> None:
    """Write `secret` as hex to `path`, mode 0600, fsynced, atomically.

    With keep_existing, a file another process wrote first wins.  Raises OSError."""
    write_private_file(path, secret.hex().encode() + b"\n", keep_existing=keep_existing)


def write_private_file(path: Path, data: bytes, *, keep_existing: bool = False,
                       durable: bool = True) -> None:
    """Write `data` to `path`, mode 0600, fsynced, atomically (a reader sees the old
    file or the new one, whole).  With keep_existing, a file another process wrote
    first wins.  Without `durable`, no fsync (a report rewritten every second:
    a crash may lose its last state, never leave half of it).  Raises OSError."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes never share one
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if not keep_existing:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    os.unlink(tmp)


def read_key_file(path: Path, what: str, size: int = 32) -> bytes | None:
    """The secret in a key file (64 hex digits), or None if there is none.

    Raises KeyFileError, naming `what` and `path`, if the file is accessible
    by group or others (with the chmod that fixes it), unreadable or malformed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{what} {path} is accessible by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); fix it with: chmod 600 {path}"
            )
        raw = os.read(fd, 200)
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) != size:
        raise KeyFileError(f"{what} {path} is malformed (expected {2 * size} hex digits)")
    return secret


# --- a writable mount's staging area ----------------------------------------------------

STAGING_DIR = "staging"
_FID_BLOCK = struct.Struct(">QQ")


class Staging:
    """Where a writable mount keeps what is written before it is committed:
    one LMDB environment per drive, HOME/staging/<key hex>/, used only by the
    process holding the drive's writer lock.

    Sub-databases: `blocks` (u64be file id || u64be block number -> the
    block's bytes, possibly shorter than the drive's block size: the rest
    reads as zeros) and `files` (u64be file id -> empty: a mark that the file
    has staged changes, so that one truncated to nothing counts in `stats`).

    Its transactions are not flushed to disk one by one (MDB_NOSYNC): a
    killed process loses nothing that reached the kernel, and a version is
    durable only once committed to the store (`Store.commit_version`, which
    flushes).  An operating-system crash may damage this environment, never
    the store: a staging area left behind is only ever read back to be
    reported and deleted (`open_fresh`).  Every method is one transaction;
    errors are StoreError naming the home."""

    def __init__(self, home: Path, key: bytes):
        self.home = Path(home)
        self.path = self.home / STAGING_DIR / key.hex()
        try:
            make_private_dir(self.path)
            self.env = lmdb.open(str(self.path), map_size=MAP_SIZE, max_dbs=4, sync=False,
                                 metasync=False, subdir=True, readahead=False,
                                 mode=PRIVATE_DIR_MODE)
            self._blocks = self.env.open_db(b"blocks")
            self._files = self.env.open_db(b"files")
        except OSError as exc:
            raise _os_error(self.home, exc, f"cannot open the staging area {self.path}") from None
        except lmdb.Error as exc:
            raise _store_error(self.home, exc) from None

    @classmethod
    def open_fresh(cls, home: str | os.PathLike, key: bytes,
                   ) -> tuple["Staging", tuple[int, int, int] | None]:
        """An empty staging area for `key` (the caller holds the writer lock),
        and what a killed writer had left in it: (files, blocks, bytes) of
        staged changes never committed, or None.  A left-over area that cannot
        be read (damaged by a crash) counts as (0, 0, 0) and is deleted too."""
        import shutil
        home = Path(os.path.abspath(home))
        path = home / STAGING_DIR / key.hex()
        left = None
        if (path / "data.mdb").exists():
            left = (0, 0, 0)
            if check_data_file(path / "data.mdb") is None:
                try:
                    old = cls(home, key)
                    try:
                        left = old.stats()
                    finally:
                        old.env.close()
                except StoreError:
                    pass
        shutil.rmtree(path, ignore_errors=True)
        return cls(home, key), left

    def close(self, remove: bool = False) -> None:
        """Close; `remove`: delete the area (after a clean unmount: nothing is staged)."""
        import shutil
        self.env.close()
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)

    @_guard
    def put(self, fid: int, blocks: Iterable[tuple[int, bytes]], mark: bool = False) -> None:
        """Stage blocks (number, bytes) of file `fid`, and with `mark` its
        mark, in one transaction."""
        with self.env.begin(write=True, buffers=True) as txn:
            pairs = [(_FID_BLOCK.pack(fid, j), data) for j, data in blocks]
            if pairs:
                txn.cursor(db=self._blocks).putmulti(pairs, overwrite=True)
            if mark:
                txn.put(_U64.pack(fid), b"", db=self._files)

    @_guard
    def get(self, fid: int, block: int) -> bytes | None:
        with self.env.begin(db=self._blocks) as txn:
            return txn.get(_FID_BLOCK.pack(fid, block))

    @_guard
    def drop(self, fid: int, start: int = 0) -> None:
        """Delete the staged blocks >= start of file `fid` (and, from 0, its mark)."""
        with self.env.begin(write=True, buffers=True) as txn:
            cur = txn.cursor(db=self._blocks)
            if cur.set_range(_FID_BLOCK.pack(fid, start)):
                while bytes(cur.key()[:8]) == _U64.pack(fid):
                    if not cur.delete():
                        break
            if start == 0:
                txn.delete(_U64.pack(fid), db=self._files)

    @_guard
    def stats(self) -> tuple[int, int, int]:
        """(files, blocks, bytes) staged: files with a mark or a block."""
        fids: set[int] = set()
        blocks = nbytes = 0
        with self.env.begin(buffers=True) as txn:
            for k, v in txn.cursor(db=self._blocks):
                fids.add(_FID_BLOCK.unpack(k)[0])
                blocks += 1
                nbytes += len(v)
            for k in txn.cursor(db=self._files).iternext(keys=True, values=False):
                fids.add(_U64.unpack(k)[0])
        return len(fids), blocks, nbytes
