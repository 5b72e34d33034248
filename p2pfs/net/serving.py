"""Serving: the answer to a peer's request, from the store.

The receiver verifies everything it gets, so blocks are served as stored
(raw, never decoded, never copied: a run's blocks are views of the store's
read transaction, encoded straight into the frame by `Connection.send`
before the transaction ends), each run with the leaf of every block (so a receiver
can pin a bad block to itself) and the proof nodes it asked for, from the
verified-node caches.  An index lookup (`IndexRequest`) walks our own
stored index for the path, bounded by the index's depth limit and one
reply's size, and adds the file's first content blocks when asked: a cold
small read needs no further round trip.  A request we cannot serve gets
NoData; nothing here raises for a request.
"""

from __future__ import annotations

from typing import Callable

from .. import index, tree
from ..drive import Drive
from ..errors import MissingBlock, P2pfsError
from ..store import Store
from ..wire import messages as m
from .fetcher import NodeCaches


class _StoreReader:
    """index.BlockReader over raw stored blocks (serving: the receiver verifies)."""

    def __init__(self, store: Store, key: bytes, length: int):
        self.store, self.key, self.length = store, key, length

    def read_block(self, i: int) -> bytes:
        data = self.store.get_block(self.key, i) if 0 <= i < self.length else None
        if data is None:
            raise MissingBlock(i)
        return data


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted, distinct block numbers as (start, end) runs."""
    out: list[list[int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][1] == b:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return [(a, b) for a, b in out]


class Server:
    def __init__(self, store: Store, nodes: NodeCaches, drive: Callable[[bytes], Drive | None]):
        self.store = store
        self.nodes = nodes
        self._drive = drive

    def answer(self, channel: int, key: bytes, msg) -> list[m.Message]:
        """The replies `respond` sends, as a list whose blocks are copies
        (for callers that send later: tests, benchmarks, hostile peers)."""
        out: list[m.Message] = []

        def keep(reply: m.Message) -> None:
            if isinstance(reply, m.Data):
                reply = m.Data(reply.channel, reply.id, reply.start,
                               [bytes(b) for b in reply.blocks], reply.leaves, reply.proof)
            out.append(reply)
        self.respond(channel, key, msg, keep)
        return out

    def respond(self, channel: int, key: bytes, msg, send: Callable[[m.Message], None]) -> None:
        """Pass the reply to a request (Data, IndexData or NoData) to `send`,
        after the Head it refers to when the request asked for our newest
        version.  A Data reply's blocks are views of the store's read
        transaction (never copied out): valid only during that `send` call,
        which must encode them at once (`Connection.send` does)."""
        drive = self._drive(key)
        head = drive.head if drive is not None else None
        if head is None or msg.length > head.length:
            send(m.NoData(channel, msg.id))
            return
        try:
            if isinstance(msg, m.Request):
                # sent inside the read transaction its blocks are views of
                self.store.with_blocks(key, range(msg.start, msg.start + msg.count),
                                       lambda blocks: send(self._answer_run(channel, key, msg, blocks)))
                return
            if msg.length == 0:
                # our newest version we can serve: the newest head, or (a relay
                # that heard of a newer one without its blocks) the newest held whole
                if not self.store.has_block(key, head.length - 1):
                    head = drive.complete_head() or head
                replies = [m.Head(channel, head.length, head.root, head.signature,
                                  self.store.dht_signature(key, head.length)),
                           self._answer_path(drive, channel, msg, head.length)]
            else:
                replies = [self._answer_path(drive, channel, msg, msg.length)]
        except (LookupError, MissingBlock, P2pfsError):
            replies = [m.NoData(channel, msg.id)]
        for reply in replies:
            send(reply)

    def _run(self, blocks: list, start: int, end: int, length: int, nodes, get) -> tuple:
        """(leaves, proof) of the run of `blocks` [start, end); LookupError if anything is not held."""
        if any(b is None or len(b) > m.MAX_BLOCK_DATA for b in blocks):
            raise LookupError("a block of the run is not held")
        leaves = []
        for i in range(start, end):
            leaf = get(2 * i)
            if leaf is None:
                raise LookupError(f"the leaf of block {i} is not held")
            leaves.append((leaf.hash, leaf.size))
        return leaves, tree.make_range_proof(start, end, length, nodes, get)

    def _answer_run(self, channel: int, key: bytes, msg: m.Request, blocks: list) -> m.Message:
        # the cheap bound first: a run too big for one reply costs no leaves or proof
        if sum(len(b) for b in blocks if b is not None) > m.MAX_RUN_DATA:
            return m.NoData(channel, msg.id)
        leaves, proof = self._run(blocks, msg.start, msg.start + msg.count, msg.length,
                                  msg.nodes, self.nodes.serving(key))
        return m.Data(channel, msg.id, msg.start, blocks, leaves, proof)

    def _answer_path(self, drive: Drive, channel: int, msg: m.IndexRequest, length: int) -> m.Message:
        key = drive.key
        reader = _StoreReader(self.store, key, length)
        commit = index.decode_block(reader.read_block(length - 1))
        if not isinstance(commit, index.Commit):
            return m.NoData(channel, msg.id)
        idx = index.Index(reader, commit.root)
        wanted = [0, length - 1] + idx.path_blocks(msg.path)
        content = self._first_content(idx, msg.path, length) if msg.content_bytes else []
        # blocks in order while they fit one reply; content up to what was asked
        chosen: list[int] = []
        total = content_total = 0
        for b in dict.fromkeys(wanted + content):
            if b in chosen:
                continue
            is_content = b not in wanted
            if is_content and content_total >= msg.content_bytes:
                break
            size = len(reader.read_block(b))
            if total + size > m.MAX_RUN_DATA or len(chosen) == m.MAX_RUN_BLOCKS:
                break
            chosen.append(b)
            total += size
            if is_content:
                content_total += size
        ranges = _runs(chosen)[:m.MAX_INDEX_RUNS]
        get = self.nodes.serving(key)
        out = []
        for (start, end), need in zip(ranges, tree.plan_runs(ranges, length)):
            blocks = self.store.get_blocks(key, range(start, end))
            leaves, proof = self._run(blocks, start, end, length, need, get)
            out.append(m.Run(start, blocks, leaves, proof))
        if sum(len(r.proof) for r in out) > m.MAX_REPLY_PROOF_NODES:
            return m.NoData(channel, msg.id)
        return m.IndexData(channel, msg.id, length, out)

    @staticmethod
    def _first_content(idx: index.Index, path: bytes, length: int) -> list[int]:
        """The first content blocks (at most a reply's worth) of the file at `path`."""
        try:
            entry = idx.lookup(index.normalize_path(path))
        except (P2pfsError, MissingBlock):
            return []
        if entry is None or entry.kind != index.KIND_FILE:
            return []
        out: list[int] = []
        for start, count in entry.extents:
            for b in range(start, min(start + count, length)):
                if len(out) >= m.MAX_RUN_BLOCKS:
                    return out
                out.append(b)
        return out
