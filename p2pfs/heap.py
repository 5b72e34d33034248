"""The process's malloc policy, and giving freed memory back to the system.

Two things, both glibc-only (elsewhere they do nothing):

`tune()`, called once at process start (`cli.main`, `bench`), keeps up to
`KEEP_FREE` (64 MiB) of freed memory at the top of the heap instead of
returning it at every `free`.  glibc's default gives back the top of the heap
once more than about two of its largest recent allocations are free there;
an LMDB write transaction frees its dirty pages (32 MiB per commit for a
fetch's writer and for `create`) and Python frees each 64 KiB block it held,
so with the default every transaction's pages went back to the kernel and
were faulted in again, zeroed, by the next one.  On the shared VMs this is
dear: the balloon driver reports freed pages to the host (HACKING.md,
"Measuring on these machines").  Setting the trim threshold switches off
glibc's sliding mmap threshold (which would have risen to the largest block
freed, up to 32 MiB), so `tune` fixes that too, at its ceiling `MMAP_FROM`
(32 MiB): `cat`'s and `mirror`'s 4 MiB reads come from the heap as well.
(At 4 MiB they were mapped and unmapped at every call, and `cat` from the
store fell from about 2.3 to 0.9 GB/s.)

What it gains, measured: HACKING.md, "Measuring on these machines".

`trim()` asks glibc to return every free page now (`malloc_trim(0)`: free
chunks anywhere in the heap are released with MADV_DONTNEED, whatever
`KEEP_FREE` says).  A seeder's memory is mostly short-lived buffers (blocks
read for peers, output queued for them); after a burst (many peers, or
attackers that came and went) the process would otherwise stay at its peak
size.  The connection janitor calls it every few seconds while little output
is queued.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

KEEP_FREE = 64 << 20   # bytes of free heap top kept for reuse (M_TRIM_THRESHOLD)
MMAP_FROM = 32 << 20   # allocations larger than this are mapped (M_MMAP_THRESHOLD; glibc's most)

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3

_libc = None
try:
    _name = ctypes.util.find_library("c")
    if _name:
        _lib = ctypes.CDLL(_name)
        if hasattr(_lib, "malloc_trim") and hasattr(_lib, "mallopt"):
            _libc = _lib
except OSError:
    _libc = None


def tune() -> bool:
    """Set the malloc policy above; True if glibc took it.

    A user's own choice wins: with MALLOC_TRIM_THRESHOLD_ or
    MALLOC_MMAP_THRESHOLD_ in the environment, or either in GLIBC_TUNABLES,
    glibc's settings are left as they are."""
    if _libc is None or _user_chose():
        return False
    mapped = _libc.mallopt(_M_MMAP_THRESHOLD, MMAP_FROM)
    kept = _libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREE)
    return bool(mapped and kept)


def _user_chose() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")) \
        or "malloc.trim_threshold" in tunables or "malloc.mmap_threshold" in tunables


def trim() -> bool:
    """Return free heap memory to the system; True if some was released."""
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(0))
