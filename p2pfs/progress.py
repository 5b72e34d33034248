"""Progress for a person: a bar on a terminal, a few plain lines in a pipe, JSON lines for scripts.

`Bar` implements `publish.Progress` (`start(nbytes, files)`, `advance(nbytes,
files)`).  On a terminal (standard error is a TTY) a rich bar shows files,
bytes, rate and time left; otherwise, for a write of at least `PLAIN_BYTES`
or `PLAIN_FILES`, one line when it starts and one at every quarter.

`Live` shows long transfers (`seed`, `mirror`): a bar per drive on a
terminal, plain lines per step in a pipe, or JSON lines.
"""

from __future__ import annotations

import sys
import threading
import time

PLAIN_BYTES = 64 << 20
PLAIN_FILES = 10_000


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Bar:
    """Progress of one write (`what` names it: create, import, share)."""

    def __init__(self, quiet: bool, what: str):
        self.quiet = quiet
        self.what = what
        self.total = self.files = 0
        self.done = self.files_done = 0
        self.started = 0.0
        self.next_report = 0
        self.plain = False
        self.bar = None
        self.task = None
        self._lock = threading.Lock()  # share reports from its publishing thread

    def start(self, nbytes: int, files: int) -> None:
        with self._lock:
            self.total, self.files = nbytes, files
            self.done = self.files_done = 0
            self.started = time.monotonic()
            if self.quiet:
                return
            if sys.stderr.isatty():
                from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                           TimeRemainingColumn, TransferSpeedColumn)
                if self.bar is None:
                    self.bar = Progress(TextColumn(self.what), BarColumn(),
                                        TextColumn("{task.fields[files]} files"), DownloadColumn(),
                                        TransferSpeedColumn(), TimeRemainingColumn(),
                                        transient=True)
                    self.bar.start()
                else:
                    self.bar.remove_task(self.task)
                self.task = self.bar.add_task(self.what, total=nbytes, files=f"0/{files}")
            elif nbytes >= PLAIN_BYTES or files >= PLAIN_FILES:
                self.plain = True
                _err(f"{self.what}: {files} files, {size_text(nbytes)} to read")
                self.next_report = 25

    def advance(self, nbytes: int, files: int = 0) -> None:
        with self._lock:
            self.done += nbytes
            self.files_done += files
            if self.bar is not None:
                self.bar.update(self.task, completed=self.done,
                                files=f"{self.files_done}/{self.files}")
            elif self.plain:
                pct = self._percent()
                finished = self.files_done >= self.files and self.done >= self.total
                if pct >= self.next_report and (pct < 100 or finished):
                    self._line(pct)
                    self.next_report = pct // 25 * 25 + 25

    def _percent(self) -> int:
        if self.total:
            return min(100, self.done * 100 // self.total)
        return self.files_done * 100 // max(self.files, 1)

    def _line(self, pct: int) -> None:
        took = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / took
        left = (self.total - self.done) / rate if rate > 0 and pct < 100 else 0.0
        _err(f"{self.what}: {pct}% ({self.files_done}/{self.files} files, "
             f"{size_text(self.done)} of {size_text(self.total)}, {size_text(rate)}/s, "
             f"{left:.0f} s left)")

    def stop(self) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.stop()
                self.bar = None
            self.plain = False


class Live:
    """Progress of long transfers (`seed`, `mirror`), one item per drive.

    Three faces, chosen once: on a terminal (standard error is a TTY) a rich
    bar per item, updated in place (bytes, rate, time left, and an `info`
    text: peers, version); in a pipe, one plain line on standard error per
    step (`step`) and at every `PLAIN_STEP` percent of an item; with
    `json_lines`, one JSON object per line on standard output: every step
    (`{"event": ..., ...}`) and, at most every `JSON_INTERVAL` seconds while
    an item moves, a `progress` event.  `quiet` keeps only the JSON and the
    steps marked `warning` (what was refused: a quiet run that exits 1 still
    names why).
    """

    PLAIN_STEP = 10
    JSON_INTERVAL = 1.0

    def __init__(self, what: str, *, json_lines: bool = False, quiet: bool = False):
        self.what = what
        self.json_lines = json_lines
        self.quiet = quiet
        self.items: dict[str, dict] = {}
        self.bar = None
        self._tasks: dict[str, int] = {}
        self._lock = threading.Lock()
        if not json_lines and not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.percentage:>3.0f}%"), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"),
                                console=Console(stderr=True), transient=False)
            self.bar.start()

    def step(self, text: str, event: str, *, warning: bool = False, **fields) -> None:
        """A step: a line for a person (`text`), an `event` object for scripts.
        A `warning` is shown even when quiet."""
        with self._lock:
            if self.json_lines:
                _json_line({"event": event, **fields})
            elif self.quiet and not warning:
                return
            elif self.bar is not None:
                self.bar.console.print(f"{self.what}: {text}", markup=False, highlight=False)
            else:
                _err(f"p2pfs: {self.what}: {text}")

    def update(self, name: str, *, done: int, total: int | None, info: str = "",
               **fields) -> None:
        """Item `name` has `done` of `total` bytes (None: not known yet)."""
        now = time.monotonic()
        with self._lock:
            item = self.items.get(name)
            if item is None or total != item["total"]:
                item = self.items[name] = {"done": done, "total": total, "start": now,
                                           "start_done": done, "reported": -1, "json_at": 0.0}
            item.update(done=done, total=total, info=info, fields=fields, at=now)
            pct = self._percent(item)
            if self.bar is not None:
                task = self._tasks.get(name)
                if task is None:
                    label = name if len(name) <= 16 else name[:12] + "…"
                    task = self._tasks[name] = self.bar.add_task(label, total=total, info=info)
                self.bar.update(task, completed=done, total=total, info=info)
            elif not self.json_lines and not self.quiet and pct is not None \
                    and (total or 0) >= PLAIN_BYTES:
                step = pct // self.PLAIN_STEP * self.PLAIN_STEP
                if step > item["reported"] and (pct < 100 or done >= (total or 0)):
                    item["reported"] = step
                    _err(f"p2pfs: {self.what}: {name}: {pct}% ({size_text(done)} of "
                         f"{size_text(total)}, {size_text(self.rate(item))}/s, "
                         f"{self.eta(item):.0f} s left{', ' + info if info else ''})")
            if self.json_lines and (now - item["json_at"] >= self.JSON_INTERVAL
                                    or (pct == 100 and item["reported"] < 100)):
                item["json_at"] = now
                if pct == 100:
                    item["reported"] = 100
                _json_line({"event": "progress", "item": name, "bytes_done": done,
                            "bytes_total": total, "percent": pct,
                            "rate": round(self.rate(item)), "eta": round(self.eta(item), 1),
                            **fields})

    @staticmethod
    def _percent(item: dict) -> int | None:
        total = item["total"]
        if total is None:
            return None
        return 100 if total <= 0 else min(100, item["done"] * 100 // total)

    @staticmethod
    def rate(item: dict) -> float:
        took = item["at"] - item["start"]
        return (item["done"] - item["start_done"]) / took if took > 0 else 0.0

    def eta(self, item: dict) -> float:
        rate = self.rate(item)
        total = item["total"] or 0
        return (total - item["done"]) / rate if rate > 0 and total > item["done"] else 0.0

    def restart(self, name: str) -> None:
        """Rate and ETA of `name` count from now (a new version to fetch)."""
        with self._lock:
            self.items.pop(name, None)

    def stop(self) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.stop()
                self.bar = None


def _json_line(obj: dict) -> None:
    import json
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
