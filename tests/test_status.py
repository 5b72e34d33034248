"""`p2pfs status` (issue 12): each long-running process publishes its state in
the home; a clean exit removes it, a `kill -9` leaves a file that is known
stale (its lock is free) and never listed as running.

The mounts here are real (FUSE) and always unmounted in a `finally`.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

from helpers import REPO, cli_env, create, make_tree, run_cli
from test_mount import foreground, mounted, wait_until
from p2pfs import status


def states(home) -> list[dict]:
    return json.loads(run_cli(home, "status", "--json").out)


def test_traffic_counts_peers_that_are_gone():
    t = status.Traffic()
    a = {"address": "127.0.0.5:5", "node_key": "aa", "dialled": True}
    b = {"address": "127.0.0.6:1", "node_key": "bb", "dialled": False}
    t.update([{**a, "bytes_sent": 10, "bytes_received": 100}])
    assert (t.up, t.down) == (10, 100)
    t.update([{**a, "bytes_sent": 15, "bytes_received": 150}, {**b, "bytes_sent": 1, "bytes_received": 2}])
    assert (t.up, t.down) == (16, 152)
    t.update([{**b, "bytes_sent": 3, "bytes_received": 4}])  # a went away: its bytes stay
    assert (t.up, t.down) == (18, 154)
    t.update([{**a, "bytes_sent": 1, "bytes_received": 1}])  # a new connection from a's address
    assert (t.up, t.down) == (19, 155)


def test_a_mount_is_listed_while_it_runs_and_not_after(tmp_path, home):
    key = create(home, make_tree(tmp_path / "src", files=10))
    mnt = tmp_path / "mnt"
    assert states(home) == []
    assert "no p2pfs process" in run_cli(home, "status").out
    with mounted(home, key, mnt) as pid:
        got = wait_until(lambda: states(home), what="the mount to publish its state")
        assert len(got) == 1
        st = got[0]
        assert st["pid"] == pid and st["kind"] == "mount"
        assert st["mountpoint"] == str(mnt)
        assert st["drives"][0]["key"] == key and st["drives"][0]["version"] == 1
        text = run_cli(home, "status").out
        assert f"mount   pid {pid}" in text and str(mnt) in text and key in text
        assert stat.S_IMODE(os.stat(home / "run").st_mode) == 0o700  # the home is private
        assert {stat.S_IMODE(p.stat().st_mode) for p in (home / "run").iterdir()} == {0o600}
        run_cli(home, "umount", mnt)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the mount process to exit")
    assert states(home) == []
    assert os.listdir(home / "run") == []  # the clean exit removed its files


def test_a_killed_process_is_not_listed_and_its_files_go(tmp_path, home):
    key = create(home, make_tree(tmp_path / "src", files=10))
    mnt = tmp_path / "mnt"
    with foreground(home, key, mnt) as proc:
        wait_until(lambda: states(home), what="the mount to publish its state")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert sorted(os.listdir(home / "run")) == [f"{proc.pid}.json", f"{proc.pid}.lock"]
        assert states(home) == []
        assert os.listdir(home / "run") == []


def test_a_live_process_is_told_from_a_dead_one_by_its_lock(tmp_path, home):
    """Two processes publish; one is killed: only the other is listed, even
    though both files are there and (on a busy machine) equally fresh."""
    code = ("import sys, time\nfrom p2pfs import status\n"
            "s = status.StatusFile(sys.argv[1], 'test').open()\n"
            "s.write({'n': int(sys.argv[2])})\nprint('ready', flush=True)\ntime.sleep(600)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(home), str(n)], env=cli_env(),
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for n in (1, 2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        assert sorted(s["n"] for s in status.read_all(home, clean=False)) == [1, 2]
        procs[0].kill()
        procs[0].wait()
        assert [s["n"] for s in status.read_all(home)] == [2]
        assert sorted(os.listdir(home / "run")) == [f"{procs[1].pid}.json", f"{procs[1].pid}.lock"]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_share_is_listed_with_its_directory(tmp_path, home):
    from test_share import sharing
    src = make_tree(tmp_path / "src", files=5)
    with sharing(home, src) as share:
        st = wait_until(lambda: [s for s in states(home) if s["drives"]], what="the share's state")[0]
        assert st["kind"] == "share" and st["directory"] == str(src)
        assert st["drives"][0]["key"] == share.key and st["drives"][0]["version"] == 1
        assert st["listen"] == [share.address] and "bytes_up" in st
    assert states(home) == []


def test_a_change_of_state_is_published_at_once(tmp_path, home):
    """StatusFile.changed() writes the state now, not at the next tick."""
    import trio

    async def main():
        box = {"n": 0}
        async with trio.open_nursery() as nursery:
            st = await nursery.start(status.publish, home, "test", lambda: dict(box))
            assert status.read_all(home)[0]["n"] == 0
            box["n"] = 1
            st.changed()
            started = trio.current_time()
            while status.read_all(home)[0]["n"] != 1:
                await trio.sleep(0.005)
            assert trio.current_time() - started < status.INTERVAL / 2
            nursery.cancel_scope.cancel()
        assert status.read_all(home) == []

    trio.run(main)
