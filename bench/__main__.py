"""Run the benchmark modules bench/bench_<name>.py, each printing its own table.

Figures are ratios against a baseline measured in the same run, never
absolute pass/fail timings: the machines are shared and noisy.
"""

from __future__ import annotations

import importlib
import inspect
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
    """`NAME...` runs those (none: all); `NAME --option ...` runs one with
    its own options (`scripts/bench net --help` lists them)."""
    split = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, options = argv[:split] or available(), argv[split:]
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"bench: unknown benchmark(s) {unknown}; have {available()}", file=sys.stderr)
        return 2
    if options and len(names) != 1:
        print(f"bench: options ({' '.join(options)}) are for one benchmark: "
              f"name it first, e.g. scripts/bench net {' '.join(options)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        module = importlib.import_module(f"bench.bench_{name}")
        if options and not inspect.signature(module.main).parameters:
            print(f"bench: bench {name} takes no options", file=sys.stderr)
            return 2
        print(f"\n== bench {name} ==", flush=True)
        started = time.perf_counter()
        try:
            if options:
                module.main(options)
            else:
                module.main()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"({name}: {time.perf_counter() - started:.1f} s)", flush=True)
    if failed:
        print(f"\nbench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


raise SystemExit(main(sys.argv[1:]))
