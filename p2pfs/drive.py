"""One drive: open it at a version, read entries and verified bytes, verify it.

Theory of operation
-------------------
*Trust.*  A drive's truth is its signed heads (`crypto.verify_head`).  A tree
node is trusted once it is connected to a signed root: either it is a peak
of a signed head whose stored peaks hash to that head's root, or its
parent is trusted and `parent_node(node, sibling)` reproduces the stored
parent.  Full subtrees never change in an append-only log, so a node trusted
under one head is trusted under every later one.  `Drive._trusted` caches
the nodes verified in this process (index -> Node); everything read from
the local store is checked again, once per process, because the store is a
file anyone could damage.  The one exception: blocks this process itself
fetched, verified with a proof and stored (`note_stored`) are not hashed
again when read back by this process.

*Reading a block.*  Blocks below the latest signed length are served only
after their leaf hash equals the trusted leaf node `2*i`.  A block that is
not held is fetched through the drive's `BlockSource` (the network), which
verifies it with a proof (`accept_block`) and stores it; with no source the
read fails with BlockUnavailableError.  The index (`p2pfs.index`) reads its
blocks through the same check synchronously and raises `MissingBlock`;
async readers catch it, fetch, and retry.

*Views.*  A Drive shows one version (`version`, `length`: the Commit at
block length-1).  `head` is the newest signed head known; the view is opened
from `target`, the newest signed head whose commit is held here or announced
by the source's peers (`_candidates`), so a head whose blocks nobody holds
(an owner's mistake, a stolen key) never makes the versions held unreadable.
Older signed heads a peer announces are kept too (`accept_head`): they are
what a relay holding an older version completely can prove blocks against.
A live view follows the newest readable head on `refresh()`; a fixed view
(`KEY@N`) stays where it was opened.

*Entries are hostile.*  A signature proves who wrote a drive, not that it is
sane.  Decoding bounds every number (`index.Entry`); `check_entry` checks an
entry against the version it belongs to before anyone gets it (a file's
extents cover exactly its size in blocks, inside the log, never block 0; a
link's target is a target) and `sanitized` drops what no reader may be shown
(setuid, setgid and sticky bits; extended attributes outside `user.`, and
p2pfs's own `user.p2pfs.*`).  Listings and walks leave out entries with
invalid names or fields, reporting each once through `warn`; a lookup of a
bad entry raises VerificationError naming drive, version and path.  `read`
checks that every block but a file's last is exactly the header's block size
and the last exactly the remainder (from the trusted leaf node's size,
before reading or fetching, where that node is held), and joins only the
bytes asked for.  A version's root must be a directory.

*Writing* is `p2pfs.publish`: it starts from this view and moves it to
the version it signed (`adopt_own_head`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Callable, Iterable, Iterator, Mapping, Protocol

from . import crypto, flat, index, tree
from .errors import (
    BlockUnavailableError, ForkError, KeyFileError, MissingBlock, NotFoundError,
    ReadOnlyError, UsageError, VerificationError,
)
from .index import Commit, Entry, Header, KIND_DIR, KIND_FILE, KIND_SYMLINK, shown, valid_name
from .store import Store
from .types import Head, Node

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 65536
MIN_BLOCK_SIZE = 4096
# The largest block size `create` accepts: a power of two whose blocks still
# fit one wire Data message (wire.messages.MAX_BLOCK_DATA), so every drive
# made here can be replicated.
MAX_CREATE_BLOCK_SIZE = 1 << 19
TRUST_DEPTH = 6  # leaves are trusted in aligned groups of 2**6 blocks
READ_FETCHES = 3  # a read's fetches that may bring none of its blocks before it fails
TRUSTED_MAX = 1 << 20  # verified nodes cached per Drive (about 32 GiB of 64 KiB blocks)
STORED_MAX = 1 << 20  # blocks remembered as verified and stored by this process
MODE_BITS = 0o777  # what a reader sees of a mode: never setuid, setgid or sticky
MAX_TARGET = 4095  # bytes of a symbolic link's target (Linux PATH_MAX less its NUL)
USER_XATTRS = b"user."
OWN_XATTRS = b"user.p2pfs."  # answered by the mount itself, never taken from a drive
MAX_REPORTED = 1000  # problems reported one by one per Drive; then one line says so
_KIND_NAME = {KIND_FILE: "file", KIND_DIR: "directory", KIND_SYMLINK: "symbolic link"}


def valid_block_size(block_size: int) -> bool:
    """A block size a drive can have: what `create` accepts."""
    return (MIN_BLOCK_SIZE <= block_size <= MAX_CREATE_BLOCK_SIZE
            and not block_size & (block_size - 1))


def entry_problem(entry: Entry, length: int, block_size: int) -> str | None:
    """What makes `entry` nonsense in a version of `length` blocks, or None."""
    if entry.kind == KIND_FILE:
        need = -(-entry.size // block_size)
        have = 0
        for start, count in entry.extents:
            if start == 0:
                return "an extent starts at block 0, the drive's header"
            if start + count > length:
                return (f"an extent ends at block {start + count - 1}, past the end of the "
                        f"version ({length} blocks)")
            have += count
        if have != need:
            return f"its extents hold {have} blocks where {entry.size} bytes need {need}"
        return None
    if entry.extents:
        return f"a {_KIND_NAME[entry.kind]} with content extents"
    if entry.kind == KIND_SYMLINK:
        target = entry.target
        if b"\x00" in target:
            return "a symbolic link target with a NUL byte"
        if not 0 < len(target) <= MAX_TARGET:
            return f"a symbolic link target of {len(target)} bytes (1 to {MAX_TARGET} can be)"
        if entry.size != len(target):
            return f"its size {entry.size} is not its target's length {len(target)}"
    return None


def sanitized(entry: Entry) -> Entry:
    """What a reader is shown of a (checked) entry: its permission bits only
    (no setuid, setgid or sticky bit: like `nosuid`, but for copies too) and
    only its `user.` extended attributes other than p2pfs's own (no ACLs,
    capabilities or security labels), each name once, none on a link."""
    if entry.mode <= MODE_BITS and not entry.xattrs:
        return entry
    kept: dict[bytes, bytes] = {}
    # (Linux keeps user.* attributes on files and directories only)
    for name, value in entry.xattrs if entry.kind != KIND_SYMLINK else ():
        if (name.startswith(USER_XATTRS) and len(name) > len(USER_XATTRS)
                and not name.startswith(OWN_XATTRS) and b"\x00" not in name):
            kept.setdefault(name, value)
    return Entry(entry.kind, entry.mode & MODE_BITS, entry.mtime_ns, entry.size, entry.extents,
                 entry.target, tuple(kept.items()))


def _join(parent: bytes, name: bytes) -> bytes:
    return (b"/" if parent == b"/" else parent + b"/") + name


class BlockSource(Protocol):
    """Where missing blocks come from (implemented by `p2pfs.net`)."""

    async def fetch(self, drive: "Drive", blocks: list[int]) -> None:
        """Return once every listed block is stored (verified); else raise
        BlockUnavailableError."""

    async def fetch_verified(self, drive: "Drive", blocks: list[int]) -> Mapping[int, bytes]:
        """Return once every listed block is stored or verified (against a
        signed head of the drive, with a proof); the bytes of the verified
        ones not yet stored, by block (a read takes them from there, not
        hashed again).  Else raise BlockUnavailableError."""

    async def fetch_path(self, drive: "Drive", path: bytes) -> None:
        """Best effort: fetch every index block on the path in one round trip."""

    def reading(self, drive: "Drive", blocks: list[int]) -> None:
        """A read found every listed block held (no fetch): keep a sequential
        reader's read-ahead ahead of it.  Never waits."""

    async def drain(self, drive: "Drive | None" = None) -> None:
        """Return once every block verified so far (of `drive`; None: of
        every drive) is stored (bounded)."""


class _Reader:
    """index.BlockReader over a drive's verified local blocks."""

    __slots__ = ("drive",)

    def __init__(self, drive: "Drive"):
        self.drive = drive

    def read_block(self, i: int) -> bytes:
        data = self.drive.read_block_local(i)
        if data is None:
            raise MissingBlock(i)
        return data


class Drive:
    """A view of one drive in a store.

    Construct it, then `await open()` (or `open_local()` when every block is
    held).  A drive whose head is not yet known (a remote drive seen for the
    first time) can be constructed too: it has `head is None` until
    `accept_head` adopts the first signed head.
    """

    def __init__(self, store: Store, key: bytes, source: BlockSource | None = None):
        if len(key) != crypto.PUBLIC_KEY_BYTES:
            raise ValueError("drive key must be 32 bytes")
        self.store = store
        self.key = key
        self.key_text = crypto.encode_key(key)
        self.source = source
        # the secret is read (and its file's mode checked) only to write
        self.writable = store.key_path(self.key_text).exists()
        self._trusted: dict[int, Node] = {}
        self._stored: set[int] = set()  # see note_stored
        self._heads_checked: set[tuple[int, bytes]] = set()
        self._subscribers: list[Callable[[Head], None]] = []
        self.head: Head | None = None
        head = store.latest_head(key)
        if head is not None:
            self.check_signature(head)
            self.head = head
        self.target: Head | None = None  # the signed head the view was opened from
        self.target_version = 0  # ... and its version number
        self.block_size = DEFAULT_BLOCK_SIZE
        self.version = 0
        self.length = 0
        self.commit: Commit | None = None
        self.live = True
        self.warn: Callable[[str], None] = log.warning  # problems of the drive's content
        self._reported: set = set()
        self._index: index.Index | None = None
        self.node_cache = index.NodeCache(1024)
        self.reader = _Reader(self)
        self.cache = None  # a cache.Cache: told which content blocks are read (eviction order)

    def __repr__(self) -> str:
        return f"<Drive {self.key_text} v{self.version} length {self.length}>"

    # --- trust ----------------------------------------------------------------

    def check_signature(self, head: Head) -> None:
        ident = (head.length, head.root)
        if ident not in self._heads_checked:
            crypto.verify_head(self.key, head.length, head.root, head.signature)
            self._heads_checked.add(ident)

    def _node_name(self, n: int) -> str:
        if n % 2 == 0:
            return f"block {n // 2}"
        a, b = flat.span(n)
        return f"tree node {n} (blocks {a}-{b - 1})"

    def _trust_peaks(self, head: Head) -> bool:
        """Trust the stored peaks of `head` if they hash to its root.

        False if a peak is not held; VerificationError if they do not match."""
        self.check_signature(head)
        peaks = flat.full_roots(head.length)
        if all(p in self._trusted for p in peaks):
            return True
        nodes = self.store.get_nodes(self.key, peaks)
        if any(n is None for n in nodes):
            return False
        if tree.root_hash(nodes) != head.root:
            raise VerificationError(
                f"drive {self.key_text}: the stored tree peaks of length {head.length} "
                f"do not match its signed root ({', '.join(self._node_name(p) for p in peaks)}); "
                "the store is damaged"
            )
        for n in nodes:
            self._trusted[n.index] = n
        return True

    def trusted_node(self, n: int) -> Node:
        """The stored node `n`, verified up to a signed root (cached).

        Raises VerificationError if it, a sibling or a parent on its path does
        not match, LookupError if a node needed to connect it is not held."""
        got = self._trusted.get(n)
        if got is not None:
            return got
        heads = [self.head] if self.head is not None else []
        last_error: LookupError | None = None
        for head in heads + [h for h in reversed(self.store.heads(self.key))
                             if self.head is None or h.length < self.head.length]:
            if not flat.in_tree(n, head.length):
                continue
            try:
                return self._trusted_under(n, head)
            except LookupError as exc:
                last_error = exc
        raise last_error or LookupError(f"{self._node_name(n)} is not in any signed version held")

    def _under_newest(self, nodes: list[int]) -> bool:
        """Whether every one of `nodes` is held and connects to the newest head."""
        assert self.head is not None
        try:
            return all(self._trusted_under(n, self.head) for n in nodes)
        except (LookupError, VerificationError):
            return False

    def _trusted_under(self, n: int, head: Head) -> Node:
        path = []
        cur = n
        peaks = set(flat.full_roots(head.length))
        while cur not in self._trusted:
            if cur in peaks:
                if not self._trust_peaks(head):
                    raise LookupError(f"a tree peak of length {head.length} is not held")
                break
            path.append(cur)
            cur = flat.parent(cur)
        for c in reversed(path):
            s = flat.sibling(c)
            mine, other = self.store.get_nodes(self.key, [c, s])
            if mine is None or other is None:
                raise LookupError(f"{self._node_name(c if mine is None else s)} is not held")
            left, right = (mine, other) if c < s else (other, mine)
            parent = self._trusted[flat.parent(c)]
            made = tree.parent_node(left, right)
            if made.hash != parent.hash or made.size != parent.size:
                raise VerificationError(
                    f"drive {self.key_text}: {self._node_name(c)} or {self._node_name(s)} "
                    "in the local store does not match the signed tree; the store is damaged "
                    f"(run 'p2pfs verify {self.key_text}')"
                )
            self._trusted[c] = mine
            self._trusted[s] = other
        return self._trusted[n]

    def check_block(self, i: int, data: bytes) -> None:
        """Raise VerificationError unless `data` is block i of the signed tree."""
        try:
            node = self.trusted_node(2 * i)
        except LookupError:
            raise VerificationError(
                f"drive {self.key_text}: block {i} is held but its tree node is not; "
                f"the store is damaged (run 'p2pfs verify {self.key_text}')"
            ) from None
        leaf = tree.leaf_node(i, data)
        if leaf.hash != node.hash or leaf.size != node.size:
            raise VerificationError(
                f"drive {self.key_text}: block {i} in the local store does not match "
                f"its signed hash; the store is damaged (run 'p2pfs verify {self.key_text}')"
            )

    def read_block_local(self, i: int) -> bytes | None:
        """Verified block i, or None if not held (or past the signed length)."""
        if self.head is None or i >= self.head.length:
            return None
        data = self.store.get_block(self.key, i)
        if data is not None:
            self.check_block(i, data)
        return data

    # --- serving peers ----------------------------------------------------------

    def get_block(self, i: int) -> bytes | None:
        """Raw stored block i below the signed length (the receiver verifies)."""
        if self.head is None or i >= self.head.length:
            return None
        return self.store.get_block(self.key, i)

    def make_proof(self, block: int, length: int, siblings: int, peaks: bool) -> list[Node]:
        """Proof nodes for `block` against `length`; LookupError if one is not held."""
        return tree.make_proof(block, length, siblings, peaks,
                               lambda n: self.store.get_node(self.key, n))

    def proof_request(self, block: int) -> tuple[int, bool]:
        """(siblings, peaks) to ask a peer for, given the nodes held, against
        `proof_length(block)`."""
        assert self.head is not None
        return tree.proof_request(block, self.proof_length(block),
                                  lambda n: self.store.get_node(self.key, n) is not None)

    def proof_length(self, block: int) -> int:
        """The signed length to ask a peer to prove `block` against: that of the
        head the view was opened from, if the block lies inside it (normally
        the newest head; an older one when no peer can serve the newest, and
        a peer holding that older version completely can always prove it),
        else the newest head's."""
        assert self.head is not None
        target = self.target
        if target is not None and block < target.length:
            return target.length
        return self.head.length

    def complete_head(self, ranges: list[tuple[int, int]] | None = None) -> Head | None:
        """The newest signed head whose every block is held here (None if none);
        `ranges` are `held_ranges()` if the caller has them."""
        ranges = self.held_ranges() if ranges is None else ranges
        if not ranges or ranges[0][0] != 0:
            return None
        for head in reversed(self.store.heads(self.key)):
            if head.length <= ranges[0][1]:
                return head
        return None

    def held_ranges(self) -> list[tuple[int, int]]:
        """Held blocks below the signed length as (start, end) ranges."""
        if self.head is None:
            return []
        limit = self.head.length
        return [(a, min(b, limit)) for a, b in self.store.held_ranges(self.key) if a < limit]

    def has_block(self, i: int) -> bool:
        return self.head is not None and i < self.head.length and self.store.has_block(self.key, i)

    # --- receiving from peers ------------------------------------------------------

    def subscribe(self, callback: Callable[[Head], None]) -> Callable[[], None]:
        """Call `callback(head)` whenever the head moves forward; returns unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    def _notify(self, head: Head) -> None:
        for cb in list(self._subscribers):
            cb(head)

    def accept_head(self, head: Head) -> bool:
        """Verify and store a signed head.  True if it moved the head forward.

        A verified head older than the newest is kept too (never adopted as
        the newest): a peer holding that version completely can prove its
        blocks against it.  Raises VerificationError for a bad signature and
        ForkError when it conflicts with a head or tree nodes held (the
        evidence is kept)."""
        held = self.store.get_head(self.key, head.length)
        if held == head:
            return False  # the very bytes verified when they were stored
        crypto.verify_head(self.key, head.length, head.root, head.signature)
        self._heads_checked.add((head.length, head.root))
        if held is not None:
            if held.root == head.root:
                return False
            self.store.put_fork(self.key, head)
            raise ForkError(f"drive {self.key_text} is forked: two different signed roots "
                            f"for length {head.length}; the evidence is kept in the store")
        peaks = self.store.get_nodes(self.key, flat.full_roots(head.length))
        if peaks and all(p is not None for p in peaks) and tree.root_hash(peaks) != head.root:
            self.store.put_fork(self.key, head)
            raise ForkError(f"drive {self.key_text} is forked: a signed root for length "
                            f"{head.length} contradicts the tree held; the evidence is kept")
        self.store.put_head(self.key, head)
        if self.head is not None and head.length <= self.head.length:
            return False  # an older head we never saw: kept, but heads never move backward
        self.head = head
        self._notify(head)
        return True

    def accept_dht_signature(self, head: Head, dht_signature: bytes) -> bool:
        """Keep the owner's DHT signature of a head this home holds, if it is
        one (so this node can put the head in the DHT).  True if kept."""
        if len(dht_signature) != crypto.SIGNATURE_BYTES or self.store.dht_signature(self.key, head.length):
            return False
        held = self.store.get_head(self.key, head.length)
        if held is None or held.root != head.root:
            return False
        try:
            crypto.verify_dht_head(self.key, head.length, head.root, held.signature, dht_signature)
        except VerificationError:
            return False
        self.store.put_dht_signature(self.key, head.length, dht_signature)
        return True

    def root_of(self, length: int) -> bytes | None:
        """The signed root of version `length`, if we hold that signed head."""
        head = self.head if self.head is not None and self.head.length == length \
            else self.store.get_head(self.key, length)
        return None if head is None else head.root

    def verify_received(self, block: int, data: bytes, proof: list[Node], length: int,
                        get_trusted: Callable[[int], Node | None] | None = None,
                        ) -> list[Node] | None:
        """Check a block a peer sent against our signed head of `length` (the
        one the request named: a head adopted meanwhile must not fail an
        honest reply) and the trusted nodes `get_trusted` knows (default: the
        store).  Returns the nodes it proves, for the caller to store with the
        block; None if we hold no signed head of that length (nothing can be
        checked, so nothing may be stored).  Raises VerificationError."""
        head = self.head if self.head is not None and self.head.length == length \
            else self.store.get_head(self.key, length)
        if head is None:
            return None
        if get_trusted is None:
            get_trusted = lambda n: self.store.get_node(self.key, n)  # noqa: E731
        return tree.verify_block(block, data, proof, length, head.root, get_trusted)

    def accept_block(self, block: int, data: bytes, proof: list[Node]) -> None:
        """Verify a block from a peer against the latest head, then store it
        with the nodes it proves, in one transaction.  (The swarm verifies
        with `verify_received` and stores in batches instead.)

        Raises VerificationError (never stores anything then)."""
        if self.head is None:
            raise VerificationError(f"block {block} arrived before any signed head")
        nodes = self.verify_received(block, data, proof, self.proof_length(block))
        if nodes is None:
            raise VerificationError(f"block {block}: no signed head of its proof's length is held")
        self.store.put_block_items(self.key, [(block, data)], nodes)
        leaf = nodes[0] if nodes and nodes[0].index == 2 * block else None
        if leaf is not None:
            self._trusted.setdefault(leaf.index, leaf)

    def adopt_own_head(self, head: Head) -> None:
        """The owner just committed `head` through this process: move to it."""
        self._heads_checked.add((head.length, head.root))
        self.head = head
        self._notify(head)

    # --- opening a view ----------------------------------------------------------

    async def _fetch(self, blocks: list[int], path: bytes | None = None) -> None:
        if self.source is None:
            raise BlockUnavailableError(
                f"block {blocks[0]} of drive {self.key_text} is not held locally; "
                "give --peer HOST:PORT to fetch it"
            )
        if path is not None:
            await self.source.fetch_path(self, path)
            if all(self.store.has_block(self.key, b) for b in blocks):
                return
        await self.source.fetch(self, blocks)

    async def _fetch_read(self, blocks: list[int]) -> Mapping[int, bytes]:
        """A read's fetch: the verified blocks not yet stored, by block."""
        if self.source is None:
            await self._fetch(blocks)  # raises: nowhere to fetch from
        return await self.source.fetch_verified(self, blocks)

    async def _sync(self, fn, path: bytes | None = None):
        """Run synchronous index code, fetching blocks it misses, until done.

        A VerificationError of the index (which knows no drive) is given the
        drive, version and `path` here."""
        tried_path = False
        last: list[int] | None = None
        while True:
            try:
                return fn()
            except MissingBlock as missing:
                if missing.indices == last:  # the source said yes but did not store it
                    raise BlockUnavailableError(
                        f"block {last[0]} of drive {self.key_text} could not be fetched") from None
                last = missing.indices
                await self._fetch(missing.indices, None if tried_path else path)
                tried_path = True
            except VerificationError as exc:
                if path is None or str(exc).startswith("drive "):
                    raise
                raise VerificationError(f"drive {self._where()}: {shown(path)}: {exc}") from None

    def _candidates(self, newer_than: int = 0) -> list[Head]:
        """Signed heads longer than `newer_than`, newest first, whose commit
        block is held here or may be fetched: with a source that can tell
        (`announced`), only those a peer announced."""
        announced = getattr(self.source, "announced", None)
        out = []
        for head in reversed(self.store.heads(self.key)):
            if head.length <= newer_than:
                break
            commit = head.length - 1
            if self.store.has_block(self.key, commit) or (
                    self.source is not None and (announced is None or announced(self, commit))):
                out.append(head)
        return out

    async def open(self, version: int | None = None) -> "Drive":
        """Show `version` (None: the newest readable version, following later
        heads on refresh).  The newest readable version is the newest signed
        one whose commit is held here or announced by a peer of the source;
        `version` is found from there.  NotFoundError for a version past it,
        BlockUnavailableError when no version can be read."""
        if self.head is None or self.head.length == 0:
            raise NotFoundError(f"no signed version of drive {self.key_text} is known yet")
        self.live = version is None
        if not await self._open_newest(version):
            where = ("here or at any connected peer" if self.source is not None
                     else "here; give --peer HOST:PORT to fetch it")
            raise BlockUnavailableError(
                f"no version of drive {self.key_text} can be read: the commit record of its "
                f"newest signed version (length {self.head.length}) is not held {where}")
        return self

    async def _open_newest(self, version: int | None, newer_than: int = 0) -> bool:
        """Open `version` (None: its own) from the newest candidate head longer
        than `newer_than` that can be read; False if there is no candidate.
        A candidate whose blocks cannot be had gives way to the next; the view
        changes only once a version is completely loaded."""
        saved = self.target
        error: BlockUnavailableError | None = None
        for head in self._candidates(newer_than):
            self.check_signature(head)
            self.target = head  # what blocks of this attempt are proven against
            try:
                length, newest = await self._sync(
                    lambda head=head: self._version_length(head, version), b"/")
                await self._sync(lambda head=head: self._load_sync(length, head, newest))
                return True
            except BlockUnavailableError as exc:
                self.target = saved
                error = error or exc
            except BaseException:
                self.target = saved
                raise
        if error is not None:
            raise error
        return False

    def open_local(self, version: int | None = None) -> "Drive":
        """`open` from the blocks held here, synchronously (nothing is fetched)."""
        return self._now(lambda: self.open(version))

    def read_local(self, entry: Entry, offset: int, size: int, path: bytes | None = None) -> bytes:
        """`read` from the blocks held here, synchronously (BlockUnavailableError
        for a block not held)."""
        return self._now(lambda: self.read(entry, offset, size, path))

    def _now(self, make):
        """Run the coroutine `make()` at once with no block source: it then
        never waits (a missing block raises), so no event loop is needed."""
        source, self.source = self.source, None
        try:
            coroutine = make()
            try:
                coroutine.send(None)
            except StopIteration as done:
                return done.value
            coroutine.close()
            raise AssertionError("a local call waited for something")
        finally:
            self.source = source

    def newer_note(self) -> str | None:
        """One line saying that a newer signed version is known than the one
        the view was opened from (its blocks are nowhere to be had), or None."""
        if self.head is None or self.target is None or self.target.length >= self.head.length:
            return None
        where = "no connected peer holds" if self.source is not None else "this home does not hold"
        note = (f"drive {self.key_text}: held up to version {self.target_version}; a newer "
                f"signed version (length {self.head.length}) is known, but {where} its blocks")
        if self.writable:
            note += "; if you did not sign it elsewhere, the drive's secret key is stolen"
        return note

    def _local(self, fn):
        try:
            return fn()
        except MissingBlock as missing:
            raise BlockUnavailableError(
                f"block {missing.indices[0]} of drive {self.key_text} is not held locally; "
                "give --peer HOST:PORT to fetch it") from None

    def _read_commit(self, length: int) -> Commit:
        obj = index.decode_block(self.reader.read_block(length - 1))
        if not isinstance(obj, Commit):
            raise VerificationError(f"drive {self.key_text}: block {length - 1} "
                                    "should be a commit record and is not")
        return obj

    def _version_length(self, head: Head, version: int | None) -> tuple[int, int]:
        """(log length of `version`, version number of `head`), walking the
        commit chain back from `head` (version None: `head` itself).  May
        raise MissingBlock."""
        length = head.length
        commit = self._read_commit(length)
        newest = commit.version
        if version is None:
            return length, newest
        if version > commit.version or version < 1:
            newer = ("" if head.length >= self.head.length
                     else f" (a newer signed version, length {self.head.length}, cannot be read)")
            raise NotFoundError(f"drive {self.key_text} has no version {version}; "
                                f"the newest is {commit.version}{newer}")
        while commit.version > version:
            if not 0 <= commit.prev < length - 1:
                raise VerificationError(f"drive {self.key_text}: commit chain is broken "
                                        f"at block {length - 1}")
            length = commit.prev + 1
            commit = self._read_commit(length)
        if commit.version != version:
            raise VerificationError(f"drive {self.key_text}: commit chain skips version {version}")
        return length, newest

    async def commit_at(self, version: int | None) -> tuple[int, Commit]:
        """(log length, Commit) of `version` (None: the one the view was opened
        from, the newest readable), fetching what it needs.  NotFoundError for
        a version that does not exist."""
        head = self.target or self.head
        length, _ = await self._sync(lambda: self._version_length(head, version))
        return length, await self._sync(lambda: self._read_commit(length))

    async def diff(self, old: Commit, new: Commit) -> list[tuple[bytes, Entry | None, Entry | None]]:
        """(path, old entry, new entry) of every path that differs between two
        versions (`index.diff`: subtrees both share are not read).  Keys that
        are no path are left out (and reported once), and so are paths whose
        entry makes no sense on either side (`check_entry`); entries are
        shown as readers see them (`sanitized`)."""
        changes = await self._sync(
            lambda: list(index.diff(self.reader, old.root, new.root, self.node_cache, raw=True)))
        out = []
        for key, before, after in changes:
            if not index.valid_key(key):
                parent, _, name = key.partition(b"\x00")
                self._report((parent, name), f"drive {self.key_text}: {shown(parent)}: an entry "
                             f"with an invalid name {name!r} is left out")
                continue
            path = index.key_path(key)
            try:
                out.append((path, before and self.check_entry(path, before),
                            after and self.check_entry(path, after)))
            except VerificationError as exc:  # nonsense fields: reported, left out
                self._report((path, "entry"), f"{exc}; left out of the comparison")
        return out

    async def diff_keys(self, old: Commit | None, new: Commit,
                        ) -> list[tuple[bytes, Entry | None, Entry | None]]:
        """`index.diff_keys`: (raw index key, old entry, new entry) of every key
        that differs (old None: every key of `new`).  Keys and entries are
        unchecked: a caller takes a key apart itself and gives each entry it
        uses to `check_entry` (`p2pfs.mirror` does, reporting what it refuses)."""
        return await self._sync(lambda: list(index.diff_keys(
            self.reader, None if old is None else old.root, new.root, self.node_cache)))

    def versions(self, held_only: bool = False, length: int | None = None) -> list[tuple[int, Commit]]:
        """(length, Commit) of every version up to the one the view was opened
        from (or the one of `length`), newest first (BlockUnavailableError for
        a commit not held; with `held_only` the list stops there instead)."""
        if self.target is None:
            raise NotFoundError(f"drive {self.key_text} is not open")
        out = []
        length = self.target.length if length is None else length
        while length > 0:
            if held_only and not self.store.has_block(self.key, length - 1):
                break
            commit = self._local(lambda: self._read_commit(length))
            out.append((length, commit))
            length = self._prev_length(length, commit)
        return out

    async def history(self) -> AsyncIterator[tuple[int, Commit]]:
        """(length, Commit) of this view's version and every earlier one,
        newest first; commit records not held come through the source."""
        length = self.length
        while length > 0:
            commit = await self._sync(lambda: self._read_commit(length))
            yield length, commit
            length = self._prev_length(length, commit)

    def _prev_length(self, length: int, commit: Commit) -> int:
        """The length of the version before `commit` (at `length`); 0 after version 1."""
        if commit.prev < 0:
            return 0
        if commit.prev >= length - 1:
            raise VerificationError(f"drive {self.key_text}: commit chain is broken "
                                    f"at block {length - 1}")
        return commit.prev + 1

    def _load_sync(self, length: int, head: Head, target_version: int) -> None:
        """Check the version of `length` (header, commit, root) and only then show it."""
        header = index.decode_block(self.reader.read_block(0))
        if not isinstance(header, Header):
            raise VerificationError(f"drive {self.key_text}: block 0 is not a drive header")
        if header.format != 1:
            raise VerificationError(f"drive {self.key_text} is of format {header.format}; "
                                    "this p2pfs reads format 1 only")
        if not valid_block_size(header.block_size):
            raise VerificationError(
                f"drive {self.key_text}: its header gives a block size of {header.block_size} "
                f"bytes, which no drive can have (a power of two from {MIN_BLOCK_SIZE} to "
                f"{MAX_CREATE_BLOCK_SIZE}): a bad drive")
        commit = self._read_commit(length)
        idx = index.Index(self.reader, commit.root, self.node_cache, header.block_size)
        where = f"{self.key_text}@{commit.version}"
        try:
            root = idx.lookup(b"/")
        except VerificationError as exc:
            raise VerificationError(f"drive {where}: its root directory cannot be read "
                                    f"({exc}): a bad drive") from None
        if root is None:
            raise VerificationError(f"drive {where} has no root directory entry: a bad drive")
        problem = (f"its root entry is a {_KIND_NAME[root.kind]}, not a directory"
                   if root.kind != KIND_DIR else entry_problem(root, length, header.block_size))
        if problem:
            raise VerificationError(f"drive {where}: {problem}: a bad drive")
        self.block_size = header.block_size
        self.commit = commit
        self.version = commit.version
        self.length = length
        self._index = idx
        self.target = head
        self.target_version = target_version

    def reload_head(self) -> bool:
        """Adopt a newer signed head that another process (an owner's `import`
        into the same home) stored.  True if the head moved; subscribers hear of it."""
        head = self.store.latest_head(self.key)
        if head is None or (self.head is not None and head.length <= self.head.length):
            return False
        self.check_signature(head)
        self.head = head
        self._notify(head)
        return True

    async def refresh(self) -> bool:
        """Move a live view to the newest readable head (in memory or in the
        store; a newer one whose blocks nobody has is passed over).  True if
        it moved."""
        if not self.live:
            return False
        self.reload_head()
        if self.head is None or (self.target is not None and self.target == self.head):
            return False
        return await self._open_newest(None, newer_than=self.length)

    # --- reading -------------------------------------------------------------------

    def _need_view(self) -> index.Index:
        if self._index is None:
            raise NotFoundError(f"drive {self.key_text} is not open")
        return self._index

    def _where(self) -> str:
        return f"{self.key_text}@{self.version}"

    def check_entry(self, path: bytes, entry: Entry) -> Entry:
        """`entry`, found at `path` in the version shown, as readers may see it
        (`sanitized`).  VerificationError naming drive, version and path if it
        makes no sense (`entry_problem`)."""
        problem = entry_problem(entry, self.length, self.block_size)
        if problem is not None:
            raise VerificationError(f"drive {self._where()}: {shown(path)}: {problem}: a bad drive")
        return sanitized(entry)

    def _report(self, what: tuple, message: str) -> None:
        """Tell `warn` about a problem of the drive's content once per Drive."""
        reported = self._reported
        if what in reported:
            return
        if len(reported) >= MAX_REPORTED:
            if None not in reported:
                reported.add(None)
                self.warn(f"drive {self.key_text}: more than {MAX_REPORTED} bad entries; "
                          "the rest are left out without a word")
            return
        reported.add(what)
        self.warn(message)

    def _shown_entries(self, parent: bytes, items: Iterable[tuple[bytes, Entry]],
                       ) -> Iterator[tuple[bytes, Entry]]:
        """(name, checked entry) of a directory's items; the rest reported and left out."""
        for name, entry in items:
            if not valid_name(name):
                self._report((parent, name), f"drive {self._where()}: {shown(parent)}: an entry "
                             f"with an invalid name {name!r} is left out")
                continue
            path = _join(parent, name)
            try:
                yield name, self.check_entry(path, entry)
            except VerificationError as exc:
                self._report((path, entry), f"{exc}; left out")

    async def lookup(self, path: bytes | str) -> Entry:
        """The entry at `path`.  NotFoundError if there is none, VerificationError
        if it makes no sense."""
        idx = self._need_view()
        p = index.normalize_path(path)
        entry = await self._sync(lambda: idx.lookup(p), p)
        if entry is None:
            raise NotFoundError(f"{shown(p)}: no such file or directory in {self._where()}")
        return self.check_entry(p, entry)

    async def listdir(self, path: bytes | str) -> list[tuple[bytes, Entry]]:
        """(name, entry) of each child of a directory, sorted by name; children
        with invalid names or entries are left out (and reported once)."""
        idx = self._need_view()
        p = index.normalize_path(path)
        entry = await self.lookup(p)
        if entry.kind != KIND_DIR:
            raise UsageError(f"{shown(p)}: not a directory in {self._where()}")
        return list(self._shown_entries(p, await self._sync(lambda: list(idx.listdir(p)), p)))

    def walk_local(self) -> list[tuple[bytes, Entry]]:
        """(path, entry) of every entry of this version (every block held), in
        key order (a directory before what it holds); keys that are no path,
        entries whose parent is not a directory listed before them (below a
        link, say) and bad entries are left out (and reported once)."""
        items = self._local(lambda: list(self._need_view().scan()))
        out = []
        dirs = {b"/"}
        for key, entry in items:
            if not key:
                out.append((b"/", sanitized(entry)))  # the root, checked when opened
                continue
            parent, _, name = key.partition(b"\x00")
            if not index.valid_key(key):
                self._report((parent, name), f"drive {self._where()}: {shown(parent)}: an entry "
                             f"with an invalid name {name!r} is left out")
                continue
            path = index.key_path(key)
            if parent not in dirs:
                self._report((parent, name), f"drive {self._where()}: {shown(path)}: its parent "
                             "is not a directory of the drive; left out")
                continue
            try:
                out.append((path, self.check_entry(path, entry)))
            except VerificationError as exc:
                self._report((path, entry), f"{exc}; left out")
                continue
            if entry.kind == KIND_DIR:
                dirs.add(path)
        return out

    def content_problems(self) -> list[str]:
        """Every entry of every version held (oldest first) whose name or fields
        make no sense, each named with drive, version and path; index nodes
        shared by versions are checked once.  Versions whose index is not
        held are skipped (a partial copy).  For `verify`."""
        problems: list[str] = []
        seen: set[int] = set()
        for length, commit in reversed(self.versions(held_only=True)):
            where = f"{self.key_text}@{commit.version}"
            try:
                idx = index.Index(self.reader, commit.root, self.node_cache, self.block_size)
                for key, entry in idx.scan_unseen(seen):
                    if key and not index.valid_key(key):
                        parent, _, name = key.partition(b"\x00")
                        problems.append(f"drive {where}: {shown(parent)}: an entry with an "
                                        f"invalid name {name!r}")
                        continue
                    problem = entry_problem(entry, length, self.block_size)
                    if problem is not None:
                        problems.append(f"drive {where}: {shown(index.key_path(key))}: {problem}")
            except MissingBlock:
                continue  # not every index block of this version is held here
            except VerificationError as exc:
                problems.append(f"drive {where}: {exc}")
        return problems

    def _file(self, path: bytes | None) -> str:
        return "a file" if path is None else shown(path)

    def _blocks_of(self, entry: Entry, first: int, last: int, path: bytes | None) -> list[int]:
        """Log blocks holding file blocks first..last (inclusive)."""
        out: list[int] = []
        pos = 0
        for start, count in entry.extents:
            if pos + count > first and pos <= last:
                a = max(first, pos) - pos
                b = min(last, pos + count - 1) - pos
                out.extend(range(start + a, start + b + 1))
            pos += count
            if pos > last:
                break
        assert self.head is not None
        if len(out) != last - first + 1 or min(out) < 1 or max(out) >= self.head.length:
            # only an entry never checked against this drive gets here
            raise VerificationError(f"drive {self._where()}: {self._file(path)}: its extents "
                                    "do not match its size and the log: a bad drive")
        return out

    async def read(self, entry: Entry, offset: int, size: int, path: bytes | None = None) -> bytes:
        """Up to `size` verified bytes of a file (found at `path`) from `offset`
        (b"" at the end).  Every block but the file's last must be exactly the
        block size, the last exactly the rest: a file reads as the same bytes
        whatever the read size, and a read joins only the bytes it returns.

        Raises BlockUnavailableError (not held, no peer had it) and
        VerificationError (a damaged block, or a bad drive: never returned)."""
        if entry.kind != KIND_FILE:
            raise UsageError("not a regular file")
        end = min(entry.size, offset + size)
        if offset >= end or offset < 0:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        blocks = self._blocks_of(entry, first, last, path)
        tail = entry.size - (entry.size - 1) // bs * bs  # bytes of the file's last block
        final = (entry.size - 1) // bs
        sizes = [bs if j < final else tail for j in range(first, last + 1)]
        cut = (offset - first * bs, end - last * bs)
        out = self._get_verified(blocks, sizes, cut, path)
        if self.source is not None and not isinstance(out, list):
            self.source.reading(self, blocks)  # a read-ahead block: move the window on
        if isinstance(out, list):
            with contextlib.ExitStack() as waiting:
                if self.cache is not None:
                    # touched however the read ends (what it stored is cache), and
                    # spared by this process's evictions until then
                    waiting.callback(self.cache.touched, self, blocks)
                    waiting.enter_context(self.cache.reading(self.key, blocks))
                again = 0
                given: dict[int, bytes] = {}  # verified, not yet stored
                while isinstance(out, list):
                    missing = out
                    given.update(await self._fetch_read(missing))
                    out = self._get_verified(blocks, sizes, cut, path, given)
                    if isinstance(out, list) and len(out) >= len(missing):
                        # the source said yes, but no fewer are missing: it stored
                        # nothing, or another process of the home evicted them
                        again += 1
                        if again >= READ_FETCHES:
                            raise BlockUnavailableError(
                                f"block {out[0]} of drive {self.key_text} could not be fetched")
        elif self.cache is not None:
            self.cache.touched(self, blocks)
        return out

    def blocks_held(self, entry: Entry) -> int:
        """How many of a file's content blocks are held locally (a key scan, no data read)."""
        held = 0
        for start, count in entry.extents:
            indices = self.store.block_indices(self.key, start)
            try:
                for i in indices:
                    if i >= start + count:
                        break
                    held += 1
            finally:
                indices.close()
        return held

    async def prefetch(self, entry: Entry, offset: int, size: int) -> None:
        """Fetch the blocks of a file's byte range that are not held (read-ahead).

        Does nothing without a block source; raises like `read`."""
        end = min(entry.size, offset + size)
        if self.source is None or entry.kind != KIND_FILE or offset >= end or offset < 0:
            return
        bs = self.block_size
        blocks = self._blocks_of(entry, offset // bs, (end - 1) // bs, None)
        missing = [b for b in blocks if not self.store.has_block(self.key, b)]
        if missing:
            await self._fetch(missing)
            if self.cache is not None:
                self.cache.touched(self, missing)  # about to be read: not the first to go

    def _trust_leaves(self, blocks: list[int]) -> None:
        """Trust the leaf nodes of `blocks` in bulk: for each aligned group of
        2**TRUST_DEPTH blocks inside the tree, one cursor scan of its subtree's
        nodes checked top-down from the (climbed, trusted) subtree root."""
        assert self.head is not None
        limit = self.head.length
        trusted = self._trusted
        done: set[int] = set()
        for b in blocks:
            if 2 * b in trusted:
                continue
            g = flat.index(TRUST_DEPTH, b >> TRUST_DEPTH)
            if g in done or not flat.in_tree(g, limit):
                continue
            done.add(g)
            try:
                top = self.trusted_node(g)
            except LookupError:
                continue  # a partial copy: fall back to per-block climbing
            half = (1 << TRUST_DEPTH) - 1
            nodes = self.store.node_range(self.key, g - half, g + half + 1)
            if len(nodes) != 2 * half + 1:
                continue
            level = [top]
            for d in range(TRUST_DEPTH, 0, -1):
                step = 1 << (d - 1)
                below = []
                for p in level:
                    left, right = nodes[p.index - step], nodes[p.index + step]
                    made = tree.parent_node(left, right)
                    if made.hash != p.hash or made.size != p.size:
                        raise VerificationError(
                            f"drive {self.key_text}: {self._node_name(left.index)} or "
                            f"{self._node_name(right.index)} in the local store does not match "
                            "the signed tree; the store is damaged "
                            f"(run 'p2pfs verify {self.key_text}')")
                    below.append(left)
                    below.append(right)
                level = below
            for n in nodes.values():
                trusted[n.index] = n

    def note_stored(self, blocks) -> None:
        """Record blocks this process verified against a signed head with a
        proof (`tree.verify_block`) and then wrote to the store: reading them
        back here skips hashing them again (bounded; forgotten blocks are
        simply checked)."""
        if len(self._stored) > STORED_MAX:
            self._stored.clear()
        self._stored.update(blocks)

    def _wrong_size(self, path: bytes | None, block: int, got: int, want: int) -> VerificationError:
        return VerificationError(
            f"drive {self._where()}: {self._file(path)}: block {block} holds {got} bytes where the "
            f"file needs {want} (block size {self.block_size}): a bad drive")

    def _get_verified(self, blocks: list[int], sizes: list[int], cut: tuple[int, int],
                      path: bytes | None, given: Mapping[int, bytes] | None = None) -> bytes | list[int]:
        """The verified blocks, each of its `sizes`, joined from cut[0] bytes
        into the first to cut[1] bytes into the last; or the blocks not held.
        `given`: blocks verified by the source and not yet stored (the store
        is read for the rest).

        A block whose trusted leaf node (held) gives another size fails before
        anything is read or fetched; one whose data does, before anything is
        joined."""
        assert self.head is not None
        limit = self.head.length
        if len(self._trusted) > TRUSTED_MAX:
            self._trusted.clear()  # bounded memory; re-verified on demand
        stored = self._stored
        given = given or {}
        self._trust_leaves([b for b in blocks if b not in stored and b not in given])
        trusted = self._trusted
        for b, want in zip(blocks, sizes):
            node = trusted.get(2 * b)
            if node is not None and node.size != want:
                raise self._wrong_size(path, b, node.size, want)
        leaf_node = tree.leaf_node

        def check(views):
            if given:
                views = [given.get(b) if v is None else v for b, v in zip(blocks, views)]
            missing = [b for b, v in zip(blocks, views) if v is None or b >= limit]
            if missing:
                return missing
            for b, v, want in zip(blocks, views, sizes):
                if b not in stored and b not in given:
                    node = trusted.get(2 * b)
                    if node is None:
                        self.check_block(b, v)
                    else:
                        leaf = leaf_node(b, v)
                        if leaf.hash != node.hash or leaf.size != node.size:
                            self.check_block(b, v)  # raises with the full message
                if len(v) != want:  # the signed bytes, but not what the file needs
                    raise self._wrong_size(path, b, len(v), want)
            lo, hi = cut
            if len(views) == 1:
                return bytes(views[0][lo:hi])
            return b"".join([views[0][lo:], *views[1:-1], views[-1][:hi]])

        return self.store.with_blocks(self.key, blocks, check)

    # --- writing -------------------------------------------------------------------

    def seed(self) -> bytes:
        """The drive's secret seed.  ReadOnlyError if not held here; KeyFileError
        if its file is readable by others, malformed, or of another drive."""
        seed = self.store.load_secret(self.key_text)
        if seed is None:
            raise ReadOnlyError(f"drive {self.key_text} is read-only here: its secret key "
                                f"file {self.store.key_path(self.key_text)} is not on this node")
        if crypto.public_from_seed(seed) != self.key:
            raise KeyFileError(f"secret key file {self.store.key_path(self.key_text)} "
                               "does not belong to this drive")
        return seed


def verify_drive(drive: Drive, report: Callable[[str], None] | None = None,
                 length: int | None = None) -> list[str]:
    """Check every signed head, and every held block and stored tree node
    (with `length`: only those of the version of that length and the ones
    before it).  Returns the problems."""
    problems: list[str] = []

    advice = f" (run 'p2pfs verify {drive.key_text}')"

    def bad(msg: str) -> None:
        msg = msg.replace(advice, "")
        problems.append(msg)
        if report is not None:
            report(msg)

    store, key = drive.store, drive.key
    heads = store.heads(key)
    good_heads = []
    for h in heads:
        try:
            crypto.verify_head(key, h.length, h.root, h.signature)
            good_heads.append(h)
        except VerificationError:
            bad(f"signed head of length {h.length} has a bad signature")
    if not good_heads:
        bad("no valid signed head")
        return problems
    for f in store.forks(key):
        bad(f"fork evidence: a second signed root for length {f.length}")
    drive.head = good_heads[-1]
    drive._trusted.clear()
    drive._stored.clear()
    limit = drive.head.length if length is None else length
    # every head: its peaks (where held) hash to its root
    for h in good_heads:
        try:
            drive._trust_peaks(h)
        except VerificationError as exc:
            if h is not drive.head and drive._under_newest(flat.full_roots(h.length)):
                bad(f"fork evidence: the signed head of length {h.length} contradicts the "
                    f"newer signed version of length {drive.head.length}")
            else:
                bad(str(exc))
    for i, data in store.iter_blocks(key):
        if i >= limit:
            continue  # an interrupted write's garbage, never read
        try:
            drive.check_block(i, data)
        except VerificationError as exc:
            bad(str(exc))
    for n in store.iter_nodes(key):
        if not flat.in_tree(n.index, limit) or n.index in drive._trusted:
            continue
        try:
            drive.trusted_node(n.index)
        except VerificationError as exc:
            bad(str(exc))
        except LookupError:
            pass  # a node of a partial copy not yet connected: harmless
    if problems:
        return problems
    # the content: every version held must have a sane index (names, entries)
    try:
        drive.open_local()
        if drive.writable:
            drive.versions()  # an owned drive holds everything: every commit must decode
        for problem in drive.content_problems():
            bad(problem)
    except BlockUnavailableError as exc:
        if drive.writable:
            bad(str(exc))
    except VerificationError as exc:
        bad(str(exc))
    return problems
