"""The malloc policy every p2pfs command sets at start (p2pfs/heap.py): freed
memory up to KEEP_FREE stays in the process for the next transaction, and
`trim` still gives all of it back.  Each case runs in a fresh interpreter, so
the policy of the test process does not matter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p2pfs import heap

pytestmark = pytest.mark.skipif(heap._libc is None, reason="not glibc")

# 48 MiB of 64 KiB blocks, allocated in order (so they fill the top of the
# heap) and freed: what a 32 MiB store transaction and its blocks leave.
PROGRAM = r"""
import sys
from p2pfs import heap

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

if sys.argv[1] == "tune":
    heap.tune()
blocks = [bytes(65536) for _ in range(768)]
before = anon_kib()
del blocks
freed = anon_kib()
heap.trim()
print(before, freed, anon_kib())
"""


def _run(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True,
                         text=True, check=True).stdout
    before, freed, trimmed = map(int, out.split())
    return before, freed, trimmed


def test_default_glibc_gives_freed_blocks_back_at_once():
    # the behaviour the policy is for: without it, the next transaction
    # faults 48 MiB in again
    before, freed, _ = _run("default")
    assert before - freed > 24 << 10


def test_tuned_process_keeps_freed_blocks_until_trimmed():
    before, freed, trimmed = _run("tune")
    assert before - freed < 4 << 10, "the freed blocks went back to the system"
    assert freed - trimmed > 24 << 10, "trim gave nothing back"


def test_the_users_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    before, freed, _ = _run("tune")
    assert before - freed > 24 << 10


def test_tuned_process_reuses_a_4_mib_read_buffer():
    # cat and mirror read 4 MiB at a time: were each result mapped and
    # unmapped (an mmap threshold at 4 MiB), every call would fault its 1,024
    # pages in again; from the heap only the first one does
    program = ("import resource\n"
               "from p2pfs import heap\n"
               "heap.tune()\n"
               "data = b'x' * (4 << 20)\n"
               "del data\n"
               "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
               "for _ in range(50):\n"
               "    data = b'x' * (4 << 20)\n"
               "    del data\n"
               "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = int(subprocess.run([sys.executable, "-c", program], capture_output=True,
                                text=True, check=True).stdout)
    assert faults < 1024, f"{faults} page faults for 50 reads of 4 MiB"
