"""Helpers shared by the tests: run the real CLI, build sample trees, poke the store."""

from __future__ import annotations

import datetime as dt
import os
import stat
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import blake3

REPO = Path(__file__).resolve().parent.parent
TEST_CONFIG = Path(__file__).resolve().parent / "data" / "config.toml"


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "surrogateescape")

    @property
    def last_line(self) -> str:
        return self.out.strip().splitlines()[-1]


def cli_command(home, *args) -> list[str]:
    return [sys.executable, "-m", "p2pfs", "--home", str(home), *map(str, args)]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("P2PFS_HOME", None)
    env["P2PFS_CONFIG"] = str(TEST_CONFIG)
    return env


def run_cli(home, *args, input: bytes | None = None, check: bool = True,
            prefix: list[str] = (), timeout: float = 600, env: dict | None = None) -> Result:
    """Run `python -m p2pfs --home HOME ARGS...` in a subprocess (`env`: more
    environment variables, or other values for them).

    With check, a non-zero exit fails the test showing stderr."""
    proc = subprocess.run([*prefix, *cli_command(home, *args)], input=input,
                          capture_output=True, env={**cli_env(), **(env or {})}, cwd=REPO,
                          timeout=timeout)
    res = Result(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))
    if check and res.returncode != 0:
        raise AssertionError(f"p2pfs {' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr}")
    return res


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Send `sig` to a running child, wait `timeout` s for it (then SIGKILL); its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def create(home, directory, *extra) -> str:
    """Create a drive from `directory`; return its key text."""
    return run_cli(home, "create", "-q", directory, *extra).last_line


def cat_digest(home, ref, path, chunk: int = 1 << 20) -> tuple[int, bytes, int]:
    """Stream `p2pfs cat` through BLAKE3: (returncode, digest, bytes)."""
    proc = subprocess.Popen(cli_command(home, "cat", ref, path), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=cli_env(), cwd=REPO)
    h = blake3.blake3()
    n = 0
    while True:
        data = proc.stdout.read(chunk)
        if not data:
            break
        h.update(data)
        n += len(data)
    return proc.wait(), h.digest(), n


def file_digest(path, chunk: int = 8 << 20) -> bytes:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.digest()


def write_random(path, size: int, seed: int = 0, chunk: int = 8 << 20) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rnd.randbytes(n))
            left -= n


def make_tree(root, *, files: int = 20, depth: int = 3, fanout: int = 4, big: int = 0,
              seed: int = 1, symlinks: bool = True, unicode: bool = True) -> Path:
    """A sample tree under `root`: `files` small files spread over nested dirs,
    an empty file, an executable, symlinks (relative, absolute, dangling),
    unicode names and, if `big`, one random file of `big` bytes at /big.bin."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    dirs = [root]
    for d in range(depth):
        for parent in list(dirs):
            if len(dirs) > fanout ** depth:
                break
            for k in range(fanout if d < depth - 1 else 1):
                p = parent / f"d{d}-{k}"
                p.mkdir(exist_ok=True)
                dirs.append(p)
    for i in range(files):
        d = dirs[i % len(dirs)]
        size = rnd.choice([0, 1, 100, 4095, 4096, 4097, 65535, 65536, 65537, 70000]) if i % 50 == 0 \
            else rnd.randrange(0, 3000)
        (d / f"f{i:05d}.txt").write_bytes(rnd.randbytes(size))
    (root / "empty").write_bytes(b"")
    exe = root / "run.sh"
    exe.write_bytes(b"#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    if unicode:
        (root / "ünïcödé ☃.txt").write_text("snow\n")
        (dirs[-1] / "日本語").mkdir(exist_ok=True)
        (dirs[-1] / "日本語" / "ファイル").write_text("nihongo\n")
    if symlinks:
        os.symlink("run.sh", root / "link-rel")
        os.symlink("/etc/hostname", root / "link-abs")
        os.symlink("does/not/exist", root / "link-dangling")
        os.symlink("..", dirs[1] / "up")
    if big:
        write_random(root / "big.bin", big, seed)
    return root


def source_listing(root) -> dict[bytes, tuple]:
    """{drive path: (kind, mode, size, mtime_ns, target)} of a local tree, as
    `p2pfs ls -l -R` should show it (kind: '-', 'd', 'l')."""
    root = os.fsencode(os.path.abspath(root))
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = full[len(root):]
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", 0o777 & stat.S_IMODE(st.st_mode), len(os.readlink(full)),
                            st.st_mtime_ns, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), 0, st.st_mtime_ns, b"")
            else:
                out[rel] = ("-", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, b"")
    return out


def parse_ls_lR(output: bytes) -> dict[bytes, tuple]:
    """Parse `p2pfs ls -l -R` output into the shape of `source_listing`."""
    out = {}
    current = None
    for line in output.split(b"\n"):
        if not line:
            continue
        if line.startswith(b"/") and line.endswith(b":"):  # a directory header
            current = line[:-1]
            continue
        mode_s, size, date, clock, tz, rest = _split_long(line)
        kind = mode_s[:1].decode()
        mode = _parse_mode(mode_s.decode())
        target = b""
        name = rest
        if kind == "l":
            name, _, target = rest.partition(b" -> ")
        path = (current.rstrip(b"/") + b"/" + name)
        secs, _, frac = clock.partition(b".")
        t = dt.datetime.strptime(f"{date.decode()} {secs.decode()} {tz.decode()}",
                                 "%Y-%m-%d %H:%M:%S %z")
        mtime_ns = int(t.timestamp()) * 1_000_000_000 + int(frac)
        out[path] = (kind, mode if kind != "l" else mode & 0o777, int(size), mtime_ns, target)
    return out


def _split_long(line: bytes):
    mode_s, rest = line.split(b" ", 1)
    rest = rest.lstrip(b" ")
    size, date, clock, tz, name = rest.split(b" ", 4)
    return mode_s, size, date, clock, tz, name


def _parse_mode(s: str) -> int:
    bits = 0
    for i, ch in enumerate(s[1:10]):
        if ch not in "-":
            bits |= 1 << (8 - i)
    for pos, special, bit in ((3, "sS", 0o4000), (6, "sS", 0o2000), (9, "tT", 0o1000)):
        if s[pos] in special:
            bits |= bit
            if s[pos] in "ST":
                bits &= ~(1 << (9 - pos))
    return bits


def find_once(path, needle: bytes) -> int:
    """Offset of `needle` in a file; asserts that it occurs exactly once."""
    import mmap
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        first = m.find(needle)
        assert first >= 0, "bytes not found in the store file"
        assert m.find(needle, first + 1) < 0, "bytes occur more than once in the store file"
        return first


def find_all(path, needle: bytes) -> list[int]:
    """Every offset of `needle` in a file (LMDB leaves stale copies of small
    values in freed pages after copy-on-write; flipping all is safe)."""
    import mmap
    out = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        i = m.find(needle)
        while i >= 0:
            out.append(i)
            i = m.find(needle, i + 1)
    assert out, "bytes not found in the store file"
    return out


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def as_nobody() -> list[str]:
    """A command prefix that drops root (so permission bits apply); [] if not root."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def unprivileged() -> list[str]:
    """A command prefix under which permission bits apply to the command ([] if
    not root): root with every capability dropped (setpriv), so a file of
    mode 0000 is unreadable to it.  Unlike switching to another user, the
    interpreter, its virtualenv and this clone stay reachable whatever the
    modes of their parent directories (a clone under a 0700 directory, an
    interpreter under /root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]


def closed_pipe():
    """The write end of a pipe whose read end is already closed: anything
    written to it fails with EPIPE (like `| head` after it has exited)."""
    r, w = os.pipe()
    os.close(r)
    return w


def tree_modes(root) -> dict[str, int]:
    """{path relative to root ('.' for root): permission bits} of a tree (no symlinks followed)."""
    root = Path(root)
    out = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


PAGE = 4096


def lmdb_meta(data_mdb) -> dict:
    """The meta page LMDB uses (the higher transaction id) of a data.mdb
    (LMDB 0.9, 64-bit, 4 KiB pages): its offset and the fields the tests damage."""
    import struct
    with open(data_mdb, "rb") as f:
        raw = f.read(2 * PAGE)
    metas = []
    for i in range(2):
        page = raw[i * PAGE:(i + 1) * PAGE]
        main_root, last_pg, txnid = struct.unpack_from("<Q", page, 128)[0], *struct.unpack_from("<QQ", page, 136)
        metas.append({"offset": i * PAGE, "main_root": main_root, "last_pg": last_pg, "txnid": txnid})
    return max(metas, key=lambda m: (m["txnid"], -m["offset"]))


def lmdb_subdb_root(data_mdb, name: bytes) -> int:
    """Page number of the root of named sub-database `name` (found in the main
    DB's leaf page, where each named DB is a node holding its 48-byte record)."""
    import struct
    meta = lmdb_meta(data_mdb)
    with open(data_mdb, "rb") as f:
        f.seek(meta["main_root"] * PAGE)
        page = f.read(PAGE)
    flags, lower = struct.unpack_from("<HH", page, 10)
    assert flags & 0x02, "the main DB of a small store is one leaf page"
    for i in range((lower - 16) // 2):
        off = struct.unpack_from("<H", page, 16 + 2 * i)[0]
        ksize = struct.unpack_from("<H", page, off + 6)[0]
        if page[off + 8:off + 8 + ksize] == name:
            return struct.unpack_from("<Q", page, off + 8 + ksize + 40)[0]
    raise AssertionError(f"no sub-database {name!r}")


def poke(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
