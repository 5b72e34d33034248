"""TreeBuilder.append vs plain blake3 over 1 GiB in 64 KiB blocks (same bytes, same run).

A third row times the receiving side: every block in order through
proof_request, make_proof (from a dict) and verify_block (trusted nodes in a
dict), as a peer fetching a whole file would; a fourth the same in runs of
16 blocks (range_proof_request, make_range_proof, verify_range with the
sender's leaves), as wire version 2 fetches.

The figure that matters is the ratio: how much of blake3's speed the tree
keeps once it adds the domain-tagged leaf hash, the parent hashes and the
Node bookkeeping.  Importing a file is bounded by this.
"""

from __future__ import annotations

import os
import time

from blake3 import blake3

from p2pfs.tree import (
    TreeBuilder, make_proof, make_range_proof, proof_request, range_proof_request, verify_block, verify_range,
)

BLOCK = 64 * 1024
TOTAL = 1 << 30
CHUNK = 16 << 20  # urandom in 16 MiB pieces, then sliced into blocks


def _blocks() -> list[bytes]:
    blocks = []
    for _ in range(TOTAL // CHUNK):
        chunk = os.urandom(CHUNK)
        blocks.extend(chunk[i:i + BLOCK] for i in range(0, CHUNK, BLOCK))
    return blocks


def _plain(blocks: list[bytes]) -> float:
    started = time.perf_counter()
    for b in blocks:
        blake3(b).digest()
    return time.perf_counter() - started


def _tree(blocks: list[bytes]) -> tuple[float, bytes]:
    started = time.perf_counter()
    builder = TreeBuilder()
    append = builder.append
    for b in blocks:
        append(b)
    root = builder.root()
    return time.perf_counter() - started, root


def _served(blocks: list[bytes]) -> tuple[dict, int, bytes]:
    """What a seeder holds: every node of the tree, the length, the signed root."""
    builder = TreeBuilder()
    served = {}
    for b in blocks:
        for node in builder.append(b):
            served[node.index] = node
    return served, builder.length, builder.root()


def _verify(blocks: list[bytes]) -> float:
    """A receiver fetching every block in order: proof_request, make_proof, verify_block."""
    served, length, root = _served(blocks)
    trusted: dict = {}
    started = time.perf_counter()
    for i, b in enumerate(blocks):
        siblings, peaks = proof_request(i, length, trusted.__contains__)
        proof = make_proof(i, length, siblings, peaks, served.get)
        for node in verify_block(i, b, proof, length, root, trusted.get):
            trusted[node.index] = node
    return time.perf_counter() - started


RUN = 16


def _verify_runs(blocks: list[bytes]) -> float:
    """The same receiver, in runs of RUN blocks with one proof and one leaf per block."""
    served, length, root = _served(blocks)
    trusted: dict = {}
    started = time.perf_counter()
    for start in range(0, len(blocks), RUN):
        end = min(start + RUN, len(blocks))
        proof = make_range_proof(start, end, length, range_proof_request(start, end, length, trusted.__contains__),
                                 served.get)
        leaves = [(served[2 * i].hash, served[2 * i].size) for i in range(start, end)]
        for node in verify_range(start, blocks[start:end], proof, length, root, trusted.get, leaves).nodes:
            trusted[node.index] = node
    return time.perf_counter() - started


def main() -> None:
    blocks = _blocks()
    # alternate and keep the best of each, so both see the same machine noise
    plain, built = [], []
    for _ in range(2):
        plain.append(_plain(blocks))
        built.append(_tree(blocks)[0])
    p, t = min(plain), min(built)
    v = _verify(blocks)
    r = _verify_runs(blocks)
    gib = TOTAL / (1 << 30)
    print(f"{'what':<32}{'GiB/s':>8}{'ratio':>8}")
    print(f"{'blake3 of each 64 KiB block':<32}{gib / p:>8.2f}{1.0:>8.2f}")
    print(f"{'TreeBuilder.append':<32}{gib / t:>8.2f}{p / t:>8.2f}")
    print(f"{'request+proof+verify_block':<32}{gib / v:>8.2f}{p / v:>8.2f}")
    print(f"{'... verify_range, runs of 16':<32}{gib / r:>8.2f}{p / r:>8.2f}")
    print(f"({len(blocks)} blocks; per-append overhead {(t - p) / len(blocks) * 1e6:.2f} µs,"
          f" per verified block {(v - p) / len(blocks) * 1e6:.2f} µs, in runs {(r - p) / len(blocks) * 1e6:.2f} µs)")


if __name__ == "__main__":
    main()
