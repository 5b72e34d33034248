"""Fixtures: node homes and sample trees under tmp_path."""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers import TEST_CONFIG, make_tree

# in-process code reads the same configuration as the CLI subprocesses
os.environ["P2PFS_CONFIG"] = str(TEST_CONFIG)


@pytest.fixture
def home(tmp_path):
    """A fresh node home."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def home2(tmp_path):
    """A second node's home."""
    path = tmp_path / "home2"
    path.mkdir()
    return path


@pytest.fixture
def sample(tmp_path):
    """A small sample tree (no big file)."""
    return make_tree(tmp_path / "sample", files=40)


@pytest.fixture
def store(home):
    from p2pfs.store import Store
    s = Store(home)
    yield s
    s.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (a disk that fills up), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small file system")
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
