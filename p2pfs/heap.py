"""Giving freed memory back to the system.

A seeder's memory use is mostly short-lived buffers (blocks read for
peers, output queued for them).  glibc keeps freed heap memory for reuse,
so after a burst (many peers, or attackers that came and went) the
process would stay at its peak size.  `trim` asks glibc to return free
pages (`malloc_trim(0)`: free chunks anywhere in the heap are released with
MADV_DONTNEED); the connection janitor calls it every few seconds while
little output is queued.  Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_libc = None
try:
    _name = ctypes.util.find_library("c")
    if _name:
        _lib = ctypes.CDLL(_name)
        if hasattr(_lib, "malloc_trim"):
            _libc = _lib
except OSError:
    _libc = None


def trim() -> bool:
    """Return free heap memory to the system; True if some was released."""
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(0))
