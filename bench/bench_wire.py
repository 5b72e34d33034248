"""The sans-IO wire alone: 64 KiB blocks through two `Connection`s in memory,
protocol version 1 (the Connection before the fast wire) against version 2.

For each suite: GB/s of block bytes per direction (the responder encoding
and encrypting replies, the requester decrypting and decoding them), the
time per block on each side, and the part of it that is not the cipher
(total minus the same cipher over the same bytes, measured in this run):
the Python cost per block.  No sockets, no tree, no store.

Version 1 answers one block per Data message, encrypted with libsodium
secretstream; version 2 answers runs of 16 blocks (1 MiB) per Data message
with a leaf per block, sealed in place by OpenSSL.  Version 1's code is
taken from git (the parent of the commit that replaced its prologue), so
both run in this process, alternating, medians of the rounds.

Not a timed assertion: figures for the report, each beside its baseline.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from p2pfs import crypto
from p2pfs.wire import messages as m
from p2pfs.wire.connection import Connection

BLOCK = 64 << 10
BLOCKS = 2048          # 128 MiB per measurement
RUN = m.MAX_RUN_DATA // BLOCK
ROUNDS = 5
CHUNK = 1 << 20        # the reader's receive size
ROOT = bytes(range(32))
ROOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
V1_FILES = ["__init__.py", "errors.py", "types.py", "crypto.py", "wire/__init__.py", "wire/noise.py",
            "wire/frames.py", "wire/messages.py", "wire/connection.py"]


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", ROOT_DIR, *args], check=True, capture_output=True, text=True).stdout


def load_v1():
    """Version 1's crypto and wire modules from git, as the package `p2pfs_v1`; None without git."""
    rev = os.environ.get("P2PFS_WIRE_V1")
    try:
        if rev is None:
            change = _git("log", "-1", "--format=%H", "-G", '^PROLOGUE = b"p2pfs/noise/v1"',
                          "--", "p2pfs/wire/connection.py").strip()
            rev = f"{change}^"
        root = tempfile.mkdtemp(prefix="p2pfs-wire-v1-")
        atexit.register(shutil.rmtree, root, True)
        for name in V1_FILES:
            path = os.path.join(root, "p2pfs_v1", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(_git("show", f"{rev}:p2pfs/{name}"))
    except (OSError, subprocess.CalledProcessError):
        return None
    sys.path.insert(0, root)
    return (importlib.import_module("p2pfs_v1.wire.connection"), importlib.import_module("p2pfs_v1.wire.messages"),
            importlib.import_module("p2pfs_v1.crypto"))


def _drain(conn) -> list:
    events = []
    while (ev := conn.next_event()) is not None:
        events.append(ev)
    return events


def _pair(connection, key: bytes, **kwargs):
    known = {crypto.discovery_key(key): key}.get
    req = connection(True, crypto.x25519_keypair()[0], known, **kwargs)
    resp = connection(False, crypto.x25519_keypair()[0], known, **kwargs)
    for _ in range(6):  # handshake (and, in version 1, the secretstream headers)
        for src, dst in ((req, resp), (resp, req)):
            data = src.data_to_send()
            if data:
                dst.receive_data(data)
                _drain(dst)
    resp.receive_data(req.open_channel(key))
    _drain(resp)
    req.receive_data(resp.data_to_send())
    _drain(req)
    return req, resp


def _exchange(req, resp, requests: list, replies, into: bool = False) -> tuple[float, float]:
    """Send `requests` to `resp` (untimed), then per 1 MiB of replies: encode
    and encrypt them (send time), feed them to `req` in `CHUNK` reads and take
    the events (receive time).  Bytes are consumed as they are made, as a
    driver's writer would, so buffers are recycled."""
    resp.receive_data(b"".join(req.send(r) for r in requests))
    _drain(resp)
    send = receive = 0.0
    got = 0
    for group in replies:
        started = time.perf_counter()
        wire = [resp.send(reply) for reply in group]
        send += time.perf_counter() - started
        stream = memoryview(b"".join(wire))  # what the socket holds
        started = time.perf_counter()
        pos = 0
        while pos < len(stream):
            if into:  # recv_into straight into the frame buffer
                view = req.get_buffer(CHUNK)
                n = min(len(view), len(stream) - pos)
                view[:n] = stream[pos:pos + n]
                view.release()
                req.buffer_updated(n)
            else:     # recv(): a new bytes object per read, then receive_data
                n = min(CHUNK, len(stream) - pos)
                req.receive_data(bytes(stream[pos:pos + n]))
            pos += n
            while req.next_event() is not None:
                got += 1
        receive += time.perf_counter() - started
    assert got == len(requests)
    return send, receive


def measure_v1(v1, blocks: list[bytes]) -> tuple[float, float]:
    """(send s, receive s) for every block as one version-1 Data message."""
    connection, msgs, _ = v1
    key = crypto.generate_keypair()[0]
    req, resp = _pair(connection.Connection, key)
    la, lb = req.local_channel(key), resp.local_channel(key)
    proof = [(i, ROOT, BLOCK) for i in range(10)]
    send = receive = 0.0
    batch = connection.MAX_REQUESTS
    for first in range(0, len(blocks), batch):
        ids = range(first, min(first + batch, len(blocks)))
        groups = [[msgs.Data(lb, i, i, blocks[i], proof) for i in ids[k:k + RUN]] for k in range(0, len(ids), RUN)]
        s, r = _exchange(req, resp, [msgs.Request(la, i, i, 0, False, len(blocks)) for i in ids], groups)
        send, receive = send + s, receive + r
    return send, receive


def measure_v2(cipher: str, blocks: list[bytes], into: bool = False) -> tuple[float, float]:
    """(send s, receive s) for runs of RUN blocks, one version-2 Data message each."""
    key = crypto.generate_keypair()[0]
    req, resp = _pair(Connection, key, ciphers=[cipher])
    la, lb = req.local_channel(key), resp.local_channel(key)
    leaves = [(ROOT, BLOCK)] * RUN
    proof = [(2 * i + 1, ROOT, BLOCK) for i in range(4)]
    nodes = [p[0] for p in proof]
    starts = range(0, len(blocks), RUN)
    requests = [m.Request(la, s, s, RUN, len(blocks), nodes) for s in starts]
    groups = [[m.Data(lb, s, s, blocks[s:s + RUN], leaves, proof)] for s in starts]
    return _exchange(req, resp, requests, groups, into)


def cipher_floor_v1(v1, blocks: list[bytes]) -> tuple[float, float]:
    """secretstream push and pull of every block, nothing else."""
    _, _, old_crypto = v1
    key = bytes(32)
    enc = old_crypto.StreamEncryptor(key)
    started = time.perf_counter()
    for b in blocks:  # each output dropped at once, as a writer would
        enc.encrypt(b)
    push = time.perf_counter() - started
    enc = old_crypto.StreamEncryptor(key)
    sealed = [enc.encrypt(b) for b in blocks]
    dec = old_crypto.StreamDecryptor(key, enc.header)
    started = time.perf_counter()
    for c in sealed:
        dec.decrypt(c)
    return push, time.perf_counter() - started


def cipher_floor_v2(cipher: str, blocks: list[bytes]) -> tuple[float, float]:
    """The AEAD alone over the same bytes in 1 MiB frames, into one reused buffer."""
    aead = crypto.transport_aead(cipher, bytes(32))
    frame = b"".join(blocks[:RUN])
    out = bytearray(len(frame) + crypto.TRANSPORT_TAG_BYTES)
    back = bytearray(len(frame))
    nonce = bytes(12)
    frames = len(blocks) // RUN
    started = time.perf_counter()
    for _ in range(frames):
        aead.encrypt_into(nonce, frame, None, out)
    seal = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(frames):
        aead.decrypt_into(nonce, out, None, back)
    return seal, time.perf_counter() - started


def main() -> None:
    blocks = [os.urandom(BLOCK) for _ in range(BLOCKS)]
    total = BLOCK * BLOCKS
    v1 = load_v1()
    suites: dict[str, tuple] = {}
    if v1 is not None:
        suites["v1 secretstream, 1 block/msg"] = (lambda: measure_v1(v1, blocks), lambda: cipher_floor_v1(v1, blocks))
    else:
        print("(version 1 not found in git: only version 2 is measured)")
    for cipher in crypto.TRANSPORT_CIPHERS:
        suites[f"v2 {cipher}, {RUN} blocks/msg"] = (
            lambda c=cipher: measure_v2(c, blocks), lambda c=cipher: cipher_floor_v2(c, blocks))
        suites[f"v2 {cipher}, recv_into"] = (
            lambda c=cipher: measure_v2(c, blocks, True), lambda c=cipher: cipher_floor_v2(c, blocks))
    results = {name: ([], []) for name in suites}
    for _ in range(ROUNDS):  # alternate, so every suite sees the same machine noise
        for name, (run, floor) in suites.items():
            results[name][0].append(run())
            results[name][1].append(floor())
    print(f"{'suite':<40}{'send GB/s':>10}{'recv GB/s':>10}{'send us/blk':>12}{'recv us/blk':>12}"
          f"{'  Python us/blk send, recv (above the cipher)'}")
    for name, (runs, floors) in results.items():
        send = statistics.median(r[0] for r in runs)
        recv = statistics.median(r[1] for r in runs)
        fs = statistics.median(f[0] for f in floors)
        fr = statistics.median(f[1] for f in floors)
        per = 1e6 / BLOCKS
        print(f"{name:<40}{total / send / 1e9:>10.2f}{total / recv / 1e9:>10.2f}{send * per:>12.2f}{recv * per:>12.2f}"
              f"  {(send - fs) * per:6.2f}, {(recv - fr) * per:6.2f}"
              f"   (cipher alone {total / fs / 1e9:.2f} / {total / fr / 1e9:.2f} GB/s)")
    print(f"({BLOCKS} blocks of {BLOCK >> 10} KiB per measurement, medians of {ROUNDS} alternating rounds)")


if __name__ == "__main__":
    main()
