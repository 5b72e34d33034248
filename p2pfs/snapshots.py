"""Every version of a drive inside its mount: the hidden `.p2pfs/versions/N/`.

Theory of operation
-------------------
A mount shows, beside the drive's own tree, a directory `/.p2pfs` that is
not listed in the root (so `ls -a`, `cp -a`, `rsync` and `tar` of the
mount copy no history) but can be entered by name, as ZFS's
`.zfs/snapshot`.  It holds `versions/`, listing every version of the drive
by number, and `versions/N/` is version N's root, read-only and fixed.

`Snapshots.route(path)` maps a path of the mount to what answers for it:
the live view (paths outside `/.p2pfs`), a synthetic directory (`/.p2pfs`,
`/.p2pfs/versions`), or a view of version N (`/.p2pfs/versions/N/...`,
opened lazily through the live drive's source, so old versions fetch only
what is read, like the live one).  Version views never change, so the
mount's version switch leaves their inodes alone; only the list in
`versions/` grows.  At most `MAX_VIEWS` views stay open (least recently
used first out; a view is only caches over the same store).

A drive's own entry named `.p2pfs` in its root is shadowed by this one.
"""

from __future__ import annotations

from collections import OrderedDict

from .drive import Drive
from .errors import NotFoundError, UsageError
from .index import KIND_DIR, Commit, Entry

PREFIX = b"/.p2pfs"
VERSIONS = PREFIX + b"/versions"
MAX_VIEWS = 16
MODE = 0o555  # history is read-only


def is_history(path: bytes) -> bool:
    return path == PREFIX or path.startswith(PREFIX + b"/")


def _synthetic(commit: Commit | None) -> Entry:
    return Entry(KIND_DIR, MODE, commit.time_ns if commit is not None else 0)


class Snapshots:
    """The history tree of the mount of `drive` (its live, or fixed, view)."""

    def __init__(self, drive: Drive):
        self.drive = drive
        self._views: OrderedDict[int, Drive] = OrderedDict()
        self._versions: tuple[int, list[tuple[int, Commit]]] | None = None  # (for length, list)

    async def _view(self, version: int) -> Drive:
        view = self._views.get(version)
        if view is not None:
            self._views.move_to_end(version)
            return view
        live = self.drive
        view = Drive(live.store, live.key, source=live.source)
        await view.open(version)  # NotFoundError for a version that does not exist
        self._views[version] = view
        while len(self._views) > MAX_VIEWS:
            self._views.popitem(last=False)
        return view

    async def versions(self) -> list[tuple[int, Commit]]:
        """(version number, Commit) of every version of the drive, newest first
        (its commit records, fetched where not held, once per version shown)."""
        live = self.drive
        if self._versions is None or self._versions[0] != live.length:
            out = [(c.version, c) async for _length, c in live.history()]
            self._versions = (live.length, out)
        return self._versions[1]

    def split(self, path: bytes) -> tuple[int, bytes] | None:
        """(version, path inside it) for a path under versions/N, else None."""
        if not path.startswith(VERSIONS + b"/"):
            return None
        rest = path[len(VERSIONS) + 1:]
        number, _, inner = rest.partition(b"/")
        if not number.isdigit() or number != str(int(number)).encode() or int(number) < 1:
            raise NotFoundError(f"{path!r}: no such version")
        return int(number), b"/" + inner

    async def lookup(self, path: bytes) -> Entry:
        """The entry at a history path.  NotFoundError if there is none."""
        if path in (PREFIX, VERSIONS):
            return _synthetic(self.drive.commit)
        version, inner = self.split(path)
        view = await self._view(version)
        return await view.lookup(inner)

    async def listdir(self, path: bytes) -> list[tuple[bytes, Entry]]:
        if path == PREFIX:
            return [(b"versions", _synthetic(self.drive.commit))]
        if path == VERSIONS:
            return sorted(((str(n).encode(), _synthetic(c)) for n, c in await self.versions()),
                          key=lambda ne: ne[0])
        version, inner = self.split(path)
        view = await self._view(version)
        return await view.listdir(inner)

    async def drive_for(self, path: bytes) -> Drive:
        """The view that reads the file at a history path."""
        split = self.split(path)
        if split is None:
            raise UsageError(f"{path!r} is not a file of an old version")
        return await self._view(split[0])
