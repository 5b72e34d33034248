"""Replication over real sockets on loopback, several homes per test (issue 3).

Run inside a loopback-only network namespace (scripts/test does):
    unshare -n -- bash -c 'ip link set lo up && .venv/bin/python -m pytest tests/test_net.py'
Seeders are real `p2pfs seed` processes; readers are `p2pfs cat/info`
processes, or `node.open_drive(..., peers=...)` in this process where a
test must watch a connected reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import trio

from helpers import REPO, cli_command, cli_env, create, run_cli, write_random
from p2pfs import crypto
from p2pfs.errors import ProtocolError
from p2pfs.node import open_drive
from p2pfs.store import Store
from p2pfs.wire import messages as m
from p2pfs.wire.connection import Connection, HandshakeComplete, capability


class Seeder:
    """A `p2pfs seed` process; `address` is where it listens."""

    def __init__(self, home, key: str, listen: str = "127.0.0.1:0"):
        self.proc = subprocess.Popen(cli_command(home, "seed", key, "--listen", listen),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=cli_env(), cwd=REPO)
        deadline = time.monotonic() + 20
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                self.kill()
                raise AssertionError("seeder did not print its address")
            ch = os.read(self.proc.stdout.fileno(), 1)
            if not ch:
                raise AssertionError(f"seeder exited: {self.proc.stderr.read().decode()}")
            line += ch
        assert line.startswith(b"listening on "), line
        self.address = line.split()[-1].decode()

    def stop(self, sig=signal.SIGINT) -> str:
        """A signal (SIGINT or SIGTERM), then its stderr; it must exit cleanly (0)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=15)
        assert self.proc.returncode == 0, err.decode()
        return err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=15)


@pytest.fixture
def seeders():
    started: list[Seeder] = []

    def start(home, key, listen="127.0.0.1:0"):
        s = Seeder(home, key, listen)
        started.append(s)
        return s
    yield start
    for s in started:
        s.kill()


def copy_home(src: Path, dst: Path) -> Path:
    """Another node holding the same drives (its own node key)."""
    shutil.copytree(src, dst)
    (dst / "node.key").unlink(missing_ok=True)  # homes of older versions had one
    return dst


def corrupt_blocks(home: Path, key: str, first: int = 0) -> int:
    """Flip a byte in every stored block >= first (a lying seeder)."""
    kb = crypto.decode_key(key)
    with Store(home) as st:
        blocks = [(i, bytes(d)) for i, d in st.iter_blocks(kb, first)]
        bad = [(i, bytes([d[0] ^ 0xFF]) + d[1:]) if d else (i, d) for i, d in blocks]
        st.put_block_items(kb, [b for b in bad if b[1]])
    return len(bad)


def drive_tree(root: Path, big: int = 0) -> Path:
    (root / "docs").mkdir(parents=True)
    for i in range(1, 10):
        (root / "docs" / f"f{i}.txt").write_text(f"this is file {i}\n" * (i * 10))
    if big:
        write_random(root / "big.bin", big, seed=7)
    return root


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


# --- acceptance 1: two homes -------------------------------------------------

def test_log_verify_info_with_peers_and_versions(tmp_path, seeders):
    """log, verify and info take --peer/--timeout and KEY@N like ls and cat
    (issue 7, 19); verify says what it could not check."""
    src = drive_tree(tmp_path / "src", big=1 << 20)
    a = tmp_path / "a"
    key = create(a, src, "-m", "first")
    (src / "docs" / "f10.txt").write_text("ten\n")
    run_cli(a, "import", "-q", "-m", "second", key, src)
    seeder = seeders(a, key)
    peer = ["--peer", seeder.address, "--timeout", "10"]
    b = tmp_path / "b"
    log = run_cli(b, "log", key, *peer).out.splitlines()
    assert [l.split()[1] for l in log] == ["2", "1"] and "second" in log[0] and "first" in log[1]
    assert [l.split()[1] for l in run_cli(b, "log", f"{key}@1", *peer).out.splitlines()] == ["1"]
    assert json.loads(run_cli(b, "info", f"{key}@1", "--json", *peer).stdout)["version"] == 1
    length = json.loads(run_cli(a, "info", key, "--json").stdout)["length"]
    r = run_cli(b, "verify", key, *peer)
    m = re.match(rf"ok: drive {key}, length {length}, (\d+) blocks .*; (\d+) blocks not held "
                 r"here were not checked$", r.out.strip())
    assert m and int(m.group(1)) + int(m.group(2)) == length and int(m.group(2)) > 10, r.out
    c = tmp_path / "c"
    r = run_cli(c, "verify", f"{key}@1", *peer)
    assert r.out.startswith(f"ok: drive {key}@1, length ")


def test_cat_from_a_seeder_fetches_only_what_it_reads(tmp_path, seeders):
    src = drive_tree(tmp_path / "src", big=3 << 20)
    a, b = tmp_path / "a", tmp_path / "b"
    key = create(a, src)
    seeder = seeders(a, key)
    res = run_cli(b, "cat", key, "/docs/f7.txt", "--peer", seeder.address)
    assert res.stdout == (src / "docs" / "f7.txt").read_bytes()
    info = __import__("json").loads(run_cli(b, "info", key, "--json").out)
    assert info["version"] == 1
    assert 0 < info["blocks_held"] <= 8, info
    assert info["bytes_held"] < 512 << 10
    # the big file arrives whole and right; then info --peer shows the seeder
    res = run_cli(b, "cat", key, "/big.bin", "--peer", seeder.address)
    assert hashlib.sha256(res.stdout).hexdigest() == sha(src / "big.bin")
    info = __import__("json").loads(run_cli(b, "info", key, "--json", "--peer", seeder.address).out)
    [peer] = info["peers"]
    assert peer["address"] == seeder.address and peer["length"] == info["length"]
    assert peer["blocks"] == info["length"]
    assert "stopped" in seeder.stop()


def test_unknown_key_and_unreachable_peer_are_clear_errors(tmp_path, seeders):
    a, b = tmp_path / "a", tmp_path / "b"
    key = create(a, drive_tree(tmp_path / "src"))
    other = crypto.encode_key(crypto.generate_keypair()[0])
    seeder = seeders(a, key)
    res = run_cli(b, "cat", other, "/docs/f1.txt", "--peer", seeder.address, "--timeout", "5", check=False)
    assert res.returncode == 1 and res.stdout == b""
    assert "no peer has drive" in res.stderr and seeder.address in res.stderr
    # a port nobody listens on: fails fast, naming it
    with trio_socket_port() as port:
        pass
    t = time.monotonic()
    res = run_cli(b, "cat", key, "/docs/f1.txt", "--peer", f"127.0.0.1:{port}", "--timeout", "5", check=False)
    assert res.returncode == 1 and f"127.0.0.1:{port}" in res.stderr and "unreachable" in res.stderr
    assert "connection refused" in res.stderr and "timed out" not in res.stderr  # issue 7, 19
    assert time.monotonic() - t < 5
    res = run_cli(b, "cat", key, "/x", "--peer", "nonsense", check=False)
    assert res.returncode == 2 and "HOST:PORT" in res.stderr


class trio_socket_port:
    """A free TCP port on 127.0.0.1 (bound, then released)."""

    def __enter__(self):
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


@pytest.mark.slow
def test_one_gib_file(tmp_path, seeders):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", 1 << 30, seed=3)
    a, b = tmp_path / "a", tmp_path / "b"
    key = create(a, src)
    want = sha(src / "big.bin")
    (src / "big.bin").unlink()
    seeder = seeders(a, key)
    proc = subprocess.Popen(cli_command(b, "cat", key, "/big.bin", "--peer", seeder.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=REPO)
    h = hashlib.sha256()
    while data := proc.stdout.read(1 << 20):
        h.update(data)
    assert proc.wait() == 0, proc.stderr.read().decode()
    assert h.hexdigest() == want


# --- acceptance 2: a lying seeder -------------------------------------------------

def test_liar_is_dropped_and_reported(tmp_path, seeders):
    src = drive_tree(tmp_path / "src", big=2 << 20)
    a = tmp_path / "a"
    key = create(a, src)
    c = copy_home(a, tmp_path / "c")
    liar = copy_home(a, tmp_path / "liar")
    assert corrupt_blocks(liar, key) > 30
    s_a, s_c, s_liar = seeders(a, key), seeders(c, key), seeders(liar, key)
    b = tmp_path / "b"
    res = run_cli(b, "cat", key, "/big.bin", "--peer", s_a.address, "--peer", s_liar.address,
                  "--peer", s_c.address)
    assert hashlib.sha256(res.stdout).hexdigest() == sha(src / "big.bin")
    assert s_liar.address in res.stderr and "fails verification" in res.stderr
    assert "will not ask it again" in res.stderr
    assert s_a.address not in res.stderr and s_c.address not in res.stderr
    assert run_cli(b, "verify", key).returncode == 0


def test_only_a_liar_gives_a_clear_error_and_no_wrong_byte(tmp_path, seeders):
    src = drive_tree(tmp_path / "src", big=1 << 20)
    a = tmp_path / "a"
    key = create(a, src)
    liar = copy_home(a, tmp_path / "liar")
    corrupt_blocks(liar, key)
    s_liar = seeders(liar, key)
    res = run_cli(tmp_path / "b", "cat", key, "/big.bin", "--peer", s_liar.address, "--timeout", "10",
                  check=False)
    assert res.returncode == 1
    assert res.stdout == b""
    assert "fails verification" in res.stderr and "not available" in res.stderr


# --- acceptance 3: seeders going away ------------------------------------------------

def _cat_until(b, key, path, peers, nbytes, timeout="30"):
    args = ["cat", key, path, "--timeout", timeout]
    for p in peers:
        args += ["--peer", p]
    proc = subprocess.Popen(cli_command(b, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(), cwd=REPO)
    head = proc.stdout.read(nbytes)
    assert len(head) == nbytes
    return proc, head


def test_seeder_killed_mid_transfer_finishes_from_another(tmp_path, seeders):
    src = drive_tree(tmp_path / "src", big=24 << 20)
    a = tmp_path / "a"
    key = create(a, src)
    c = copy_home(a, tmp_path / "c")
    s_a, s_c = seeders(a, key), seeders(c, key)
    proc, head = _cat_until(tmp_path / "b", key, "/big.bin", [s_a.address, s_c.address], 1 << 20)
    s_a.kill()  # the cat is blocked on its full pipe: mid-transfer
    rest = proc.stdout.read()
    assert proc.wait() == 0, proc.stderr.read().decode()
    assert hashlib.sha256(head + rest).hexdigest() == sha(src / "big.bin")


def test_frozen_seeder_is_worked_around(tmp_path, seeders):
    """A seeder that stops answering (SIGSTOP) without closing: its requests
    go to the other seeder after the stall timeout, and the read completes."""
    src = drive_tree(tmp_path / "src", big=24 << 20)
    a = tmp_path / "a"
    key = create(a, src)
    c = copy_home(a, tmp_path / "c")
    s_a, s_c = seeders(a, key), seeders(c, key)
    proc, head = _cat_until(tmp_path / "b", key, "/big.bin", [s_a.address, s_c.address], 1 << 20)
    s_a.proc.send_signal(signal.SIGSTOP)
    try:
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    finally:
        s_a.proc.send_signal(signal.SIGCONT)
    assert hashlib.sha256(head + rest).hexdigest() == sha(src / "big.bin")


def test_no_seeder_left_fails_within_timeout(tmp_path, seeders):
    src = drive_tree(tmp_path / "src", big=24 << 20)
    a = tmp_path / "a"
    key = create(a, src)
    s_a = seeders(a, key)
    proc, head = _cat_until(tmp_path / "b", key, "/big.bin", [s_a.address], 1 << 20, timeout="3")
    s_a.kill()
    t = time.monotonic()
    rest = proc.stdout.read()
    code = proc.wait()
    elapsed = time.monotonic() - t
    err = proc.stderr.read().decode()
    assert code == 1 and "did not arrive within 3 s" in err and s_a.address in err, err
    assert elapsed < 3 + 5
    assert len(head + rest) < 24 << 20
    data = (src / "big.bin").read_bytes()
    assert data.startswith(head + rest)  # what came out is right


# --- acceptance 4: live heads, replays and forks -------------------------------------

async def _wait_until(pred, timeout: float, what: str, explain=lambda: ""):
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"{what} within {timeout} s {explain()}")


async def test_new_version_seen_within_a_second_and_never_backward(tmp_path, seeders, capsys):
    src = drive_tree(tmp_path / "src")
    a = tmp_path / "a"
    key = create(a, src)
    fork = copy_home(a, tmp_path / "fork")     # the owner's key, a second history
    s_a = seeders(a, key)
    store_b = Store(tmp_path / "b")
    try:
        async with open_drive(store_b, key, peers=[s_a.address], timeout=10) as drive:
            v1 = drive.head.length
            old_head = drive.head
            (src / "docs" / "new.txt").write_text("version 2\n")
            await trio.run_process(cli_command(a, "import", "-q", key, src), env=cli_env(), cwd=REPO)
            published = trio.current_time()
            await _wait_until(lambda: drive.head.length > v1, 1.0, "B did not see version 2")
            assert trio.current_time() - published < 1.0
            v2 = drive.head
            assert await drive.refresh()
            assert (await drive.lookup("/docs/new.txt")).size == 10
            # a peer replays the (genuinely signed) version 1 head
            swarm = drive.source
            port = await swarm._nursery.start(_replaying_peer, drive.key, old_head)
            swarm.add_peer(f"127.0.0.1:{port}")
            await _wait_until(lambda: any(p["address"] == f"127.0.0.1:{port}" and p["length"] == v1
                                          for p in swarm.peer_info(drive.key)), 10,
                              "the replaying peer did not announce", lambda: swarm.peer_info(drive.key))
            assert drive.head == v2
            # a fork: the owner's key signs a different version 2 of the same length
            (src / "docs" / "new.txt").write_text("version X\n")
            run_cli(fork, "import", "-q", key, src)
            s_fork = seeders(fork, key)
            assert Store(fork).latest_head(drive.key).length == v2.length
            swarm.add_peer(s_fork.address)
            await _wait_until(lambda: store_b.forks(drive.key), 10, "fork was not recorded")
            assert drive.head == v2
    finally:
        store_b.close()
    assert "forked" in capsys.readouterr().err


async def _replaying_peer(key: bytes, head, task_status=trio.TASK_STATUS_IGNORED):
    """A listener that accepts the drive and announces an old signed head."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handler(stream):
        conn = Connection(False, crypto.x25519_keypair()[0], {crypto.discovery_key(key): key}.get)
        while True:
            data = await stream.receive_some(1 << 16)
            conn.receive_data(data)
            out = b""
            while (ev := conn.next_event()) is not None:
                if type(ev).__name__ == "ChannelOpened":
                    ch = conn.local_channel(key)
                    out += conn.send(m.Head(ch, head.length, head.root, head.signature))
                    out += conn.send(m.Have(ch, []))
            out += conn.data_to_send()
            if out:
                await stream.send_all(out)
            if not data:
                return
    await trio.serve_listeners(handler, listeners)


# --- acceptance 5 and 6: hostile peers and capabilities -----------------------------------

class RawPeer:
    """A hand-driven wire Connection over a real socket."""

    def __init__(self, stream, conn):
        self.stream, self.conn = stream, conn

    @classmethod
    async def connect(cls, address: str) -> "RawPeer":
        host, port = address.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        self = cls(stream, Connection(True, crypto.x25519_keypair()[0]))
        await self.stream.send_all(self.conn.data_to_send())
        await self.until(lambda ev: isinstance(ev, HandshakeComplete))
        return self

    async def until(self, pred, timeout=5.0):
        with trio.fail_after(timeout):
            while True:
                while (ev := self.conn.next_event()) is not None:
                    if pred(ev):
                        await self.stream.send_all(self.conn.data_to_send())
                        return ev
                out = self.conn.data_to_send()
                if out:
                    await self.stream.send_all(out)
                self.conn.receive_data(await self.stream.receive_some(1 << 16))

    async def raw_frames(self, timeout=5.0) -> list:
        """Decrypt whatever comes next without the Connection's channel logic."""
        from p2pfs.wire.frames import FrameDecoder
        dec = FrameDecoder()
        with trio.fail_after(timeout):
            dec.feed(await self.stream.receive_some(1 << 16))
        out = []
        while (f := dec.next_frame()) is not None:
            out.append(f)
        return out


async def test_wrong_capability_is_refused_like_an_unknown_drive(tmp_path, seeders):
    a = tmp_path / "a"
    key_text = create(a, drive_tree(tmp_path / "src"))
    key = crypto.decode_key(key_text)
    seeder = seeders(a, key_text)
    peer = await RawPeer.connect(seeder.address)
    # wait for the responder's secretstream header so that we can decrypt
    conn = peer.conn
    while conn._decryptor is None:
        conn.receive_data(await peer.stream.receive_some(1 << 16))
        while conn.next_event() is not None:
            pass
    replies = []
    for dk, cap in [
        (crypto.discovery_key(key), capability(conn.handshake_hash, False, key)),   # reflected role
        (crypto.discovery_key(key), bytes(32)),                                     # garbage
        (crypto.discovery_key(crypto.generate_keypair()[0]), bytes(32)),            # unknown drive
    ]:
        conn._queue(m.Open(7, dk, cap))
        await peer.stream.send_all(conn.data_to_send())
        [frame] = await peer.raw_frames()
        replies.append((len(frame), m.decode(conn._decryptor.decrypt(frame))))
    assert replies == [(replies[0][0], m.Reject(7))] * 3
    # the right capability opens the channel and the seeder announces its head
    conn._queue(m.Open(8, crypto.discovery_key(key), capability(conn.handshake_hash, True, key)))
    await peer.stream.send_all(conn.data_to_send())
    got = []
    with trio.fail_after(5):
        while not any(isinstance(x, m.Have) for x in got):
            for frame in await peer.raw_frames():
                got.append(m.decode(conn._decryptor.decrypt(frame)))
    assert isinstance(got[0], m.Open) and isinstance(got[1], m.Head)
    await peer.stream.aclose()
    seeder.stop()


async def test_garbage_peers_are_dropped_and_others_still_served(tmp_path, seeders):
    import random
    src = drive_tree(tmp_path / "src")
    a = tmp_path / "a"
    key = create(a, src)
    seeder = seeders(a, key)
    host, port = seeder.address.rsplit(":", 1)
    rnd = random.Random(5)
    hostile = [rnd.randbytes(rnd.randrange(1, 3000)) for _ in range(10)]
    hostile.append((1 << 31).to_bytes(4, "little") + b"x" * 100)  # oversized frame
    for data in hostile:
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(data)
        with trio.fail_after(15):  # the seeder hangs up (or waits for more: then we do)
            with trio.move_on_after(0.5):
                while await stream.receive_some(1 << 16):
                    pass
        await stream.aclose()
    # after a handshake: a frame that does not decrypt
    peer = await RawPeer.connect(seeder.address)
    await peer.stream.send_all(b"\x20\x00\x00\x00" + bytes(32))
    with trio.fail_after(5):
        while await peer.stream.receive_some(1 << 16):
            pass
    res = run_cli(tmp_path / "b", "cat", key, "/docs/f3.txt", "--peer", seeder.address)
    assert res.stdout == (src / "docs" / "f3.txt").read_bytes()
    err = seeder.stop(signal.SIGTERM)
    assert "fails authentication" in err or "malformed" in err
    assert "stopped" in err


async def test_a_peer_that_drops_the_first_connection_is_redialled(tmp_path, seeders):
    """A connection ended before the head arrived (a restarting seeder) is not
    the end: the reader redials and reads, instead of failing at once."""
    src = drive_tree(tmp_path / "src")
    a, b = tmp_path / "a", tmp_path / "b"
    key = create(a, src)
    seeder = seeders(a, key)
    host, port = seeder.address.rsplit(":", 1)
    accepted = 0

    async def relay(src_stream, dst_stream):
        try:
            while data := await src_stream.receive_some(1 << 16):
                await dst_stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await dst_stream.aclose()

    async def handle(client):
        nonlocal accepted
        accepted += 1
        if accepted == 1:
            await client.aclose()  # the first connection ends at once
            return
        upstream = await trio.open_tcp_stream(host, int(port))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, client, upstream)
            nursery.start_soon(relay, upstream, client)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        proxy = f"127.0.0.1:{listener.socket.getsockname()[1]}"
        res = await trio.run_process(cli_command(b, "cat", key, "/docs/f7.txt", "--peer", proxy,
                                                 "--timeout", "20"),
                                     capture_stdout=True, capture_stderr=True, check=False,
                                     env=cli_env(), cwd=REPO)
        nursery.cancel_scope.cancel()
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == (src / "docs" / "f7.txt").read_bytes()
    assert accepted >= 2
