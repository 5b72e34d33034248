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
block length-1).  A live view follows the newest head on `refresh()`; a
fixed view (`KEY@N`) stays where it was opened.

*Writing* is `p2pfs.publish`: it starts from this view and moves it to
the version it signed (`adopt_own_head`).
"""

from __future__ import annotations

import os
from typing import AsyncIterator, Callable, Iterator, Protocol

from . import crypto, flat, index, tree
from .errors import (
    BlockUnavailableError, ForkError, KeyFileError, MissingBlock, NotFoundError,
    ReadOnlyError, UsageError, VerificationError,
)
from .index import Commit, Entry, Header, KIND_DIR, KIND_FILE
from .store import Store
from .types import Head, Node

DEFAULT_BLOCK_SIZE = 65536
# The largest block size `create` accepts: a power of two whose blocks still
# fit one wire Data message (wire.messages.MAX_BLOCK_DATA), so every drive
# made here can be replicated.
MAX_CREATE_BLOCK_SIZE = 1 << 19
TRUST_DEPTH = 6  # leaves are trusted in aligned groups of 2**6 blocks
TRUSTED_MAX = 1 << 20  # verified nodes cached per Drive (about 32 GiB of 64 KiB blocks)
STORED_MAX = 1 << 20  # blocks remembered as verified and stored by this process


class BlockSource(Protocol):
    """Where missing blocks come from (implemented by `p2pfs.net`)."""

    async def fetch(self, drive: "Drive", blocks: list[int]) -> None:
        """Return once every listed block is stored (verified); else raise
        BlockUnavailableError."""

    async def fetch_path(self, drive: "Drive", path: bytes) -> None:
        """Best effort: fetch every index block on the path in one round trip."""


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
        self.block_size = DEFAULT_BLOCK_SIZE
        self.version = 0
        self.length = 0
        self.commit: Commit | None = None
        self.live = True
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
        """(siblings, peaks) to ask a peer for, given the nodes held."""
        assert self.head is not None
        return tree.proof_request(block, self.head.length,
                                  lambda n: self.store.get_node(self.key, n) is not None)

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

        Raises VerificationError for a bad signature and ForkError when it
        conflicts with a head or tree nodes held (the evidence is kept)."""
        crypto.verify_head(self.key, head.length, head.root, head.signature)
        self._heads_checked.add((head.length, head.root))
        held = self.store.get_head(self.key, head.length)
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
        if self.head is not None and head.length <= self.head.length:
            return False  # an older head we never saw: heads never move backward
        self.store.put_head(self.key, head)
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
        nodes = self.verify_received(block, data, proof, self.head.length)
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

    async def _sync(self, fn, path: bytes | None = None):
        """Run synchronous index code, fetching blocks it misses, until done."""
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

    async def open(self, version: int | None = None) -> "Drive":
        """Show `version` (None: the newest, following later heads on refresh)."""
        if self.head is None or self.head.length == 0:
            raise NotFoundError(f"no signed version of drive {self.key_text} is known yet")
        self.live = version is None
        length = await self._sync(lambda: self.version_length(version))
        await self._load(length)
        return self

    def open_local(self, version: int | None = None) -> "Drive":
        """Synchronous open for drives whose blocks are all held."""
        if self.head is None or self.head.length == 0:
            raise NotFoundError(f"unknown drive {self.key_text}")
        self.live = version is None
        length = self._local(lambda: self.version_length(version))
        self._local(lambda: self._load_sync(length))
        return self

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

    def version_length(self, version: int | None) -> int:
        """The log length of `version` (None: the newest).  May raise MissingBlock."""
        assert self.head is not None
        length = self.head.length
        if version is None:
            return length
        commit = self._read_commit(length)
        if version > commit.version or version < 1:
            raise NotFoundError(f"drive {self.key_text} has no version {version}; "
                                f"the newest is {commit.version}")
        while commit.version > version:
            if not 0 <= commit.prev < length - 1:
                raise VerificationError(f"drive {self.key_text}: commit chain is broken "
                                        f"at block {length - 1}")
            length = commit.prev + 1
            commit = self._read_commit(length)
        if commit.version != version:
            raise VerificationError(f"drive {self.key_text}: commit chain skips version {version}")
        return length

    async def commit_at(self, version: int | None) -> tuple[int, Commit]:
        """(log length, Commit) of `version` (None: the newest), fetching what it needs.
        NotFoundError for a version that does not exist."""
        length = await self._sync(lambda: self.version_length(version))
        return length, await self._sync(lambda: self._read_commit(length))

    async def diff(self, old: Commit, new: Commit) -> list[tuple[bytes, Entry | None, Entry | None]]:
        """(path, old entry, new entry) of every path that differs between two
        versions (`index.diff`: subtrees both share are not read)."""
        return await self._sync(
            lambda: list(index.diff(self.reader, old.root, new.root, self.node_cache)))

    async def diff_keys(self, old: Commit | None, new: Commit,
                        ) -> list[tuple[bytes, Entry | None, Entry | None]]:
        """`index.diff_keys`: (raw index key, old entry, new entry) of every key
        that differs (old None: every key of `new`).  Keys are unchecked."""
        return await self._sync(lambda: list(index.diff_keys(
            self.reader, None if old is None else old.root, new.root, self.node_cache)))

    def versions(self, length: int | None = None) -> list[tuple[int, Commit]]:
        """(length, Commit) of the version at `length` (None: the newest) and
        every earlier one, newest first (all blocks held)."""
        assert self.head is not None
        out = []
        length = self.head.length if length is None else length
        while length > 0:
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

    def _load_sync(self, length: int) -> None:
        header = index.decode_block(self.reader.read_block(0))
        if not isinstance(header, Header):
            raise VerificationError(f"drive {self.key_text}: block 0 is not a drive header")
        commit = self._read_commit(length)
        self.block_size = header.block_size
        self.commit = commit
        self.version = commit.version
        self.length = length
        self._index = index.Index(self.reader, commit.root, self.node_cache)

    async def _load(self, length: int) -> None:
        await self._sync(lambda: self._load_sync(length))

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
        """Move a live view to the newest head held (in memory or in the store).
        True if it moved."""
        if self.live:
            self.reload_head()
        if not self.live or self.head is None or self.head.length == self.length:
            return False
        await self._load(self.head.length)
        return True

    # --- reading -------------------------------------------------------------------

    def _need_view(self) -> index.Index:
        if self._index is None:
            raise NotFoundError(f"drive {self.key_text} is not open")
        return self._index

    def _where(self) -> str:
        return f"{self.key_text}@{self.version}"

    async def lookup(self, path: bytes | str) -> Entry:
        """The entry at `path`.  NotFoundError if there is none."""
        idx = self._need_view()
        p = index.normalize_path(path)
        entry = await self._sync(lambda: idx.lookup(p), p)
        if entry is None:
            raise NotFoundError(f"{os.fsdecode(p)}: no such file or directory in {self._where()}")
        return entry

    async def listdir(self, path: bytes | str) -> list[tuple[bytes, Entry]]:
        """(name, entry) of each child of a directory, sorted by name."""
        idx = self._need_view()
        p = index.normalize_path(path)
        entry = await self.lookup(p)
        if entry.kind != KIND_DIR:
            raise UsageError(f"{os.fsdecode(p)}: not a directory in {self._where()}")
        return await self._sync(lambda: list(idx.listdir(p)), p)

    def walk_local(self) -> Iterator[tuple[bytes, Entry]]:
        """(path, entry) of every entry of this version (every block held)."""
        return self._local(lambda: list(self._need_view().walk()))

    def _blocks_of(self, entry: Entry, first: int, last: int) -> list[int]:
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
        if len(out) != last - first + 1:
            raise VerificationError(f"drive {self.key_text}: a file's extents do not cover its size")
        return out

    async def read(self, entry: Entry, offset: int, size: int) -> bytes:
        """Up to `size` verified bytes of a file from `offset` (b"" at the end).

        Raises BlockUnavailableError (not held, no peer had it) and
        VerificationError (a damaged block: never returned)."""
        if entry.kind != KIND_FILE:
            raise UsageError("not a regular file")
        end = min(entry.size, offset + size)
        if offset >= end or offset < 0:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        blocks = self._blocks_of(entry, first, last)
        out = self._get_verified(blocks)
        while isinstance(out, list):
            missing = out
            await self._fetch(missing)
            out = self._get_verified(blocks)
            if isinstance(out, list) and out == missing:
                raise BlockUnavailableError(f"block {missing[0]} of drive {self.key_text} "
                                            "could not be fetched")
        if self.cache is not None:
            self.cache.touched(self, blocks)
        lo = offset - first * bs
        if lo or len(out) > end - offset:
            out = out[lo:lo + end - offset]
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
        blocks = self._blocks_of(entry, offset // bs, (end - 1) // bs)
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

    def _get_verified(self, blocks: list[int]) -> bytes | list[int]:
        """The verified blocks joined, or the list of blocks not held."""
        assert self.head is not None
        limit = self.head.length
        if len(self._trusted) > TRUSTED_MAX:
            self._trusted.clear()  # bounded memory; re-verified on demand
        stored = self._stored
        self._trust_leaves([b for b in blocks if b not in stored])
        trusted = self._trusted
        leaf_node = tree.leaf_node

        def check(views):
            missing = [b for b, v in zip(blocks, views) if v is None or b >= limit]
            if missing:
                return missing
            for b, v in zip(blocks, views):
                if b in stored:
                    continue
                node = trusted.get(2 * b)
                if node is None:
                    self.check_block(b, v)
                    continue
                leaf = leaf_node(b, v)
                if leaf.hash != node.hash or leaf.size != node.size:
                    self.check_block(b, v)  # raises with the full message
            return b"".join(views)

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
    if not problems and drive.writable:
        # an owned drive holds everything: every version's commit must decode
        try:
            drive.versions(limit)
        except (VerificationError, BlockUnavailableError) as exc:
            bad(str(exc))
    return problems
