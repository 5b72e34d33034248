"""Run the benchmark modules bench/bench_<name>.py, each printing its own table.

Figures are ratios against a baseline measured in the same run, never
absolute pass/fail timings: the machines are shared and noisy.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback

import bench


def available() -> list[str]:
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(bench.__path__)
        if m.name.startswith("bench_")
    )


def main(argv: list[str]) -> int:
    names = argv or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"bench: unknown benchmark(s) {unknown}; have {available()}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n== bench {name} ==", flush=True)
        started = time.perf_counter()
        try:
            importlib.import_module(f"bench.bench_{name}").main()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"({name}: {time.perf_counter() - started:.1f} s)", flush=True)
    if failed:
        print(f"\nbench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


raise SystemExit(main(sys.argv[1:]))
