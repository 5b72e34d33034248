"""The CLI end to end, as a user runs it (acceptance items 2, 3, 4, 6, 7 of issue 2)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from helpers import (PAGE, as_nobody, cat_digest, cli_command, cli_env, closed_pipe, create,
                     file_digest, find_all, find_once, flip_byte, lmdb_meta, lmdb_subdb_root,
                     make_tree, parse_ls_lR, poke, run_cli, source_listing, unprivileged,
                     write_random, REPO)

GiB = 1 << 30


def test_create_ls_cat_roundtrip(home, sample):
    key = create(home, sample)
    assert re.fullmatch(r"[ybndrfg8ejkmcpqxot1uwisza345h769]{52}", key)
    listing = parse_ls_lR(run_cli(home, "ls", "-l", "-R", key).stdout)
    assert listing == source_listing(sample)
    for path in [b"/run.sh", "/ünïcödé ☃.txt".encode(), b"/empty"]:
        got = run_cli(home, "cat", key, os.fsdecode(path)).stdout
        assert got == (sample / os.fsdecode(path[1:])).read_bytes()
    names = run_cli(home, "ls", key).out.splitlines()
    assert names == sorted(p.name for p in sample.iterdir())
    assert run_cli(home, "ls", "-l", key, "/link-rel").out.rstrip().endswith("link-rel -> run.sh")


def test_info_log_drives(home, sample):
    key = create(home, sample, "-m", "first")
    info = json.loads(run_cli(home, "info", key, "--json").stdout)
    assert info["key"] == key and info["version"] == 1 and info["writable"] is True
    assert info["blocks_held"] == info["length"] > 2 and info["bytes_held"] > 0
    (sample / "new.txt").write_text("new\n")
    out = run_cli(home, "import", key, sample, "-q", "-m", "second").out
    assert out.startswith("version 2: 1 new content blocks")
    log = run_cli(home, "log", key).out.splitlines()
    assert [l.split()[1] for l in log] == ["2", "1"] and "second" in log[0] and "first" in log[1]
    assert key in run_cli(home, "drives").out
    assert run_cli(home, "cat", f"{key}@2", "/new.txt").stdout == b"new\n"
    r = run_cli(home, "cat", f"{key}@1", "/new.txt", check=False)
    assert r.returncode == 1 and "no such file" in r.stderr


def test_import_changes_deletes_renames(home, tmp_path):
    src = make_tree(tmp_path / "src", files=30, big=300_000)
    key = create(home, src)
    before = run_cli(home, "cat", key, "/big.bin").stdout
    # rename the big file, change one small file, delete a directory, add one
    os.rename(src / "big.bin", src / "renamed.bin")
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho changed\n")
    import shutil
    shutil.rmtree(src / "d0-1")
    (src / "added").mkdir()
    (src / "added" / "x").write_bytes(b"x")
    out = run_cli(home, "import", key, src, "-q").out
    m = re.match(r"version 2: (\d+) new content blocks, (\d+) reused", out)
    assert m and int(m.group(1)) == 2 and int(m.group(2)) >= 5, out  # run.sh + x; big reused
    assert parse_ls_lR(run_cli(home, "ls", "-l", "-R", key).stdout) == source_listing(src)
    assert run_cli(home, "cat", key, "/renamed.bin").stdout == before
    v1 = parse_ls_lR(run_cli(home, "ls", "-l", "-R", f"{key}@1").stdout)
    assert b"/big.bin" in v1 and b"/d0-1" in v1
    run_cli(home, "verify", key)


def test_cat_broken_pipe_is_quiet(home, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "f", 20 << 20)
    key = create(home, src)
    p = subprocess.run(" ".join(cli_command(home, "cat", key, "/f")) + " | head -c 10 >/dev/null",
                       shell=True, capture_output=True, env=cli_env(), cwd=REPO)
    assert p.stderr == b""


def test_every_command_that_prints_is_quiet_into_a_closed_pipe(home, sample):
    """`p2pfs ls | head` and the like: exit 141 quietly, as cat does (issue 7, 18)."""
    key = create(home, sample)
    (sample / "more").write_text("more")
    run_cli(home, "import", "-q", key, sample)
    for args in (["ls", key], ["ls", "-l", "-R", key], ["info", key], ["info", "--json", key],
                 ["log", key], ["drives"], ["verify", key], ["verify"], ["cat", key, "/run.sh"]):
        w = closed_pipe()
        try:
            p = subprocess.run(cli_command(home, *args), stdout=w, stderr=subprocess.PIPE,
                               env=cli_env(), cwd=REPO)
        finally:
            os.close(w)
        assert (p.returncode, p.stderr) == (141, b""), (args, p.stderr.decode())


# --- acceptance 6: bad input ------------------------------------------------------------

def _one_clear_line(r):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pfs: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_bad_input(home, sample, tmp_path):
    key = create(home, sample)
    data = (home / "store" / "data.mdb").read_bytes()
    cases = {
        "not a key": ["ls", "not-a-key"],
        "unknown key": ["ls", "y" * 52],
        "missing path": ["cat", key, "/no/such/file"],
        "version past head": ["ls", f"{key}@7"],
        "bad version": ["ls", f"{key}@x"],
        "DIR missing": ["create", tmp_path / "nope"],
        "DIR is a file": ["create", sample / "run.sh"],
        "import DIR missing": ["import", key, tmp_path / "nope"],
        "cat a directory": ["cat", key, "/d0-0"],
        "unknown option": ["ls", "--bogus", key],
    }
    for what, args in cases.items():
        line = _one_clear_line(run_cli(home, *args, check=False))
        assert len(line) < 300, (what, line)
    assert "is not a drive key" in _one_clear_line(run_cli(home, "ls", "not-a-key", check=False))
    assert "has no version 7" in _one_clear_line(run_cli(home, "ls", f"{key}@7", check=False))
    assert "--peer" in _one_clear_line(run_cli(home, "ls", "y" * 52, check=False))
    # nothing written by any of them
    assert (home / "store" / "data.mdb").read_bytes() == data
    run_cli(home, "verify", key)


@pytest.fixture
def open_tmp():
    """A scratch dir reachable by an unprivileged user (pytest's tmp_path is 0700)."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="p2pfs-test-", dir="/tmp")
    os.chmod(path, 0o777)
    yield __import__("pathlib").Path(path)
    for p in __import__("pathlib").Path(path).rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path)


def test_unreadable_dir_and_file(open_tmp):
    """Run without the privileges that ignore permission bits (see
    helpers.unprivileged: it works wherever the clone and interpreter are)."""
    check = subprocess.run([*unprivileged(), sys.executable, "-c", "import p2pfs"],
                           env=cli_env(), cwd=REPO, capture_output=True, text=True)
    if check.returncode != 0:  # e.g. an interpreter in another user's private directory
        pytest.skip(f"{sys.executable} cannot run without privileges here: {check.stderr[-200:]}")
    src = make_tree(open_tmp / "src", files=10)
    for p in [src, *src.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    home = open_tmp / "home"
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    secret = src / "d0-0" / "secret.txt"
    secret.write_text("no")
    secret.chmod(0o000)
    r = run_cli(home, "create", src, check=False, prefix=unprivileged())
    assert "secret.txt" in _one_clear_line(r)
    secret.unlink()
    (src / "d0-1").chmod(0o000)
    r = run_cli(home, "create", src, check=False, prefix=unprivileged())
    assert "d0-1" in _one_clear_line(r)
    (src / "d0-1").chmod(0o755)
    closed = open_tmp / "closed"
    closed.mkdir(mode=0o000)
    closed.chmod(0o000)
    _one_clear_line(run_cli(home, "create", closed, check=False, prefix=unprivileged()))
    assert run_cli(home, "drives", prefix=unprivileged()).out == ""
    # and with everything readable it works for that user
    key = run_cli(home, "create", "-q", src, prefix=unprivileged()).last_line
    run_cli(home, "verify", key, prefix=unprivileged())


def test_secret_key_file_permissions(home, sample):
    key = create(home, sample)
    keyfile = home / "keys" / f"{key}.key"
    assert keyfile.stat().st_mode & 0o777 == 0o600
    assert bytes.fromhex(keyfile.read_text().strip()) and key not in keyfile.read_text()
    keyfile.chmod(0o644)
    (sample / "more").write_text("more")
    line = _one_clear_line(run_cli(home, "import", key, sample, check=False))
    assert f"chmod 600 {keyfile}" in line
    assert json.loads(run_cli(home, "info", key, "--json").stdout)["version"] == 1
    keyfile.chmod(0o600)
    run_cli(home, "import", key, sample, "-q")
    run_cli(home, "verify", key)


def test_secret_never_printed(home, sample):
    key = create(home, sample)
    secret = (home / "keys" / f"{key}.key").read_text().strip()
    outputs = [run_cli(home, *a) for a in (["info", key, "--json"], ["info", key],
                                           ["drives"], ["log", key], ["verify", key])]
    for r in outputs:
        assert secret not in r.out and secret not in r.stderr


# --- acceptance 3: a flipped byte in the store -----------------------------------------

def test_flipped_content_byte(home, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "f.bin", 10 * 65536, seed=7)
    (src / "other").write_bytes(b"fine\n")
    key = create(home, src)
    data = (src / "f.bin").read_bytes()
    bad_block_in_file = 6
    needle = data[bad_block_in_file * 65536 + 1000: bad_block_in_file * 65536 + 1064]
    mdb = home / "store" / "data.mdb"
    flip_byte(mdb, find_once(mdb, needle) + 10)
    r = run_cli(home, "verify", key, check=False)
    assert r.returncode == 1
    assert "block 7" in r.stderr  # block 0 is the header: file block 6 is log block 7
    r = run_cli(home, "cat", key, "/f.bin", check=False)
    line = _one_clear_line(r)
    assert "block 7" in line and "damaged" in line
    assert data.startswith(r.stdout) and len(r.stdout) <= bad_block_in_file * 65536
    assert run_cli(home, "cat", key, "/other").stdout == b"fine\n"


def test_flipped_tree_node(home, tmp_path):
    from p2pfs import crypto
    from p2pfs.store import Store
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "f.bin", 10 * 65536, seed=8)
    key = create(home, src)
    with Store(home) as store:
        node = store.get_node(crypto.decode_key(key), 2 * 3)  # leaf of block 3
    mdb = home / "store" / "data.mdb"
    flip_byte(mdb, find_once(mdb, node.hash) + 5)
    r = run_cli(home, "verify", key, check=False)
    assert r.returncode == 1 and "block 3" in r.stderr, r.stderr
    r = run_cli(home, "cat", key, "/f.bin", check=False)
    assert "block 3" in _one_clear_line(r)
    assert (src / "f.bin").read_bytes().startswith(r.stdout) and len(r.stdout) < 2 * 65536


# --- acceptance 2: 10,000 files and a 1 GiB file ------------------------------------------

@pytest.mark.slow
def test_big_tree_roundtrip(home, tmp_path):
    src = make_tree(tmp_path / "src", files=10_000, depth=3, fanout=6, big=GiB)
    key = create(home, src)
    assert parse_ls_lR(run_cli(home, "ls", "-l", "-R", key).stdout) == source_listing(src)
    rc, digest, n = cat_digest(home, key, "/big.bin")
    assert rc == 0 and n == GiB and digest == file_digest(src / "big.bin")
    # every small file through the Python API in one process ...
    import trio
    from p2pfs.node import open_drive, open_store

    async def compare_all():
        count = 0
        with open_store(home) as store:
            async with open_drive(store, key) as drive:
                for path, entry in drive.walk_local():
                    if entry.kind != 0 or path == b"/big.bin":
                        continue
                    got = await drive.read(entry, 0, entry.size + 1)
                    assert got == (src / os.fsdecode(path[1:])).read_bytes(), path
                    count += 1
        return count
    assert trio.run(compare_all) >= 10_000
    # ... and a sample through the CLI
    files = sorted(p for p in src.rglob("*.txt") if p.is_file() and not p.is_symlink())
    for p in random.Random(3).sample(files, 25):
        rel = "/" + str(p.relative_to(src))
        assert run_cli(home, "cat", key, rel).stdout == p.read_bytes(), rel
    run_cli(home, "verify", key)


# --- acceptance 7: one byte changed in 1 GiB -----------------------------------------------

@pytest.mark.slow
def test_one_byte_change_appends_one_block(home, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big.bin"
    write_random(big, GiB, seed=11)
    key = create(home, src)
    with open(big, "r+b") as f:
        f.seek(GiB // 2 + 12345)
        b = f.read(1)
        f.seek(GiB // 2 + 12345)
        f.write(bytes([b[0] ^ 0xFF]))
    out = run_cli(home, "import", key, src, "-q").out
    m = re.match(r"version 2: (\d+) new content blocks, (\d+) reused", out)
    assert m and int(m.group(1)) == 1 and int(m.group(2)) == GiB // 65536 - 1, out
    info = json.loads(run_cli(home, "info", key, "--json").stdout)
    assert info["bytes_held"] < GiB + 2 * 65536 + 65536
    rc, digest, _ = cat_digest(home, key, "/big.bin")
    assert rc == 0 and digest == file_digest(big)
    run_cli(home, "verify", key)


# --- acceptance 4: kill -9 at random points --------------------------------------------------

def _run_and_kill(cmd, delay: float) -> int | None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(), cwd=REPO)
    try:
        proc.wait(timeout=delay)  # the random point; finishing first is a valid outcome
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None
    return proc.returncode


@pytest.mark.slow
def test_kill_9_create_and_import(home, tmp_path):
    rnd = random.Random(int(os.environ.get("P2PFS_KILL_SEED", "4")))
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_random(a / "big.bin", GiB, seed=21)
    write_random(b / "big.bin", GiB, seed=22)
    (a / "small").write_text("a")
    (b / "small").write_text("b")
    started = time.monotonic()
    key = create(home, a)
    full = time.monotonic() - started
    digest_a, digest_b = file_digest(a / "big.bin"), file_digest(b / "big.bin")

    def drives():
        return {d["key"] for d in json.loads(run_cli(home, "drives", "--json").out)}

    known = drives()
    for _ in range(5):
        rc = _run_and_kill(cli_command(home, "create", "-q", a), rnd.uniform(0.05, full))
        now = drives()
        for k in now - known:  # finished before the kill: complete and valid
            run_cli(home, "verify", k)
        known = now
    assert key in known
    version = 1
    for _ in range(5):
        rc = _run_and_kill(cli_command(home, "import", "-q", key, b if version % 2 else a),
                           rnd.uniform(0.05, full))
        info = json.loads(run_cli(home, "info", key, "--json").stdout)
        assert info["version"] in (version, version + 1)
        if rc is not None:
            assert rc == 0 and info["version"] == version + 1
        run_cli(home, "verify", key)
        rc_cat, digest, _ = cat_digest(home, key, "/big.bin")
        expected = digest_a if info["version"] % 2 else digest_b
        assert rc_cat == 0 and digest == expected
        version = info["version"]
    # and the next import after all that completes
    run_cli(home, "import", "-q", key, b if version % 2 else a)
    run_cli(home, "verify", key)


def test_progress_plain_without_a_terminal_and_bar_on_one(home, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "f", 80 << 20, seed=3)
    r = run_cli(home, "create", src)
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "create: 1 files, 80.0 MiB to read"
    assert lines[-1].startswith("create: 100% (1/1 files, 80.0 MiB of 80.0 MiB, ")
    assert lines[-1].endswith("/s, 0 s left)") and len(lines) <= 6
    assert run_cli(home, "create", "-q", src).stderr == ""
    # on a terminal: a rich progress bar (needs util-linux `script` for a pty)
    import shutil
    if shutil.which("script") is None:
        return
    cmd = " ".join(f"'{c}'" for c in cli_command(home, "create", src))
    p = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, env=cli_env(),
                       cwd=REPO)
    assert p.returncode == 0
    out = p.stdout.decode("utf-8", "replace")
    assert "\x1b[" in out and "create" in out  # drawn with terminal escapes
    assert "/1 files" in out
    assert re.search(r"[ybndrfg8ejkmcpqxot1uwisza345h769]{52}", out)


def test_flipped_commit_record(home, sample):
    key = create(home, sample, "-m", "a-unique-message-3141592653")
    other = create(home, sample)
    mdb = home / "store" / "data.mdb"
    for offset in find_all(mdb, b"a-unique-message-3141592653"):
        flip_byte(mdb, offset)
    for args in (["ls", key], ["info", key], ["log", key], ["verify", key]):
        line = run_cli(home, *args, check=False).stderr.strip().splitlines()[0]
        assert "block" in line and "damaged" in line, (args, line)
    listing = run_cli(home, "drives").out
    assert f"{key}  " in listing and "damaged" in listing.split(key)[1].splitlines()[0]
    assert "damaged" not in listing.split(other)[1].splitlines()[0]
    run_cli(home, "verify", other)


# --- issue 7, findings 14-16 and 19: the local store ----------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_read_the_store(open_tmp):
    """The home sits in a directory everyone can walk; its own modes keep
    another local user out of the plaintext it holds (finding 14)."""
    src = open_tmp / "src"
    src.mkdir()
    (src / "private.txt").write_bytes(b"the plaintext of a 0600 file\n")
    (src / "private.txt").chmod(0o600)
    home = open_tmp / "home"
    key = create(home, src)
    run_cli(home, "ls", key)
    for path in ("store/data.mdb", "store/lock.mdb", f"keys/{key}.key"):
        other = subprocess.run([*as_nobody(), "cat", str(home / path)], capture_output=True)
        assert other.returncode != 0 and b"Permission denied" in other.stderr, path
    other = subprocess.run([*as_nobody(), "ls", str(home / "store")], capture_output=True)
    assert other.returncode != 0 and b"Permission denied" in other.stderr


def _commands(key, sample):
    return [["ls", key], ["cat", key, "/run.sh"], ["info", key], ["log", key], ["drives"],
            ["import", "-q", key, sample], ["ls", key, "--peer", "127.0.0.1:9"]]


def _damaged_everywhere(home, key, sample, tmp_path):
    """Every command fails with one line saying the store is damaged (no
    traceback, no SIGBUS); `verify` without KEY explains and exits 1."""
    for args in _commands(key, sample) + [["create", "-q", sample]]:
        r = run_cli(home, *args, check=False, timeout=60)
        line = _one_clear_line(r)
        assert r.returncode == 1 and f"the store in {home} is damaged" in line, (args, line)
        assert line.endswith("run 'p2pfs verify'"), line
    for args in (["verify"], ["verify", key]):
        r = run_cli(home, *args, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert all(l.startswith("p2pfs: verify: ") for l in lines), r.stderr
        assert "is damaged" in lines[0] and "A DAMAGED STORE" in lines[-1] and "keys" in lines[-1]
    return lines


def test_truncated_store_file_is_a_clear_error_not_sigbus(home, sample, tmp_path):
    """A data.mdb cut below what its meta page says: LMDB would read past the
    end of its map and every command died of SIGBUS (finding 16)."""
    key = create(home, sample)
    mdb = home / "store" / "data.mdb"
    size = mdb.stat().st_size
    os.truncate(mdb, size // 2)
    lines = _damaged_everywhere(home, key, sample, tmp_path)
    assert f"{size // 2} bytes" in lines[0] and str(size) in lines[0]


def test_meta_page_pointing_past_the_file_is_a_clear_error(home, sample, tmp_path):
    key = create(home, sample)
    mdb = home / "store" / "data.mdb"
    meta = lmdb_meta(mdb)
    pages = mdb.stat().st_size // PAGE
    # the last page and the main root moved far out: within the map, past the file
    poke(mdb, meta["offset"] + 136, struct.pack("<Q", pages * 1000))
    poke(mdb, meta["offset"] + 128, struct.pack("<Q", pages * 100))
    _damaged_everywhere(home, key, sample, tmp_path)


def test_damaged_page_is_one_line_for_every_command(home, sample, tmp_path):
    """A page of the blocks sub-database turned into something else: LMDB
    raised CorruptedError from every read (finding 16)."""
    key = create(home, sample)
    mdb = home / "store" / "data.mdb"
    root = lmdb_subdb_root(mdb, b"blocks")
    poke(mdb, root * PAGE + 10, struct.pack("<H", 0x08))  # page flags: a meta page
    for args in _commands(key, sample):
        line = _one_clear_line(run_cli(home, *args, check=False, timeout=60))
        assert f"the store in {home} is damaged" in line and "MDB_CORRUPTED" in line, (args, line)
    for args in (["verify"], ["verify", key]):
        r = run_cli(home, *args, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert any("data.mdb" in l and "blocks" in l for l in lines), r.stderr
        assert "A DAMAGED STORE" in lines[-1]


def test_full_disk_during_import_and_create(small_disk, tmp_path):
    """ENOSPC: one line naming the home, its free space and about how much
    more the import needed; the last version is intact and verifies
    (finding 15)."""
    home = small_disk / "home"
    v1 = tmp_path / "v1"
    v1.mkdir()
    write_random(v1 / "a", 1 << 20, seed=1)
    key = create(home, v1)
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2)
    write_random(v2 / "big", 12 << 20, seed=2)
    r = run_cli(home, "import", "-q", key, v2, check=False)
    line = _one_clear_line(r)
    assert r.returncode == 1 and str(home) in line and "is full" in line and "free" in line, line
    needed = re.search(r"this needs about ([\d,]+) MiB more", line)
    assert needed and 1 <= int(needed.group(1).replace(",", "")) <= 13, line  # of the 12 MiB file
    assert json.loads(run_cli(home, "info", key, "--json").stdout)["version"] == 1
    run_cli(home, "verify", key)
    assert run_cli(home, "cat", key, "/a").stdout == (v1 / "a").read_bytes()
    # a new drive, and a new home, on the full disk
    for h in (home, small_disk / "new-home"):
        r = run_cli(h, "create", "-q", v2, check=False)
        line = _one_clear_line(r)
        assert r.returncode == 1 and str(h) in line and "is full" in line, line
    assert run_cli(home, "drives").out.split()[0] == key


def test_info_log_verify_of_one_version(home, tmp_path):
    """KEY@N: info and verify of version N, log from version N down (finding 19)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "one").write_bytes(b"version one\n")
    key = create(home, src, "-m", "first")
    write_random(src / "two", 3 * 65536, seed=9)
    run_cli(home, "import", "-q", "-m", "second", key, src)
    v1 = json.loads(run_cli(home, "info", f"{key}@1", "--json").stdout)
    v2 = json.loads(run_cli(home, "info", key, "--json").stdout)
    assert (v1["version"], v1["files"], v2["version"], v2["files"]) == (1, 1, 2, 2)
    assert v1["length"] < v2["length"]
    assert [l.split()[1] for l in run_cli(home, "log", f"{key}@1").out.splitlines()] == ["1"]
    assert [l.split()[1] for l in run_cli(home, "log", key).out.splitlines()] == ["2", "1"]
    # damage a block that only version 2 holds: version 1 still verifies
    data = (src / "two").read_bytes()
    mdb = home / "store" / "data.mdb"
    flip_byte(mdb, find_once(mdb, data[65536 + 100:65536 + 164]) + 3)
    r = run_cli(home, "verify", f"{key}@1")
    assert r.out.startswith(f"ok: drive {key}@1, length {v1['length']}")
    assert run_cli(home, "verify", key, check=False).returncode == 1
    assert "no version 3" in _one_clear_line(run_cli(home, "info", f"{key}@3", check=False))


def test_json_of_ls_and_drives(tmp_path, home):
    """--json on ls (one directory, -R, one entry) and drives, with the fields
    man p2pfs(1) names (issue 12)."""
    src = make_tree(tmp_path / "src", files=12)
    os.utime(src / "run.sh", ns=(1_700_000_000_123_456_789,) * 2)
    key = create(home, src)
    top = json.loads(run_cli(home, "ls", key, "--json").out)
    assert top["key"] == key and top["version"] == 1
    by_name = {e["name"]: e for e in top["entries"]}
    assert sorted(by_name) == sorted(os.listdir(src))
    assert by_name["run.sh"] == {"path": "/run.sh", "name": "run.sh", "kind": "file", "mode": "0755",
                                 "size": 18, "mtime_ns": 1_700_000_000_123_456_789}
    assert by_name["link-rel"]["kind"] == "symlink" and by_name["link-rel"]["target"] == "run.sh"
    assert by_name["d0-0"]["kind"] == "dir"
    everything = json.loads(run_cli(home, "ls", "-R", key, "--json").out)["entries"]
    want = {os.fsdecode(p) for p in source_listing(src)}
    assert {e["path"] for e in everything} == want
    one = json.loads(run_cli(home, "ls", key, "/run.sh", "--json").out)["entries"]
    assert one == [by_name["run.sh"]]
    drives = json.loads(run_cli(home, "drives", "--json").out)
    assert [d["key"] for d in drives] == [key]
    assert {"version", "length", "bytes_held", "writable", "state", "bytes_cached",
            "bytes_pinned", "pinned_paths"} <= drives[0].keys()
    assert drives[0]["state"] == "owned" and drives[0]["writable"] is True


def test_a_size_too_large_is_a_usage_error(home):
    """--cache-size with more digits than a float holds was int(inf): a
    traceback, not one line."""
    for size in ("9" * 400, "9" * 30 + "T"):
        r = run_cli(home, "gc", "--cache-size", size, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines() == [f"p2pfs: --cache-size: {size!r} is too large"], r.stderr
