"""Progress of a long write for a person: a bar on a terminal, a few plain lines in a pipe.

Implements `publish.Progress` (`start(nbytes, files)`, `advance(nbytes, files)`).
On a terminal (standard error is a TTY) a rich bar shows files, bytes, rate
and time left; otherwise, for a write of at least `PLAIN_BYTES` or
`PLAIN_FILES`, one line when it starts and one at every quarter.
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
