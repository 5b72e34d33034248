"""Flat-tree index arithmetic: integers in, integers out.

The Merkle tree over a log is numbered in order ("flat tree", as in
hypercore and bao): leaf (block) ``i`` is node ``2*i``; a node at depth
``d`` with offset ``o`` (its position among nodes of that depth, counted
from the left) is ``(o << (d + 1)) | ((1 << d) - 1)``.  So even numbers are
leaves, the depth of a node is the number of trailing 1 bits of its index,
and a node's index is the midpoint of the leaves it covers::

    depth 2:              3
    depth 1:      1               5
    depth 0:  0       2       4       6
    block:    0       1       2       3

A log of ``length`` blocks is covered by a list of perfect subtrees, one per
1 bit of ``length`` (largest first): the *peaks* or *full roots*.  A node is
part of the tree of ``length`` blocks exactly when its span ends at or
before ``length``; such nodes never change as the log grows.

Nothing here hashes or validates types; callers pass non-negative ints.
"""

from __future__ import annotations

__all__ = [
    "index",
    "depth",
    "offset",
    "parent",
    "sibling",
    "children",
    "left_span",
    "right_span",
    "span",
    "full_roots",
    "peak_of",
    "in_tree",
]


def index(depth: int, offset: int) -> int:
    """The node at `depth` (0 = leaves) and `offset` (0 = leftmost)."""
    return (offset << (depth + 1)) | ((1 << depth) - 1)


def depth(n: int) -> int:
    """Depth of node `n`: the number of trailing 1 bits (leaves are 0)."""
    return (~n & (n + 1)).bit_length() - 1


def offset(n: int) -> int:
    """Position of node `n` among the nodes of its depth, from the left."""
    return n >> (depth(n) + 1)


def parent(n: int) -> int:
    """The parent of node `n`."""
    d = (~n & (n + 1)).bit_length() - 1
    return (n & ~(2 << d)) | (1 << d)  # clear bit d+1, set bit d


def sibling(n: int) -> int:
    """The other child of `n`'s parent."""
    return n ^ (2 << ((~n & (n + 1)).bit_length() - 1))  # flip bit depth+1


def children(n: int) -> tuple[int, int] | None:
    """``(left, right)`` children of `n`, or None for a leaf."""
    d = depth(n)
    if d == 0:
        return None
    half = 1 << (d - 1)
    return n - half, n + half


def left_span(n: int) -> int:
    """The leftmost leaf node (an even index) under `n`."""
    return n - ((1 << depth(n)) - 1)


def right_span(n: int) -> int:
    """The rightmost leaf node (an even index) under `n`."""
    return n + ((1 << depth(n)) - 1)


def span(n: int) -> tuple[int, int]:
    """Blocks covered by `n`: ``(first_block, end_block)``, end exclusive."""
    d = depth(n)
    first = n >> (d + 1) << d
    return first, first + (1 << d)


def full_roots(length: int) -> list[int]:
    """The peaks of a log of `length` blocks, left to right (``[]`` for 0)."""
    roots = []
    first = 0
    for d in range(length.bit_length() - 1, -1, -1):
        if length >> d & 1:
            roots.append(index(d, first >> d))
            first += 1 << d
    return roots


def peak_of(block: int, length: int) -> int:
    """The peak of a `length`-block log whose subtree holds `block` (< length)."""
    if not 0 <= block < length:
        raise ValueError(f"block {block} is outside a log of {length} blocks")
    first = 0
    for d in range(length.bit_length() - 1, -1, -1):
        if length >> d & 1:
            if block < first + (1 << d):
                return index(d, first >> d)
            first += 1 << d
    raise AssertionError("unreachable")


def in_tree(n: int, length: int) -> bool:
    """True if node `n` belongs to the tree of a `length`-block log."""
    return span(n)[1] <= length
