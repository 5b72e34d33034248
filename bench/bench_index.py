"""Index: bulk build and lookups in a 1,000,000-entry drive.

Rows: build time (and its ratios to sorting the paths and to encoding every
entry in one msgspec call, floors any bulk loader pays), index blocks read by one cold lookup (goal <= 4), cold and
warm lookup time, and one small copy-on-write commit on top.
"""

from __future__ import annotations

import time

import msgspec

from p2pfs.index import KIND_DIR, KIND_FILE, Entry, Index, IndexWriter, NodeCache, build

DIRS = 1000
FILES = 1000
BLOCK_SIZE = 65536


class CountingLog:
    """An in-memory log that counts read_block calls."""

    def __init__(self) -> None:
        self.blocks: list[bytes] = []
        self.reads = 0

    def read_block(self, index: int) -> bytes:
        self.reads += 1
        return self.blocks[index]


def items() -> list[tuple[bytes, Entry]]:
    out = [(b"/", Entry(KIND_DIR, 0o755, 1_700_000_000_000_000_000))]
    for d in range(DIRS):
        out.append((b"/dir%04d" % d, Entry(KIND_DIR, 0o755, 1_700_000_000_000_000_000 + d)))
        for f in range(FILES):
            n = d * FILES + f
            out.append((b"/dir%04d/file-%06d.dat" % (d, f),
                        Entry(KIND_FILE, 0o644, 1_700_000_000_000_000_000 + n, 4000, ((n, 1),))))
    return out


def main() -> None:
    data = items()
    print(f"{'entries':<40}{len(data):>14,}")

    t = time.perf_counter()
    sorted(p for p, _ in data)
    sort_s = time.perf_counter() - t
    t = time.perf_counter()
    msgspec.msgpack.encode([e for _, e in data])
    encode_s = time.perf_counter() - t

    t = time.perf_counter()
    blocks, root = build(data, 1, BLOCK_SIZE)
    build_s = time.perf_counter() - t
    print(f"{'build (s)':<40}{build_s:>14.2f}   {build_s / sort_s:.1f}x sorting the paths, "
          f"{build_s / encode_s:.1f}x encoding the entries in one call")
    print(f"{'index blocks / bytes':<40}{len(blocks):>14,} {sum(map(len, blocks)):>14,}")
    print(f"{'largest node (bytes, limit 65536)':<40}{max(map(len, blocks)):>14,}")

    log = CountingLog()
    log.blocks = [b""] + blocks
    probe = b"/dir0777/file-000777.dat"
    cache = NodeCache()
    ix = Index(log, root, cache)
    t = time.perf_counter()
    entry = ix.lookup(probe)
    cold = time.perf_counter() - t
    assert entry is not None and entry.extents == ((777777, 1),), entry
    print(f"{'cold lookup: index blocks read (<= 4)':<40}{log.reads:>14}")
    print(f"{'cold lookup (ms)':<40}{cold * 1e3:>14.2f}")
    if log.reads > 4:
        raise SystemExit(f"cold lookup read {log.reads} index blocks, goal is <= 4")

    n = 10_000
    t = time.perf_counter()
    for i in range(n):
        ix.lookup(probe)
    warm = (time.perf_counter() - t) / n
    print(f"{'warm lookup (us)':<40}{warm * 1e6:>14.2f}")

    t = time.perf_counter()
    names = list(ix.listdir(b"/dir0500"))
    ls_s = time.perf_counter() - t
    assert len(names) == FILES
    print(f"{'listdir of 1,000 (ms, cold-ish)':<40}{ls_s * 1e3:>14.2f}")

    w = IndexWriter(log, root, cache)
    t = time.perf_counter()
    for i in range(10_000):
        w.put(b"/dir%04d/new-%05d" % (i % DIRS, i), Entry(KIND_FILE, 0o644, i, 1, ((i, 1),)))
    new_blocks, new_root = w.finish(len(log.blocks), BLOCK_SIZE)
    put_s = time.perf_counter() - t
    print(f"{'10,000 puts + finish (s)':<40}{put_s:>14.2f}   {len(new_blocks):,} nodes written")

    w = IndexWriter(log, root, cache)
    w.put(probe, Entry(KIND_FILE, 0o600, 1, 1))
    one, _ = w.finish(len(log.blocks), BLOCK_SIZE)
    print(f"{'one put: nodes written':<40}{len(one):>14}")


if __name__ == "__main__":
    main()
