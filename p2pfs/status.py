"""What the p2pfs processes using a home are doing: `p2pfs status`.

Theory of operation
-------------------
Every long-running process (mount, seed, share, mirror --live) publishes
its state as `HOME/run/PID.json`, replaced atomically (`write_private_file`)
every `INTERVAL` seconds, and holds an exclusive `flock` on
`HOME/run/PID.lock` from before its first state until it exits.  The
kernel drops the lock when the process ends however it ends, so a reader
that *can* take the lock knows the writer is gone (`kill -9`, a crash): its
files are stale, and `read_all` removes them.  A clean exit removes both
files itself.  PIDs are reused: a new process with the same PID opens and
locks the same lock file (waiting for a reader's short probe), and
overwrites the state.

The state is a JSON object; `snapshot()` (the process's own callback)
gives its fields, this module adds `pid`, `kind`, `started`, `updated` and
the traffic: `bytes_up`, `bytes_down` (every peer this process has talked
to, peers gone included) and `rate_up`, `rate_down` (bytes per second over
the last interval).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable

import trio

from .store import make_private_dir, open_private, write_private_file

RUN_DIR = "run"
INTERVAL = 1.0  # s between state writes


class Traffic:
    """Bytes up and down over every peer a swarm has had (from `peer_info`
    lists), monotone although peers come and go."""

    def __init__(self):
        self._seen: dict[tuple, tuple[int, int]] = {}
        self._gone_up = self._gone_down = 0
        self.up = self.down = 0

    def update(self, peers: list[dict]) -> None:
        now = {}
        for p in peers:
            ident = (p.get("address"), p.get("node_key"), p.get("dialled"))
            now[ident] = (int(p.get("bytes_sent", 0)), int(p.get("bytes_received", 0)))
        for ident, (up, down) in self._seen.items():
            if ident not in now:
                self._gone_up += up
                self._gone_down += down
        self._seen = now
        self.up = self._gone_up + sum(u for u, _d in now.values())
        self.down = self._gone_down + sum(d for _u, d in now.values())


class StatusFile:
    """This process's entry in HOME/run (see the module docstring)."""

    def __init__(self, home: str | os.PathLike, kind: str):
        self.dir = Path(home) / RUN_DIR
        self.kind = kind
        self.pid = os.getpid()
        self.path = self.dir / f"{self.pid}.json"
        self.lock_path = self.dir / f"{self.pid}.lock"
        self.started = time.time()
        self._fd: int | None = None
        self._last: tuple[float, int, int] | None = None
        self._wake = None  # set by `publish`: its loop waits on it

    def changed(self) -> None:
        """Write the state now rather than at the next tick (from the trio thread)."""
        if self._wake is not None:
            self._wake.set()

    def open(self) -> "StatusFile":
        make_private_dir(self.dir)
        self._fd = open_private(self.lock_path, os.O_RDWR)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # a reader's probe holds it for an instant only
        return self

    def write(self, fields: dict, traffic: Traffic | None = None) -> dict:
        now = time.time()
        state = {"pid": self.pid, "kind": self.kind, "started": self.started, "updated": now,
                 **fields}
        if traffic is not None:
            rate_up = rate_down = 0.0
            if self._last is not None and now > self._last[0]:
                dt = now - self._last[0]
                rate_up = max(0, traffic.up - self._last[1]) / dt
                rate_down = max(0, traffic.down - self._last[2]) / dt
            self._last = (now, traffic.up, traffic.down)
            state.update(bytes_up=traffic.up, bytes_down=traffic.down,
                         rate_up=round(rate_up), rate_down=round(rate_down))
        # rewritten every second from the trio thread: no fsync (a process
        # that dies leaves a stale file, which readers drop anyway)
        write_private_file(self.path, json.dumps(state).encode() + b"\n", durable=False)
        return state

    def close(self) -> None:
        for path in (self.path, self.lock_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


async def publish(home, kind: str, snapshot: Callable[[], dict],
                  peers: Callable[[], list[dict]] | None = None, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Publish this process's state every INTERVAL seconds (and at once after
    `StatusFile.changed()`; `task_status` gets the StatusFile) until
    cancelled, then remove it.  `peers()` gives the swarm's `peer_info` list
    (traffic)."""
    status = StatusFile(home, kind).open()
    traffic = Traffic() if peers is not None else None
    try:
        task_status.started(status)
        while True:
            status._wake = trio.Event()
            if traffic is not None:
                traffic.update(peers())
            try:
                status.write(snapshot(), traffic)
            except OSError:
                pass  # no descriptor or no space this second: the state is only a report
            with trio.move_on_after(INTERVAL):
                await status._wake.wait()
    finally:
        status.close()


def _alive(lock_path: Path) -> bool:
    """Whether a process holds the lock (False: its owner is gone)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def read_all(home, clean: bool = True) -> list[dict]:
    """The states of the live processes of `home`, oldest first; stale files
    (their process is gone) are removed if `clean`."""
    run = Path(home) / RUN_DIR
    out = []
    try:
        names = sorted(os.listdir(run))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".json") or not name[:-5].isdigit():
            continue
        path = run / name
        lock = run / (name[:-5] + ".lock")
        if not _alive(lock):
            if clean:
                for p in (path, lock):
                    try:
                        p.unlink()
                    except FileNotFoundError:
                        pass
            continue
        try:
            state = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue  # being replaced, or damaged: the next write fixes it
        if isinstance(state, dict):
            out.append(state)
    out.sort(key=lambda s: (s.get("started", 0), s.get("pid", 0)))
    return out
