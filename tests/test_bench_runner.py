"""scripts/bench's runner (bench/__main__): which benchmarks, with what options.

Only the argument handling runs here (nothing is measured)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_options_after_one_name_go_to_that_benchmark():
    done = _bench("net", "--help")
    assert done.returncode == 0, done.stderr
    assert "--seeders" in done.stdout and "--cold-runs" in done.stdout


def test_options_for_several_benchmarks_or_one_without_options_are_refused():
    done = _bench("net", "core", "--seeders", "1")
    assert done.returncode == 2
    assert "options (--seeders 1) are for one benchmark" in done.stderr
    done = _bench("core", "--fast")
    assert done.returncode == 2 and "bench core takes no options" in done.stderr
    done = _bench("nonsense")
    assert done.returncode == 2 and "unknown benchmark(s) ['nonsense']" in done.stderr
