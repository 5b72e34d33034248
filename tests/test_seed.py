"""`p2pfs seed KEY...` of drives this home does not own (issue 12, acceptance
1, 4 and 5): a full verified copy, followed and served; resumed after
`kill -9`; progress on a terminal, in a pipe and as JSON lines.

Several homes per test, real seeders, mounts and sockets on loopback: run
under `unshare -n` (as scripts/test does).  Every process is stopped in a
`finally`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path


from helpers import REPO, cli_command, cli_env, create, make_tree, run_cli, stop_process, write_random
from test_mount import mounted, wait_until
from test_mount_net import seeding
from test_share import same_tree

MiB = 1 << 20


class Running:
    """A running `p2pfs ARGS...` whose standard output (JSON lines with
    --json) goes to a file, read while it runs; stderr: a log."""

    def __init__(self, home: Path, *argv):
        self.home = home
        self.what = argv[0]
        self.out_path = home.parent / f"{self.what}-{time.monotonic_ns()}.out"
        self.err_path = self.out_path.with_suffix(".err")
        self.out = open(self.out_path, "w+")
        self.err = open(self.err_path, "w+")
        self.proc = subprocess.Popen(cli_command(home, *argv), env=cli_env(), cwd=REPO,
                                     stdout=self.out, stderr=self.err)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.out_path.read_text().splitlines() if line]

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, predicate, what: str, timeout: float = 60):
        def check():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.what} exited {self.proc.returncode}: {self.stderr()}")
            return predicate(self.events())
        return wait_until(check, timeout, what, interval=0.05)

    def stop(self, sig=signal.SIGTERM) -> int:
        code = stop_process(self.proc, sig)
        self.out.close()
        self.err.close()
        return code


class Seed(Running):
    """A running `p2pfs seed ... --json`, listening on loopback."""

    def __init__(self, home: Path, *args, json_lines: bool = True):
        super().__init__(home, "seed", *args, "--listen", "127.0.0.1:0", "--no-lan", "--no-dht",
                         *(["--json"] if json_lines else []))

    @property
    def address(self) -> str:
        return self.wait(lambda ev: next((e["address"] for e in ev if e["event"] == "listening"),
                                         None), "the seed to listen")

    def complete(self, version: int, timeout: float = 60) -> dict:
        return self.wait(lambda ev: next((e for e in ev if e["event"] == "complete"
                                          and e["version"] == version), None),
                         f"the seed to complete version {version}", timeout)


@contextmanager
def seed(home, *args, **kwargs):
    s = Seed(home, *args, **kwargs)
    try:
        yield s
    finally:
        s.stop()


def info(home, key) -> dict:
    return json.loads(run_cli(home, "info", key, "--json").out)


def test_acceptance_1_a_full_copy_serves_when_the_owner_is_gone(tmp_path, home, home2):
    """B seeds from A; at 100 % A stops; C reads every file from B alone and
    `verify` passes on B and C."""
    src = make_tree(tmp_path / "src", files=120, big=6 * MiB)
    key = create(home, src)
    (src / "second.txt").write_text("version 2\n")  # a second version: every version is copied
    run_cli(home, "import", "-q", key, src)
    home3 = tmp_path / "home3"
    home3.mkdir()
    owner = seeding(home, key)
    addr_a = owner.__enter__()
    try:
        with seed(home2, key, "--peer", addr_a) as b:
            done = b.complete(2)
            assert done["bytes_held"] == info(home, key)["bytes_held"]
            progress = [e for e in b.events() if e["event"] == "progress"]
            assert progress and progress[-1]["percent"] == 100
            owner.__exit__(None, None, None)
            owner = None
            got = info(home2, key)
            assert got["state"] == "pinned" and got["blocks_held"] == got["length"]
            with mounted(home3, key, tmp_path / "mnt", "--peer", b.address, "--no-lan",
                         "--no-dht"):
                same_tree(src, tmp_path / "mnt")
            assert run_cli(home3, "cat", f"{key}@1", "/run.sh", "--peer", b.address,
                           "--no-lan", "--no-dht").stdout == (src / "run.sh").read_bytes()
        run_cli(home2, "verify", key)
        run_cli(home3, "verify", key)
    finally:
        if owner is not None:
            owner.__exit__(None, None, None)


def test_seed_follows_new_versions_and_latest_takes_only_the_newest(tmp_path, home, home2):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "old.bin", 2 * MiB, seed=1)
    key = create(home, src)
    (src / "old.bin").unlink()
    write_random(src / "new.bin", MiB, seed=2)
    run_cli(home, "import", "-q", key, src)
    home3 = tmp_path / "home3"
    home3.mkdir()
    with seeding(home, key) as addr:
        with seed(home2, key, "--peer", addr) as every, seed(home3, key, "--peer", addr,
                                                               "--latest") as latest:
            every.complete(2)
            assert latest.complete(2)["mode"] == "latest"
            held = info(home3, key)["bytes_held"]
            assert MiB < held < 2 * MiB  # v2's file and the index, not v1's file
            write_random(src / "newer.bin", MiB // 2, seed=3)
            run_cli(home, "import", "-q", key, src)
            every.complete(3)
            got = latest.complete(3)
            # only the file that changed was fetched for version 3
            assert got["bytes_held"] - held < MiB // 2 + 64 * 1024
        assert info(home2, key)["bytes_held"] == info(home, key)["bytes_held"]
        assert run_cli(home3, "cat", key, "/newer.bin").stdout == (src / "newer.bin").read_bytes()
        assert run_cli(home2, "cat", f"{key}@1", "/old.bin").stdout == \
            run_cli(home, "cat", f"{key}@1", "/old.bin").stdout
    run_cli(home2, "verify", key)
    run_cli(home3, "verify", key)


def test_seed_without_a_key_follows_the_pinned_drives(tmp_path, home, home2):
    r = run_cli(home2, "seed", "--no-lan", "--no-dht", check=False)
    assert r.returncode == 1 and "pin" in r.stderr
    src = make_tree(tmp_path / "src", files=20)
    key = create(home, src)
    own = create(home2, make_tree(tmp_path / "own", files=5))
    with seeding(home, key) as addr:
        run_cli(home2, "pin", key, "--peer", addr)
        (src / "later.txt").write_text("later\n")
        run_cli(home, "import", "-q", key, src)
        with seed(home2, "--peer", addr) as s:
            s.complete(2)
            serving = s.wait(lambda ev: [e for e in ev if e["event"] == "serving"],
                             "the owned drive to be served")
            assert [e["key"] for e in serving] == [own]
    assert run_cli(home2, "cat", key, "/later.txt").stdout == b"later\n"


class Throttle:
    """A TCP relay on 127.0.0.1 passing at most `rate` bytes per second each way."""

    def __init__(self, target: str, rate: int, port: int = 0):
        host, _, target_port = target.rpartition(":")
        self.target = (host, int(target_port))
        self.rate = rate
        self.sock = socket.create_server(("127.0.0.1", port))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            if self.closed:
                a.close()
                return
            try:
                b = socket.create_connection(self.target)
            except OSError:
                a.close()
                continue
            self.conns += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        start = time.monotonic()
        sent = 0
        try:
            while data := src.recv(16384):
                sent += len(data)
                ahead = sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        """Stop listening and end every relayed connection (both ends see EOF:
        a close alone wakes neither a pump blocked in recv nor the accept, which
        would then relay one more connection)."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def test_acceptance_4_seed_killed_mid_transfer_resumes(tmp_path, home, home2):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", 24 * MiB, seed=3)
    key = create(home, src)
    total = info(home, key)["bytes_held"]
    with seeding(home, key) as addr:
        slow = Throttle(addr, 6 * MiB)
        try:
            first = Seed(home2, key, "--peer", slow.address)
            try:
                first.wait(lambda ev: any(e["event"] == "progress" and 25 <= e["percent"] < 75
                                          for e in ev), "the first seed to be half-way")
                wait_until(lambda: any(s["pid"] == first.proc.pid for s in
                                       json.loads(run_cli(home2, "status", "--json").out)),
                           what="the seed to be listed by status")
                first.stop(signal.SIGKILL)
            finally:
                first.stop()
        finally:
            slow.close()
        listed = json.loads(run_cli(home2, "status", "--json").out)
        assert all(s["pid"] != first.proc.pid for s in listed)  # dead: not listed as running
        held = info(home2, key)["bytes_held"]
        assert total // 5 < held < total * 4 // 5, (held, total)
        with seed(home2, key, "--peer", addr) as again:
            again.complete(1)
            start = next(e for e in again.events() if e["event"] == "version")
            assert start["bytes_done"] == held  # what was held counts as done: not fetched again
            st = wait_until(lambda: [s for s in json.loads(run_cli(home2, "status", "--json").out)
                                     if s["pid"] == again.proc.pid
                                     and s["drives"][0]["state"] == "complete"],
                            what="the new seed's traffic in status")[0]
            # the traffic is what was missing (plus proofs and messages), not the whole drive
            assert st["bytes_down"] < (total - held) * 1.1 + 256 * 1024, (st, held, total)
            assert st["drives"][0]["state"] == "complete"
    run_cli(home2, "verify", key)


def test_acceptance_5_progress_on_a_terminal_in_a_pipe_and_as_json(tmp_path, home, home2):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", 72 * MiB, seed=4)
    key = create(home, src)
    homes = [tmp_path / f"h{i}" for i in range(3)]
    for h in homes:
        h.mkdir()
    with seeding(home, key) as addr:
        slow = Throttle(addr, 24 * MiB)
        try:
            base = ["seed", key, "--peer", slow.address, "--listen", "127.0.0.1:0", "--no-lan",
                    "--no-dht"]
            # a terminal: `script` gives the command a pty
            cmd = " ".join(shlex.quote(c) for c in cli_command(homes[0], *base))
            tty = subprocess.Popen(["script", "-qfec", cmd, "/dev/null"], env=cli_env(), cwd=REPO,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            pipe = Seed(homes[1], key, "--peer", slow.address, json_lines=False)
            js = Seed(homes[2], key, "--peer", slow.address)
            try:
                js.complete(1, timeout=90)
                wait_until(lambda: "complete" in pipe.stderr(), 90, "the piped seed to complete")
                wait_until(lambda: info(homes[0], key)["blocks_held"] == info(home, key)["blocks_held"],
                           90, "the terminal's seed to complete")
            finally:
                tty.send_signal(signal.SIGTERM)
                screen = tty.communicate(timeout=30)[0].decode(errors="replace")
                pipe.stop()
                js.stop()
        finally:
            slow.close()
    # terminal: the bar is redrawn in place (cursor movement), many times, with rate and ETA
    assert "\x1b[" in screen, screen[-2000:]
    percents = set(re.findall(r"(\d+)%", screen))
    assert len(percents) >= 4, percents
    assert "MB/s" in screen or "MiB/s" in screen
    # pipe: plain lines, one per step (no escapes, no carriage returns), 10 % apart
    text = pipe.stderr()
    assert "\x1b" not in text and "\r" not in text
    lines = [l for l in text.splitlines() if l.startswith("p2pfs: seed: ")]
    assert any(": version 1, length " in l and "to fetch" in l for l in lines)
    steps = [int(m) for l in lines for m in re.findall(r": (\d+)% \(", l)]
    assert steps == sorted(set(steps)) and len(steps) >= 5 and steps[-1] == 100, steps
    assert any("complete: version 1" in l for l in lines)
    assert "listening on 127.0.0.1:" in pipe.out_path.read_text()
    # JSON lines: every line of standard output is one object
    events = js.events()
    kinds = [e["event"] for e in events]
    for want in ("listening", "ready", "version", "progress", "complete"):
        assert want in kinds, kinds
    prog = [e for e in events if e["event"] == "progress"]
    assert all({"bytes_done", "bytes_total", "rate", "eta", "peers", "version", "percent"} <= e.keys()
               for e in prog)
    assert [e["bytes_done"] for e in prog] == sorted(e["bytes_done"] for e in prog)


def test_verbose_seed_logs_peers_and_what_they_were_sent(tmp_path, home, home2):
    src = make_tree(tmp_path / "src", files=10, big=2 * MiB)
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with seed(home, key, "-v") as s:
        with mounted(home2, key, mnt, "--peer", s.address, "--no-lan", "--no-dht"):
            assert (mnt / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
            served = s.wait(lambda ev: [e for e in ev if e["event"] == "served"],
                            "a report of what was served", timeout=30)
            assert served[0]["blocks"] >= 32 and served[0]["bytes"] >= 2 * MiB
        gone = s.wait(lambda ev: [e for e in ev if e["event"] == "peer"
                                  and e["state"] == "disconnected"], "the reader to go")
        assert gone[0]["blocks_sent"] >= 32
        states = [e["state"] for e in s.events() if e["event"] == "peer"]
        assert states[:2] == ["connected", "opened"], states
    # without --json: one line each on standard error (another reader, holding nothing)
    home3 = tmp_path / "home3"
    home3.mkdir()
    with seed(home, key, "-v", json_lines=False) as s:
        addr = wait_until(lambda: (re.search(r"listening on (\S+)", s.out_path.read_text())
                                   or [None, None])[1], what="the seed to listen")
        with mounted(home3, key, mnt, "--peer", addr, "--no-lan", "--no-dht"):
            (mnt / "big.bin").read_bytes()
            wait_until(lambda: "served" in s.stderr(), what="the served line")
        wait_until(lambda: "disconnected: sent" in s.stderr(), what="the disconnected line")
        assert re.search(r"peer 127\.0\.0\.1:\d+ connected \(node [0-9a-f]{16}", s.stderr())
        assert f"opened drive {key}" in s.stderr()


def test_seed_daemon_returns_once_serving(tmp_path, home, home2):
    key = create(home, make_tree(tmp_path / "src", files=10))
    r = run_cli(home, "seed", key, "--daemon", "--listen", "127.0.0.1:0", "--no-lan", "--no-dht")
    pid = int(re.search(r"\(pid (\d+)\)", r.stderr).group(1))
    try:
        addr = re.search(r"listening on (\S+)", r.out).group(1)
        assert "seeding 1 drive" in r.stderr
        got = json.loads(run_cli(home, "status", "--json").out)
        assert [(s["kind"], s["pid"]) for s in got] == [("seed", pid)]
        assert got[0]["listen"] == [addr]
        assert run_cli(home2, "cat", key, "/run.sh", "--peer", addr, "--no-lan",
                       "--no-dht").stdout == b"#!/bin/sh\necho hi\n"
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                   open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z", what="the daemon to stop")
    assert "seeding 1 drive" in (home / "seed.log").read_text()


def test_a_walk_past_its_bound_says_so(tmp_path, monkeypatch):
    """download.walk stops at MAX_WALK entries (a bound on what one version
    may cost); it used to stop without a word, and a seed of pinned folders
    then called a partial copy complete."""
    import trio

    from p2pfs import download
    from p2pfs.drive import Drive
    from p2pfs.publish import create_drive
    from p2pfs.store import Store

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_text("x")
    monkeypatch.setattr(download, "MAX_WALK", 3)
    with Store(tmp_path / "home") as store:
        key = create_drive(store, src).key

        async def walk():
            drive = await Drive(store, key).open()
            warned = []
            drive.warn = warned.append
            return await download.walk(drive), warned
        out, warned = trio.run(walk)
    assert len(out) == 4
    assert len(warned) == 1 and "more than 3 entries below /" in warned[0], warned
