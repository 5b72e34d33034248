"""Watching a shared directory: inotify events -> batches of `publish.Changes`.

Theory of operation
-------------------
`WatchState` is sans-IO: it takes inotify events (`feed`) and the clock
(`now` arguments), and says what to do (actions: watch a new directory tree,
drop watches, log a line, stop) and when a batch is due (`due`, `take`).
`Watcher` is the thin trio part: it owns the inotify descriptor (read with
`trio.lowlevel.wait_readable`), walks directories to add watches, and runs
the actions.

*Watches.*  Every directory of the tree that the rules do not ignore has a
watch (wd -> path).  A new directory (created, or moved in from outside) is
watched and rescanned whole, so files made in it before its watch existed
are not missed.  A watch that cannot be added (ENOSPC: the watch limit;
EACCES) leaves that subtree to a rescan every `max_delay` seconds, logged
once, until a watch can be added again.  A queue overflow (IN_Q_OVERFLOW)
loses events: the whole tree is rescanned and every directory watched again,
logged.

*Renames.*  IN_MOVED_FROM and IN_MOVED_TO with the same cookie are one
rename: it is passed on as a move (the publisher renames the index entries,
no content is read), and every pending path and watch below the old name
follows it.  A MOVED_FROM left unpaired (moved out of the tree) is a
deletion and its watches are dropped; a MOVED_TO left unpaired (moved in) is
a new path, rescanned whole if it is a directory.

*Debounce.*  A batch is due `quiet` seconds after the last event, or
`max_delay` seconds after the first one under constant churn.  A file is
*busy* from an IN_CREATE or IN_MODIFY until it is closed after writing
(IN_CLOSE_WRITE) or has had no event for `quiet` seconds (its size and mtime
held still that long); a batch leaves busy files alone (`Changes.busy`) and
keeps them for the next, so no version holds a file half-written.  A file
the publisher found changing while it read it comes back (`requeue`) as
busy.

*Rules.*  Events on ignored paths are dropped; an ignored directory is not
watched.  An event on `/.p2pfsignore` asks the driver to reload the rules
("reload"); rules that changed mean a rescan of the whole tree.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import trio
from inotify_simple import INotify, flags

from .errors import UsageError
from .ignore import IGNORE_PATH, Rules
from .publish import Changes

DEFAULT_QUIET = 1.0      # s after the last event
DEFAULT_MAX_DELAY = 5.0  # s after the first event, under constant churn
PAIR_WINDOW = 0.5        # s a MOVED_FROM waits for its MOVED_TO before a batch takes it

WATCH_MASK = (flags.MODIFY | flags.ATTRIB | flags.CLOSE_WRITE | flags.MOVED_FROM
              | flags.MOVED_TO | flags.CREATE | flags.DELETE | flags.DELETE_SELF
              | flags.MOVE_SELF | flags.DONT_FOLLOW | flags.ONLYDIR | flags.EXCL_UNLINK)

# actions
WATCH, UNWATCH, LOG, RELOAD, FATAL = "watch", "unwatch", "log", "reload", "fatal"
Action = tuple[str, object]


@dataclass
class _Pending:
    subtree: bool = False  # rescan everything below, not just the path
    busy: bool = False     # written to and not yet closed
    last: float = 0.0      # time of its last event


def _join(parent: bytes, name: bytes) -> bytes:
    return (b"" if parent == b"/" else parent) + b"/" + name


def _moved(path: bytes, old: bytes, new: bytes) -> bytes | None:
    """`path` renamed by old -> new, or None if it is not at or below `old`."""
    if path == old:
        return new
    if path.startswith(old + b"/"):
        return new + path[len(old):]
    return None


class WatchState:
    """The sans-IO bookkeeping of one watched tree (see the module docstring)."""

    def __init__(self, rules: Rules | None = None, *, quiet: float = DEFAULT_QUIET,
                 max_delay: float = DEFAULT_MAX_DELAY):
        self.rules = rules or Rules()
        self.quiet = quiet
        self.max_delay = max_delay
        self.wds: dict[int, bytes] = {}     # watch descriptor -> directory path
        self.dirs: dict[bytes, int] = {}    # directory path -> watch descriptor
        self.pending: dict[bytes, _Pending] = {}
        self.moves: list[tuple[bytes, bytes]] = []
        self.moved_from: dict[int, tuple[bytes, bool, float]] = {}  # cookie -> (path, is_dir, t)
        self.unwatched: set[bytes] = set()  # directories whose watch failed: polled
        self.first: float | None = None      # first event of the batch being gathered
        self.last = 0.0
        self.next_poll: float | None = None
        self.overflows = 0

    # --- watches (the driver reports what it did) ----------------------------------

    def watched(self, wd: int, path: bytes) -> None:
        old = self.wds.get(wd)
        if old is not None and self.dirs.get(old) == wd:
            del self.dirs[old]
        self.wds[wd] = path
        self.dirs[path] = wd
        self.unwatched.discard(path)

    def watch_failed(self, path: bytes, err: int, now: float) -> list[Action]:
        """A watch could not be added: poll that subtree instead."""
        out: list[Action] = []
        if not self.unwatched:
            why = ("the inotify watch limit is reached (raise fs.inotify.max_user_watches)"
                   if err == errno.ENOSPC else os.strerror(err))
            out.append((LOG, f"cannot watch {os.fsdecode(path)}: {why}; rescanning it every "
                             f"{self.max_delay:g} s instead"))
        self.unwatched.add(path)
        if self.next_poll is None:
            self.next_poll = now + self.max_delay
        self._touch(path, now, subtree=True)
        return out

    def _forget_watch(self, wd: int) -> None:
        path = self.wds.pop(wd, None)
        if path is not None and self.dirs.get(path) == wd:
            del self.dirs[path]

    def _watches_below(self, top: bytes) -> list[int]:
        return [wd for path, wd in self.dirs.items() if _moved(path, top, top) is not None]

    # --- events ------------------------------------------------------------------------

    def _touch(self, path: bytes, now: float, *, subtree: bool = False,
               busy: bool | None = None) -> None:
        p = self.pending.get(path)
        if p is None:
            p = self.pending[path] = _Pending()
        p.subtree |= subtree
        if busy is not None:
            p.busy = busy
        p.last = now
        if self.first is None:
            self.first = now
        self.last = now

    def rescan(self, path: bytes, now: float) -> None:
        """Have the next batch rescan `path` whole."""
        self._touch(path, now, subtree=True)

    def requeue(self, paths: Iterable[bytes], now: float) -> None:
        """Paths the publisher left for later: busy until quiet again."""
        for path in paths:
            self._touch(path, now, busy=True)

    def set_rules(self, rules: Rules, now: float) -> list[Action]:
        """New rules (a .p2pfsignore that changed): rescan everything."""
        if rules.same_as(self.rules):
            return []
        self.rules = rules
        self.rescan(b"/", now)
        return [(LOG, "the ignore rules changed; rescanning the whole tree"), (WATCH, b"/")]

    def feed(self, events: Iterable[tuple[int, int, int, bytes]], now: float) -> list[Action]:
        """Take inotify events (wd, mask, cookie, name); return what to do."""
        out: list[Action] = []
        for wd, mask, cookie, name in events:
            if mask & flags.Q_OVERFLOW:
                self.overflows += 1
                out.append((LOG, "inotify queue overflowed (events were lost); rescanning "
                                 "the whole tree"))
                out.append((WATCH, b"/"))
                self.rescan(b"/", now)
                continue
            parent = self.wds.get(wd)
            if parent is None:
                continue  # a watch dropped meanwhile
            if mask & flags.IGNORED:
                self._forget_watch(wd)
                continue
            if not name:
                if parent == b"/" and mask & (flags.DELETE_SELF | flags.MOVE_SELF):
                    out.append((FATAL, "the shared directory was deleted or moved"))
                elif mask & flags.UNMOUNT:
                    out.append((LOG, f"{os.fsdecode(parent)} was unmounted; rescanning it"))
                    self.rescan(parent, now)
                elif mask & flags.ATTRIB:
                    self._touch(parent, now)
                continue  # DELETE_SELF/MOVE_SELF of a subdirectory: its parent reports it
            path = _join(parent, name)
            is_dir = bool(mask & flags.ISDIR)
            if path == IGNORE_PATH and not is_dir and mask & (
                    flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE):
                out.append((RELOAD, None))
            ignored = self.rules.ignored(path, is_dir)
            if mask & flags.MOVED_TO:
                source = self.moved_from.pop(cookie, None) if cookie else None
                if ignored:  # the source (if any) left the tree: a deletion
                    if source is not None and source[1]:
                        for w in self._watches_below(source[0]):
                            self._forget_watch(w)
                            out.append((UNWATCH, w))
                    continue
                if source is not None:
                    self._rename(source[0], path, source[1], now)
                else:
                    self._arrived(path, is_dir, now, out)
                self._touch(parent, now)
                continue
            if ignored:
                continue
            self._touch(parent, now)
            if mask & flags.MOVED_FROM:
                self.moved_from[cookie] = (path, is_dir, now)
                self._touch(path, now, busy=False)
            elif mask & flags.CREATE:
                if is_dir:
                    self._arrived(path, True, now, out)
                else:
                    self._touch(path, now, busy=True)
            elif mask & flags.MODIFY:
                self._touch(path, now, busy=True)
            elif mask & (flags.CLOSE_WRITE | flags.DELETE):
                self._touch(path, now, busy=False)
            elif mask & flags.ATTRIB:
                self._touch(path, now)
        return out

    def _arrived(self, path: bytes, is_dir: bool, now: float, out: list[Action]) -> None:
        if is_dir:
            out.append((WATCH, path))
            self._touch(path, now, subtree=True, busy=False)
        else:
            self._touch(path, now, busy=False)

    def _rename(self, old: bytes, new: bytes, is_dir: bool, now: float) -> None:
        self.moves.append((old, new))
        moved = {}
        for path in list(self.pending):
            to = _moved(path, old, new)
            if to is not None:
                moved[to] = self.pending.pop(path)
        for path, p in moved.items():
            q = self.pending.get(path)
            self.pending[path] = p if q is None else _Pending(p.subtree or q.subtree,
                                                              p.busy or q.busy, max(p.last, q.last))
        if is_dir:
            for path in [p for p in self.dirs if _moved(p, old, new) is not None]:
                wd = self.dirs.pop(path)
                to = _moved(path, old, new)
                self.dirs[to] = wd
                self.wds[wd] = to
            self.unwatched = {_moved(p, old, new) or p for p in self.unwatched}
        self._touch(old, now, busy=False)
        self._touch(new, now)

    # --- batches -------------------------------------------------------------------------

    def due(self) -> float | None:
        """When the next batch should be taken (None: nothing to do)."""
        times = []
        if self.pending or self.moves:
            if self.first is not None:
                times.append(min(self.last + self.quiet, self.first + self.max_delay))
            else:
                times.append(self.last + self.quiet)
        if self.unwatched and self.next_poll is not None:
            times.append(self.next_poll)
        return min(times) if times else None

    def take(self, now: float) -> tuple[Changes, list[Action]]:
        """The batch to publish now, and actions (watches to drop, polls to retry).

        Busy files stay pending (listed in `Changes.busy` so that the
        publisher leaves their entries alone); so does a MOVED_FROM younger
        than PAIR_WINDOW, whose MOVED_TO may still be on its way."""
        out: list[Action] = []
        if self.unwatched and self.next_poll is not None and now >= self.next_poll:
            for path in sorted(self.unwatched):
                self._touch(path, now, subtree=True)
                out.append((WATCH, path))  # try again: the limit may have been raised
            self.next_poll = now + self.max_delay
        young = {path for path, _d, t in self.moved_from.values() if now - t < PAIR_WINDOW}
        for cookie, (path, is_dir, t) in list(self.moved_from.items()):
            if now - t >= PAIR_WINDOW:
                del self.moved_from[cookie]
                if is_dir:  # moved out of the tree: its watches would report wrong paths
                    for wd in self._watches_below(path):
                        self._forget_watch(wd)
                        out.append((UNWATCH, wd))
        changes = Changes(moves=self.moves)
        keep: dict[bytes, _Pending] = {}
        for path, p in self.pending.items():
            if path in young or (p.busy and now - p.last < self.quiet):
                keep[path] = p
                changes.busy.add(path)
            elif p.subtree:
                changes.subtrees.add(path)
            else:
                changes.paths.add(path)
        self.moves = []
        self.pending = keep
        self.first = now if keep else None
        return changes, out


class Watcher:
    """inotify on a whole tree, feeding a WatchState (the trio part)."""

    def __init__(self, root: str | os.PathLike, rules: Rules | None = None, *,
                 excludes: Iterable[str] = (), quiet: float = DEFAULT_QUIET,
                 max_delay: float = DEFAULT_MAX_DELAY,
                 log: Callable[[str], None] = lambda text: None):
        self.root = os.fsencode(os.path.abspath(root))
        self.excludes = list(excludes)
        self.state = WatchState(rules, quiet=quiet, max_delay=max_delay)
        self.log = log
        self.inotify = INotify(nonblocking=True)
        self._changed = trio.Event()
        self.fatal: str | None = None

    @property
    def rules(self) -> Rules:
        return self.state.rules

    def close(self) -> None:
        self.inotify.close()

    def now(self) -> float:
        return trio.current_time()

    # --- adding watches ------------------------------------------------------------------

    def watch_tree(self, top: bytes = b"/") -> int:
        """Watch `top` and every directory below it the rules keep; how many watches."""
        state = self.state
        count = 0
        stack = [top]
        while stack:
            path = stack.pop()
            local = self.root if path == b"/" else self.root + path
            try:
                wd = self.inotify.add_watch(local, WATCH_MASK)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone (or a file) already: its event will come
                self._run(state.watch_failed(path, exc.errno, self.now()))
                continue
            state.watched(wd, path)
            count += 1
            try:
                with os.scandir(local) as it:
                    for de in it:
                        child = _join(path, de.name)
                        if de.is_dir(follow_symlinks=False) and not state.rules.ignored_here(child, True):
                            stack.append(child)
            except OSError:
                continue  # vanished or unreadable: the rescan of its parent reports it
        return count

    def _run(self, actions: list[Action]) -> None:
        for kind, arg in actions:
            if kind == WATCH:
                self.watch_tree(arg)
            elif kind == UNWATCH:
                try:
                    self.inotify.rm_watch(arg)
                except OSError:
                    pass  # already gone
            elif kind == LOG:
                self.log(arg)
            elif kind == RELOAD:
                try:
                    rules = Rules.load(self.root, self.excludes)
                except UsageError as exc:
                    self.log(f"{exc}; keeping the rules as they were")
                    continue
                self._run(self.state.set_rules(rules, self.now()))
            elif kind == FATAL:
                self.fatal = arg

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- the loop ----------------------------------------------------------------------------

    def read_now(self) -> None:
        """Feed every event queued in the kernel (does not block)."""
        events = [(e.wd, e.mask, e.cookie, os.fsencode(e.name)) for e in self.inotify.read(timeout=0)]
        if events:
            self._run(self.state.feed(events, self.now()))
            self._wake()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Read events for ever (start it in a nursery)."""
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(self.inotify.fileno())
            self.read_now()

    async def next_batch(self) -> Changes:
        """Wait until a batch is due and return it (it may be empty of ready paths)."""
        while True:
            if self.fatal is not None:
                raise UsageError(f"{self.fatal}; stopped sharing {os.fsdecode(self.root)}")
            due = self.state.due()
            changed = self._changed
            if due is None:
                await changed.wait()
                continue
            with trio.move_on_at(due):
                await changed.wait()
            if self.fatal is None and self.now() >= due:
                self.read_now()  # what is queued belongs to this batch
                changes, actions = self.state.take(self.now())
                self._run(actions)
                if changes:
                    return changes

    def requeue(self, paths: Iterable[bytes]) -> None:
        self.state.requeue(paths, self.now())
        self._wake()
