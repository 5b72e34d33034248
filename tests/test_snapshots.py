"""Every version inside the mount: the hidden, enterable `.p2pfs/versions/N/` (issue 9,
acceptance 7, the mount part).  Real mounts; a second home reads through a seeder."""

from __future__ import annotations

import os
import subprocess

from helpers import create, run_cli, source_listing
from test_mount import import_dir, mounted, wait_until
from test_net import seeders  # noqa: F401  (a fixture)


def _tree(root, version: int):
    (root / "docs").mkdir(parents=True, exist_ok=True)
    (root / "docs" / "a.txt").write_text(f"a in version {version}\n")
    (root / f"only-in-{version}.txt").write_text(f"{version}\n" * 1000)
    for old in root.glob("only-in-*.txt"):
        if old.name != f"only-in-{version}.txt":
            old.unlink()
    return root


def test_every_version_is_enterable_but_never_listed(tmp_path, home):
    src = _tree(tmp_path / "src", 1)
    v1 = source_listing(src)
    key = create(home, src)
    _tree(src, 2)
    import_dir(home, key, src)
    _tree(src, 3)
    import_dir(home, key, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt):
        assert ".p2pfs" not in os.listdir(mnt)  # ls -a, cp -a, rsync, tar: no history
        out = subprocess.run(["ls", "-a", str(mnt)], capture_output=True, text=True).stdout.split()
        assert ".p2pfs" not in out
        assert sorted(os.listdir(mnt / ".p2pfs" / "versions")) == ["1", "2", "3"]
        assert source_listing(mnt / ".p2pfs" / "versions" / "1") == v1
        assert (mnt / ".p2pfs" / "versions" / "2" / "docs" / "a.txt").read_text() == "a in version 2\n"
        assert (mnt / ".p2pfs" / "versions" / "1" / "only-in-1.txt").read_text() == "1\n" * 1000
        assert not (mnt / ".p2pfs" / "versions" / "1" / "only-in-3.txt").exists()
        assert not (mnt / ".p2pfs" / "versions" / "4").exists()
        # cd into it works, and it is read-only
        r = subprocess.run("cd .p2pfs/versions/1/docs && cat a.txt && touch x", shell=True, cwd=mnt,
                           capture_output=True, text=True)
        assert r.stdout == "a in version 1\n" and r.returncode != 0
        # tar of the mount copies no history
        r = subprocess.run(["tar", "cf", "-", "."], cwd=mnt, capture_output=True)
        assert b".p2pfs" not in r.stdout
        # a new version appears in versions/ and the old ones stay as they were
        _tree(src, 4)
        import_dir(home, key, src)
        wait_until(lambda: "4" in os.listdir(mnt / ".p2pfs" / "versions"), what="version 4 listed")
        assert source_listing(mnt / ".p2pfs" / "versions" / "1") == v1
        assert (mnt / "only-in-4.txt").exists()


def test_old_versions_fetch_lazily_from_peers(tmp_path, seeders):
    """A reader's mount reads an old version through the seeder, only what it reads."""
    a, b = tmp_path / "a", tmp_path / "b"
    src = _tree(tmp_path / "src", 1)
    big = os.urandom(16 << 20)
    (src / "big.bin").write_bytes(big)
    key = create(a, src)
    (src / "big.bin").unlink()
    _tree(src, 2)
    import_dir(a, key, src)
    seeder = seeders(a, key)
    mnt = tmp_path / "mnt"
    with mounted(b, key, mnt, "--peer", seeder.address, "--no-lan", "--no-dht"):
        assert not (mnt / "big.bin").exists()
        old = mnt / ".p2pfs" / "versions" / "1"
        assert (old / "docs" / "a.txt").read_text() == "a in version 1\n"
        held = int(os.getxattr(old / "big.bin", "user.p2pfs.blocks_held"))
        assert held == 0  # listing an old version fetched none of its content
        with open(old / "big.bin", "rb") as f:
            f.seek(2 << 20)
            assert len(f.read(4096)) == 4096
        held = int(os.getxattr(old / "big.bin", "user.p2pfs.blocks_held"))
        assert 0 < held < 256  # of 256 blocks: around what was read (and read ahead)
        assert (old / "big.bin").read_bytes() == big
    assert run_cli(b, "verify", key).returncode == 0
