"""Benchmarks for p2pfs (run with scripts/bench)."""
