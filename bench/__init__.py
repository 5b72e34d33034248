"""Benchmarks for p2pfs (run with scripts/bench).

Every p2pfs process a benchmark starts reads bench/p2pfs.toml (no DHT
bootstrap nodes) unless P2PFS_CONFIG names another file: a benchmark's DHT
nodes are bootstrapped from loopback nodes it names, never the public routers."""

import os
from pathlib import Path

os.environ.setdefault("P2PFS_CONFIG", str(Path(__file__).resolve().parent / "p2pfs.toml"))

# In-process contenders (create, the store alone) run under the malloc policy
# every p2pfs command sets at start (p2pfs/heap.py), as the p2pfs processes
# a benchmark starts do.
from p2pfs import heap as _heap  # noqa: E402

_heap.tune()
