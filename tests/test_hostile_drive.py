"""Drives signed by a stranger: every field is hostile (issue 7, findings 1-7).

Each drive is built from raw parts by `hostile.Forge` (real blocks, tree and
signature; raw index keys and entries that never went through
`normalize_path`) and read the way a user reads it: the CLI, the `Drive`
API, and a real mount.  Tests that dial a seeder open sockets: run them
inside a loopback-only network namespace (as scripts/test does).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time

import pytest

from hostile import ROOT, Forge, d, key, link, simple
from helpers import REPO, cli_command, cli_env, run_cli
from p2pfs import index
from p2pfs.drive import Drive, verify_drive
from p2pfs.errors import VerificationError
from p2pfs.index import KIND_FILE, Entry, Header, Leaf
from p2pfs.store import Store

HAVE_FUSE = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
needs_fuse = pytest.mark.skipif(not HAVE_FUSE, reason="needs /dev/fuse and fusermount3")
BS = 4096


def one_line(r) -> str:
    """The single 'p2pfs: ...' line of a failed command (no traceback)."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pfs: "), r.stderr
    return lines[0]


def warnings_of(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("p2pfs: warning: ")]


@pytest.fixture
def st(home):
    s = Store(home)
    yield s
    s.close()


# --- finding 1: one signed file, one content --------------------------------------------

async def test_f1_blocks_must_have_the_header_block_size(home, st):
    """Header 4 KiB over 12 KiB blocks: every read is a bad drive naming the path
    (on the old code reads at different sizes returned different bytes)."""
    data = os.urandom(3 * BS * 10)
    forge = simple(st, lambda f: {key(b"/", b"big"): f.file(data, size=10 * BS,
                                                             extents=f.blocks(data, 3 * BS))})
    drive = await Drive(st, forge.key).open()
    entry = await drive.lookup("/big")
    for offset, size in ((0, 10 * BS), (0, BS), (BS, BS), (5 * BS + 7, 3 * BS)):
        with pytest.raises(VerificationError, match=r"/big.*block \d+ holds 12288 bytes"):
            await drive.read(entry, offset, size, b"/big")
    line = one_line(run_cli(home, "cat", forge.key_text, "/big", check=False))
    assert forge.key_text + "@1" in line and "/big" in line
    assert run_cli(home, "cat", forge.key_text, "/big", check=False).stdout == b""


def test_f1_a_short_block_is_a_bad_drive_not_a_short_file(home, st):
    """Extents naming a 17-byte block for a 200-byte file: cat fails (it wrote
    17 bytes and exited 0)."""
    forge = simple(st, lambda f: {key(b"/", b"short"): f.file(b"x" * 17, size=200),
                                  key(b"/", b"long"): f.file(b"y" * (BS + 1), size=BS - 1)})
    r = run_cli(home, "cat", forge.key_text, "/short", check=False)
    line = one_line(r)
    assert "/short" in line and "17 bytes" in line and r.stdout == b""
    line = one_line(run_cli(home, "cat", forge.key_text, "/long", check=False))
    assert "/long" in line


def test_f1_a_huge_block_read_fails_before_joining_it(home, st):
    """Header 4 KiB over 960 KiB blocks: the old code joined ~1,000 of them
    for one read (1.1 GB RSS); now it fails at once, in little memory."""
    big = 960 << 10
    block = os.urandom(big)
    n = 300  # 288 MB of blocks: one read of the old code joined them all

    def items(f):
        first = f.length
        for _ in range(n):
            f.raw(block)
        return {key(b"/", b"f"): Entry(KIND_FILE, 0o644, 0, n * BS, ((first, n),))}
    forge = simple(st, items)
    # The peak RSS of the command itself (VmHWM after exec: rusage would count
    # the pytest process the child was forked from).
    peak = ("import sys\nfrom p2pfs.cli import main\nrc = main(sys.argv[1:])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print('peak', hwm.split()[1], file=sys.stderr)\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", peak, "--home", str(home), "cat", forge.key_text, "/f"],
                       env=cli_env(), cwd=REPO, capture_output=True, timeout=120)
    *lines, last = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and r.stdout == b"" and len(lines) == 1 and "/f" in lines[0], r.stderr
    kib = int(last.split()[1])
    print(f"cat of the hostile file: peak RSS {kib >> 10} MiB")
    assert kib < 200 << 10, f"peak RSS {kib} KiB"


@pytest.mark.parametrize("block_size", [512, 1000, 3 * 4096, 1 << 20, 1 << 24])
async def test_f1_a_header_block_size_no_drive_can_have(home, st, block_size):
    forge = Forge(st, header=index.encode_block(Header(1, block_size, 1)))
    forge.commit(forge.leaf({ROOT: d()}))
    with pytest.raises(VerificationError, match="block size"):
        await Drive(st, forge.key).open()
    assert "block size" in one_line(run_cli(home, "ls", forge.key_text, check=False))


# --- finding 3: numbers that overflow stat --------------------------------------------------

def _poisoned(st, poison: bytes) -> Forge:
    """/ok (a file) and /bad (a directory whose children are in one leaf of
    `poison` bytes): the rest of the drive stays readable."""
    forge = Forge(st)
    ok = forge.file(b"fine\n")
    top = forge.leaf({ROOT: d(), key(b"/", b"ok"): ok, key(b"/", b"bad"): d()})
    bad = forge.raw(poison)
    forge.commit(forge.internal([b"/bad\x00"], [top, bad]))
    return forge


HUGE = [Entry(KIND_FILE, 0o644, 0, 1 << 63), Entry(KIND_FILE, 0o644, 1 << 63, 0),
        Entry(KIND_FILE, 0o644, 0, 0, ((1 << 63, 1),))]


@pytest.mark.parametrize("entry", HUGE, ids=["size", "mtime", "extent"])
async def test_f3_numbers_are_bounded_when_decoding(home, st, entry):
    forge = _poisoned(st, index.encode_block(Leaf([b"/bad\x00huge"], [entry])))
    drive = await Drive(st, forge.key).open()
    with pytest.raises(VerificationError):
        await drive.lookup("/bad/huge")
    assert await drive.read(await drive.lookup("/ok"), 0, 100) == b"fine\n"
    line = one_line(run_cli(home, "ls", "-l", forge.key_text, "/bad/huge", check=False))
    assert forge.key_text in line


# --- finding 4: names that are not names --------------------------------------------------

BAD_NAMES = [b"", b".", b"..", b"a/b", b"a\x00b", b"x" * 256]


def _bad_names(st) -> Forge:
    return simple(st, lambda f: {**{key(b"/", n): f.file(b"evil %r\n" % n) for n in BAD_NAMES},
                                 key(b"/", b"ok"): f.file(b"ok\n"),
                                 key(b"/", b"sub"): d(),
                                 key(b"/sub", b".."): d(), key(b"/sub", b"fine"): f.file(b"f\n")})


async def test_f4_bad_names_are_skipped_and_reported_once(home, st):
    forge = _bad_names(st)
    reported = []
    drive = await Drive(st, forge.key).open()
    drive.warn = reported.append
    for _ in range(2):
        assert [n for n, _ in await drive.listdir("/")] == [b"ok", b"sub"]
        assert [n for n, _ in await drive.listdir("/sub")] == [b"fine"]
    assert len(reported) == len(BAD_NAMES) + 1, reported  # once each, not once per listing
    assert all("invalid name" in r and forge.key_text + "@1" in r for r in reported)
    assert [p for p, _ in drive.walk_local()] == [b"/", b"/ok", b"/sub", b"/sub/fine"]
    r = run_cli(home, "ls", forge.key_text)
    assert r.stdout == b"ok\nsub\n"
    assert len(warnings_of(r)) == len(BAD_NAMES) and len(r.stderr.splitlines()) == len(BAD_NAMES)
    r = run_cli(home, "verify", forge.key_text, check=False)
    assert r.returncode == 1 and r.stderr.count("invalid name") == len(BAD_NAMES) + 1, r.stderr
    assert len(verify_drive(Drive(st, forge.key))) == len(BAD_NAMES) + 1


@needs_fuse
def test_f4_mount_lists_only_valid_names(tmp_path, home, st):
    from test_mount import mounted
    forge = _bad_names(st)
    mnt = tmp_path / "mnt"
    with mounted(home, forge.key_text, mnt):
        assert os.path.isdir(mnt)  # the empty name did not take over the root inode
        assert sorted(os.listdir(mnt)) == ["ok", "sub"]
        assert os.listdir(mnt / "sub") == ["fine"]
        assert (mnt / "ok").read_bytes() == b"ok\n"


# --- finding 5: ls -R ---------------------------------------------------------------------

def test_f5_ls_R_neither_loops_nor_stops_at_dot_dirs(home, st):
    forge = simple(st, {key(b"/", b"."): d(), key(b"/", b".."): d(), key(b"/", b"a"): d(),
                        key(b"/a", b"."): d(), key(b"/a", b"x"): d()})
    r = run_cli(home, "ls", "-R", forge.key_text, timeout=20)
    assert r.stdout == b"/:\na\n\n/a:\nx\n\n/a/x:\n"


# --- finding 6: the root -----------------------------------------------------------------

def _bad_roots(st) -> dict[str, Forge]:
    out = {"missing": simple(st, {key(b"/", b"x"): d()}, root=None),
           "a symlink": simple(st, {}, root=link(b"/etc")),
           "a file": simple(st, lambda f: {ROOT: f.file(b"root?")})}
    forge = Forge(st)
    forge.commit(forge.raw(b"\x93\x03\xc0garbage"))  # the root node does not decode
    out["undecodable"] = forge
    forge = Forge(st)
    forge.commit(0)  # the "root node" is the header
    out["the header"] = forge
    return out


def test_f6_a_bad_root_is_one_clear_line(home, st):
    for what, forge in _bad_roots(st).items():
        for args in (["ls", forge.key_text], ["ls", "-R", forge.key_text],
                     ["cat", forge.key_text, "/x"], ["info", forge.key_text]):
            line = one_line(run_cli(home, *args, check=False))
            assert forge.key_text in line and "root" in line, (what, args, line)


@needs_fuse
def test_f6_mount_of_a_bad_root_is_one_clear_line(tmp_path, home, st):
    from test_mount import mount_layers
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for what, forge in _bad_roots(st).items():
        for daemon in ([], ["--daemon"]):
            r = run_cli(home, "mount", forge.key_text, mnt, *daemon, check=False, timeout=60)
            line = one_line(r)
            assert "root" in line and forge.key_text in line, (what, line)
            assert mount_layers(mnt) == []


# --- finding 7: an extent past the end of the log ------------------------------------------

def test_f7_an_extent_past_the_log_fails_at_once_even_with_peers(tmp_path, home, home2):
    from test_mount_net import seeding
    with Store(home) as store:
        forge = simple(store, lambda f: {key(b"/", b"far"): Entry(KIND_FILE, 0o644, 0, 10,
                                                                  ((f.length + 50, 1),)),
                                         key(b"/", b"zero"): Entry(KIND_FILE, 0o644, 0, 10, ((0, 1),)),
                                         key(b"/", b"ok"): f.file(b"ok\n")})
    with seeding(home, forge.key_text) as addr:
        for path in ("/far", "/zero"):
            start = time.monotonic()
            r = run_cli(home2, "cat", forge.key_text, path, "--peer", addr, "--timeout", "30",
                        check=False)
            took = time.monotonic() - start
            line = one_line(r)
            assert path in line and forge.key_text in line, line
            assert took < 10, f"{path}: took {took:.1f} s"
        assert run_cli(home2, "cat", forge.key_text, "/ok", "--peer", addr).stdout == b"ok\n"

