"""Fetching a full copy: every block of a drive, or everything a version (or
some of its folders) references.  Used by `p2pfs seed`, `p2pfs pin` and
`p2pfs mirror`.

Theory of operation
-------------------
*What a copy needs.*  Every version: the whole log below the signed
length, whose total size in bytes the signed tree's peaks give
(`log_bytes`).  One version: its header, its commit, the index nodes its
lookups read, and the content blocks its files' extents name — found by
walking the index with `Drive.listdir`, which fetches the index blocks it
misses; `version_blocks` returns the content blocks with their exact sizes
(a file's last block is short), so progress is counted in bytes.  A later
version needs only what changed: `changed_blocks` takes `Drive.diff`
(O(changes)).

*Fetching.*  `fetch_blocks` hands the blocks not held to the drive's
`BlockSource` in chunks of `CHUNK` blocks, `PARALLEL` chunks in flight, so
the peers' pipelines stay full without queueing a whole drive's wants at
once.  The source verifies every block against the signed tree before it
is stored; blocks already held are never asked for, so a copy interrupted
in any way (`kill -9`) resumes where it stopped.

Entries are untrusted: blocks at or past the signed length, and extents
that do not cover a file's size, are left out (the reader's checks report
them when the file is read).
"""

from __future__ import annotations

from typing import Callable, Iterable

import trio

from . import flat
from .drive import Drive
from .errors import P2pfsError
from .index import KIND_DIR, KIND_FILE, Entry, shown

CHUNK = 1024        # blocks per fetch call (64 MiB of 64 KiB blocks)
PARALLEL = 3        # fetch calls in flight
MAX_WALK = 1 << 22  # entries walked at most for one version (a hostile index may loop)


def missing_ranges(drive: Drive, length: int) -> list[tuple[int, int]]:
    """Block ranges below `length` not held, ascending."""
    out = []
    pos = 0
    for a, b in drive.held_ranges():
        if a >= length:
            break
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < length:
        out.append((pos, length))
    return out


def log_bytes(drive: Drive, length: int) -> int | None:
    """Bytes of the log below `length` (the sum of its tree peaks' sizes), or
    None while a peak is not held (the first fetched block brings them)."""
    peaks = drive.store.get_nodes(drive.key, flat.full_roots(length))
    if any(p is None for p in peaks):
        return None
    return sum(p.size for p in peaks)


def file_blocks(entry: Entry, block_size: int, length: int) -> list[tuple[int, int]]:
    """(block, size) of a file's content blocks below `length`; none if the
    extents do not cover the size exactly (a bad drive: the read reports it)."""
    count = sum(n for _s, n in entry.extents)
    if count != -(-entry.size // block_size):
        return []
    out = []
    left = entry.size
    for start, n in entry.extents:
        for b in range(start, start + n):
            size = min(block_size, left)
            left -= size
            if b < length:
                out.append((b, size))
    return out


async def walk(drive: Drive, top: bytes = b"/") -> list[tuple[bytes, Entry]]:
    """(path, entry) of `top` and everything below it in the version the
    drive shows, fetching the index blocks it misses (names as stored)."""
    entry = await drive.lookup(top)
    out = [(top, entry)]
    pending = [top] if entry.kind == KIND_DIR else []
    while pending:
        d = pending.pop()
        for name, e in await drive.listdir(d):
            path = (d.rstrip(b"/") + b"/" + name)
            out.append((path, e))
            if len(out) > MAX_WALK:
                drive.warn(f"drive {drive.key_text}: more than {MAX_WALK:,} entries below "
                           f"{shown(top)}; only the content of the first is fetched")
                return out
            if e.kind == KIND_DIR and b"/" not in name and name not in (b"", b".", b".."):
                pending.append(path)
    return out


async def version_blocks(drive: Drive, paths: Iterable[bytes] = (b"/",)) -> dict[int, int]:
    """{block: size} of the content below `paths` in the version the drive shows."""
    out: dict[int, int] = {}
    for top in paths:
        for _path, entry in await walk(drive, top):
            if entry.kind == KIND_FILE:
                out.update(file_blocks(entry, drive.block_size, drive.length))
    return out


async def changed_blocks(drive: Drive, old, new, paths: Iterable[bytes] = (b"/",)) -> dict[int, int]:
    """{block: size} of the files added or changed from Commit `old` to `new`
    below `paths` (the index blocks the comparison reads are fetched too)."""
    tops = [p.rstrip(b"/") or b"/" for p in paths]
    out: dict[int, int] = {}
    for path, _old, entry in await drive.diff(old, new):
        if entry is None or entry.kind != KIND_FILE:
            continue
        if any(t == b"/" or path == t or path.startswith(t + b"/") for t in tops):
            out.update(file_blocks(entry, drive.block_size, drive.length))
    return out


async def fetch_blocks(drive: Drive, blocks: Iterable[int],
                       on_done: Callable[[list[int]], None] | None = None) -> None:
    """Fetch every block of `blocks` (ascending) that is not held, through the
    drive's source; `on_done(chunk)` after each chunk is stored.  Raises
    BlockUnavailableError (what the source raises) once a chunk cannot be had."""
    limit = trio.Semaphore(PARALLEL)
    failed: P2pfsError | None = None

    async with trio.open_nursery() as nursery:
        async def one(chunk: list[int]) -> None:
            nonlocal failed
            try:
                await drive.source.fetch(drive, chunk)
            except P2pfsError as exc:  # the first failure ends the others, and is raised as itself
                failed = failed or exc
                nursery.cancel_scope.cancel()
                return
            finally:
                limit.release()
            if on_done is not None:
                on_done(chunk)

        for chunk in _chunks(b for b in blocks if not drive.has_block(b)):
            await limit.acquire()  # in order, PARALLEL at a time
            nursery.start_soon(one, chunk)
    if failed is not None:
        raise failed


def _chunks(blocks: Iterable[int]) -> Iterable[list[int]]:
    chunk: list[int] = []
    for b in blocks:
        chunk.append(b)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def range_blocks(ranges: Iterable[tuple[int, int]]) -> Iterable[int]:
    for a, b in ranges:
        yield from range(a, b)
