"""Which paths of a shared directory are left out: `.p2pfsignore` and `--exclude`.

Theory of operation
-------------------
The rules are gitignore's (`pathspec.GitIgnoreSpec`): the lines of
`DIR/.p2pfsignore` (if there is one), then each `--exclude PATTERN`, so a
pattern given on the command line wins over a negation in the file.  As in
git, a path inside an ignored directory is ignored whatever later patterns
say (`node_modules/` and `!keep.tmp` leave `node_modules/keep.tmp` out):
`ignored` checks every ancestor directory first.  The root and
`/.p2pfsignore` itself are never ignored, so the rules travel with the drive.

Paths are drive paths (absolute bytes, `b"/a/b"`); names that are not UTF-8
are matched in their `os.fsdecode` form.  Pure: `load` reads the one file,
nothing else does I/O.
"""

from __future__ import annotations

import os
from typing import Iterable

import pathspec

from .errors import UsageError

IGNORE_FILE = ".p2pfsignore"
IGNORE_PATH = b"/" + IGNORE_FILE.encode()
MAX_IGNORE_FILE = 1 << 20  # bytes; a bigger .p2pfsignore is refused
_DIR_CACHE_MAX = 1 << 16


class Rules:
    """Compiled ignore rules.  `Rules()` ignores nothing."""

    def __init__(self, lines: Iterable[str] = (), excludes: Iterable[str] = (),
                 source: str = IGNORE_FILE):
        self.lines = list(lines)
        self.excludes = list(excludes)
        patterns = self.lines + self.excludes
        try:
            self._spec = pathspec.GitIgnoreSpec.from_lines(patterns)
        except (ValueError, TypeError) as exc:  # GitIgnorePatternError is a ValueError
            raise UsageError(f"bad ignore pattern in {source} or --exclude: {exc}") from None
        self._empty = not any(p.include is not None for p in self._spec.patterns)
        self._dirs: dict[bytes, bool] = {}

    @classmethod
    def load(cls, root: str | os.PathLike, excludes: Iterable[str] = ()) -> "Rules":
        """The rules of directory `root`: its .p2pfsignore, then `excludes`.

        Raises UsageError for an unreadable or oversized file or a bad pattern."""
        path = os.path.join(os.fsencode(root), IGNORE_FILE.encode())
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_IGNORE_FILE + 1)
        except (FileNotFoundError, NotADirectoryError):
            data = b""  # no rules (a missing DIR is reported by the scan)
        except IsADirectoryError:
            raise UsageError(f"{os.fsdecode(path)} is a directory; it should be a file of "
                             "ignore patterns") from None
        except OSError as exc:
            raise UsageError(f"{os.fsdecode(path)}: cannot read: {exc.strerror}") from None
        if len(data) > MAX_IGNORE_FILE:
            raise UsageError(f"{os.fsdecode(path)} is larger than {MAX_IGNORE_FILE} bytes")
        lines = os.fsdecode(data).splitlines()
        return cls(lines, excludes, source=os.fsdecode(path))

    @property
    def empty(self) -> bool:
        return self._empty

    def same_as(self, other: "Rules") -> bool:
        return self.lines == other.lines and self.excludes == other.excludes

    def _match(self, path: bytes, is_dir: bool) -> bool:
        rel = os.fsdecode(path[1:])
        return self._spec.match_file(rel + "/" if is_dir else rel)

    def ignored_here(self, path: bytes, is_dir: bool) -> bool:
        """Whether `path` itself matches, its ancestors aside (for a scan that
        does not descend into ignored directories)."""
        if self._empty or path == b"/" or path == IGNORE_PATH:
            return False
        return self._match(path, is_dir)

    def ignored(self, path: bytes, is_dir: bool) -> bool:
        """Whether `path` (a normalised drive path) is left out, counting its ancestors."""
        if self._empty or path == b"/":
            return False
        parent = path[:path.rindex(b"/")]
        if parent and self._dir_ignored(parent):
            return True
        return self.ignored_here(path, is_dir)

    def _dir_ignored(self, path: bytes) -> bool:
        got = self._dirs.get(path)
        if got is None:
            parent = path[:path.rindex(b"/")]
            got = (bool(parent) and self._dir_ignored(parent)) or self._match(path, True)
            if len(self._dirs) > _DIR_CACHE_MAX:
                self._dirs.clear()
            self._dirs[path] = got
        return got
