"""Serving: the answer to a peer's request, from the store.

The receiver verifies everything it gets, so blocks are served as stored
(raw, never decoded); proofs come from the verified-node caches.  An index
lookup (`IndexRequest`) walks our own stored index for the path, bounded
by the index's depth limit and the reply budget, so a request costs at
most one reply's worth of reading.  A request we cannot serve gets NoData;
nothing here raises for a request.
"""

from __future__ import annotations

from typing import Callable

from .. import index, tree
from ..drive import Drive
from ..errors import MissingBlock, P2pfsError
from ..store import Store
from ..wire import messages as m
from .fetcher import NodeCaches

INDEX_REPLY_BUDGET = m.MAX_REPLY_DATA - (64 << 10)


class _StoreReader:
    """index.BlockReader over raw stored blocks (serving: the receiver verifies)."""

    def __init__(self, store: Store, key: bytes, length: int):
        self.store, self.key, self.length = store, key, length

    def read_block(self, i: int) -> bytes:
        data = self.store.get_block(self.key, i) if 0 <= i < self.length else None
        if data is None:
            raise MissingBlock(i)
        return data


class Server:
    def __init__(self, store: Store, nodes: NodeCaches, drive: Callable[[bytes], Drive | None]):
        self.store = store
        self.nodes = nodes
        self._drive = drive

    def answer(self, channel: int, key: bytes, msg) -> m.Message:
        """The reply to a request (Data, IndexData or NoData)."""
        drive = self._drive(key)
        head = drive.head if drive is not None else None
        if head is None or msg.length > head.length:
            return m.NoData(channel, msg.id)
        try:
            if isinstance(msg, m.Request):
                data = self.store.get_block(key, msg.block)
                if data is None or len(data) > m.MAX_BLOCK_DATA:
                    return m.NoData(channel, msg.id)
                proof = tree.make_proof(msg.block, msg.length, msg.siblings, msg.peaks,
                                        self.nodes.serving(key))
                return m.Data(channel, msg.id, msg.block, data, proof)
            return self._answer_path(drive, channel, msg)
        except (LookupError, MissingBlock, P2pfsError):
            return m.NoData(channel, msg.id)

    def _answer_path(self, drive: Drive, channel: int, msg: m.IndexRequest) -> m.Message:
        key, length = drive.key, msg.length
        reader = _StoreReader(self.store, key, length)
        commit = index.decode_block(reader.read_block(length - 1))
        if not isinstance(commit, index.Commit):
            return m.NoData(channel, msg.id)
        blocks = [0, length - 1] + index.Index(reader, commit.root).path_blocks(msg.path)
        items, total = [], 0
        get = self.nodes.serving(key)
        for b in dict.fromkeys(blocks):
            data = reader.read_block(b)
            total += len(data)
            if total > INDEX_REPLY_BUDGET or len(items) == m.MAX_INDEX_BLOCKS:
                break
            items.append(m.BlockItem(b, data, tree.make_proof(b, length, 64, True, get)))
        return m.IndexData(channel, msg.id, items)
