"""What changed between two versions, in a person's terms: `p2pfs diff`.

Theory of operation
-------------------
`Drive.diff` gives every path whose index entry differs (`index.diff`, which
skips the subtrees both versions share, so the cost follows the changes).
`classify` turns those raw pairs into changes:

* a path in both versions, of the same kind: *modified* when its content
  (size, blocks, link target, extended attributes) or, for a file or a link,
  its mtime differs; *mode* when only its permission bits do.  A directory
  whose only change is its mtime is not listed (it follows from the changes
  inside it).  A path whose kind changed is *deleted* and *added*.
* *renamed*: a deleted file and an added one with the same blocks (a file
  of no bytes has no blocks and is never paired).  A deleted directory whose
  every descendant reappears under one added directory with the same
  relative path (files renamed, directories and links equal) is one rename
  of the directory; its descendants are not listed.

Pure: no I/O.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from dataclasses import dataclass
from typing import Iterable

from .index import KIND_DIR, KIND_FILE, KIND_SYMLINK, Entry

ADDED, DELETED, MODIFIED, RENAMED, MODE = "added", "deleted", "modified", "renamed", "mode"
KIND_NAMES = {KIND_FILE: "file", KIND_DIR: "dir", KIND_SYMLINK: "symlink"}


@dataclass(frozen=True)
class Change:
    change: str              # ADDED, DELETED, MODIFIED, RENAMED or MODE
    path: bytes              # the path in the newer version (the old one for DELETED)
    kind: int                # KIND_FILE, KIND_DIR or KIND_SYMLINK
    old_path: bytes | None = None  # RENAMED: where it was
    old_mode: int | None = None    # MODE (and MODIFIED): the permission bits before
    mode: int | None = None

    def as_json(self) -> dict:
        out = {"change": self.change, "path": os.fsdecode(self.path),
               "kind": KIND_NAMES.get(self.kind, str(self.kind))}
        if self.old_path is not None:
            out["from"] = os.fsdecode(self.old_path)
        if self.old_mode is not None and self.old_mode != self.mode:
            out["old_mode"] = f"{self.old_mode:04o}"
            out["mode"] = f"{self.mode:04o}"
        return out

    def line(self) -> bytes:
        text = f"{self.change:<9} ".encode()
        if self.change == RENAMED:
            return text + self.old_path + b" -> " + self.path
        text += self.path
        if self.change == MODE:
            text += f"  {self.old_mode:04o} -> {self.mode:04o}".encode()
        return text


def _content_differs(a: Entry, b: Entry) -> bool:
    if (a.size, a.extents, a.target, a.xattrs) != (b.size, b.extents, b.target, b.xattrs):
        return True
    return a.kind != KIND_DIR and a.mtime_ns != b.mtime_ns


def _descendants(paths: list[bytes], top: bytes) -> list[bytes]:
    """The paths below `top` in a sorted list (they are one contiguous run)."""
    lo = bisect_left(paths, top + b"/")
    hi = bisect_left(paths, top + b"0")  # "0" is the byte after "/"
    return paths[lo:hi]


def classify(raw: Iterable[tuple[bytes, Entry | None, Entry | None]]) -> list[Change]:
    """Changes, sorted by path, from (path, old entry, new entry) triples."""
    added: dict[bytes, Entry] = {}
    deleted: dict[bytes, Entry] = {}
    out: list[Change] = []
    for path, old, new in raw:
        if old is not None and new is not None and old.kind == new.kind:
            if _content_differs(old, new):
                out.append(Change(MODIFIED, path, new.kind, old_mode=old.mode, mode=new.mode))
            elif old.mode != new.mode:
                out.append(Change(MODE, path, new.kind, old_mode=old.mode, mode=new.mode))
            continue
        if old is not None:
            deleted[path] = old
        if new is not None:
            added[path] = new

    # files with the same blocks under another path
    by_blocks: dict[tuple, list[bytes]] = {}
    for path in sorted(added):
        e = added[path]
        if e.kind == KIND_FILE and e.extents:
            by_blocks.setdefault((e.size, e.extents), []).append(path)
    renamed: dict[bytes, bytes] = {}  # old path -> new path
    for path in sorted(deleted):
        e = deleted[path]
        if e.kind == KIND_FILE and e.extents:
            candidates = by_blocks.get((e.size, e.extents))
            if candidates:
                renamed[path] = candidates.pop(0)

    # whole directories that moved
    gone = sorted(deleted)
    came = sorted(added)
    collapsed: set[bytes] = set()  # old paths inside a renamed directory (and the directory)
    dir_renames: list[tuple[bytes, bytes]] = []
    for top in gone:
        if deleted[top].kind != KIND_DIR or top in collapsed:
            continue
        below = _descendants(gone, top)
        first = next((p for p in below if p in renamed), None)
        if first is None:
            continue
        rel = first[len(top):]
        if not renamed[first].endswith(rel):
            continue
        dest = renamed[first][:-len(rel)]
        if added.get(dest) is None or added[dest].kind != KIND_DIR or dest in deleted:
            continue
        if len(_descendants(came, dest)) != len(below):
            continue
        if all(_same_under(p, top, dest, deleted, added, renamed) for p in below):
            dir_renames.append((top, dest))
            collapsed.add(top)
            collapsed.update(below)
    moved_to = {new for old, new in dir_renames}
    hidden_new = {dest + p[len(old):] for old, dest in dir_renames
                  for p in _descendants(gone, old)} | moved_to
    for old, new in dir_renames:
        out.append(Change(RENAMED, new, KIND_DIR, old_path=old))
    for old, new in renamed.items():
        if old not in collapsed:
            out.append(Change(RENAMED, new, KIND_FILE, old_path=old))
    paired_new = set(renamed.values())
    for path, e in deleted.items():
        if path not in collapsed and path not in renamed:
            out.append(Change(DELETED, path, e.kind))
    for path, e in added.items():
        if path not in hidden_new and path not in paired_new:
            out.append(Change(ADDED, path, e.kind))
    out.sort(key=lambda c: (c.path, c.change))
    return out


def _same_under(path: bytes, top: bytes, dest: bytes, deleted: dict, added: dict,
                renamed: dict) -> bool:
    """Whether `path` (below `top`) reappears at the same place below `dest`."""
    there = dest + path[len(top):]
    e = deleted[path]
    if e.kind == KIND_FILE and e.extents:
        return renamed.get(path) == there
    return added.get(there) == e
