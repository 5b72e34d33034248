"""The store alone: what writing blocks into a fresh home costs with nothing
else running, the floor under every path that keeps what it gets (a cold
fetch's writer thread, create and import).

`store_alone(home, size)` puts `size` bytes as 64 KiB blocks into a fresh
home in 32 MiB transactions, each committed (fsynced) as the fetcher's writer
and the importer commit theirs, and returns the seconds taken; the home is
removed after.  The blocks are made before the clock starts.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from p2pfs.store import Store

BLOCK = 64 << 10
TXN_BLOCKS = (32 << 20) // BLOCK


def store_alone(home: str | os.PathLike, size: int) -> float:
    blocks = [os.urandom(BLOCK) for _ in range(TXN_BLOCKS)]
    key = os.urandom(32)
    try:
        with Store(home) as store:
            t = time.perf_counter()
            for first in range(0, size // BLOCK, TXN_BLOCKS):
                n = min(TXN_BLOCKS, size // BLOCK - first)
                store.put_block_items(key, [(first + i, blocks[i]) for i in range(n)])
            return time.perf_counter() - t
    finally:
        shutil.rmtree(Path(home), ignore_errors=True)
