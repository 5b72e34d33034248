"""Small value types shared by every layer."""

from __future__ import annotations

from typing import NamedTuple


class Node(NamedTuple):
    """A Merkle tree node: flat-tree index, 32-byte BLAKE3 hash, bytes covered."""

    index: int
    hash: bytes
    size: int


class Head(NamedTuple):
    """A signed version of a drive: the log `length`, the tree `root`, Ed25519 `signature`."""

    length: int
    root: bytes
    signature: bytes
