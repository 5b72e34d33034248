"""History: `p2pfs diff` (classify over index.diff) and `p2pfs log --json`."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from p2pfs.history import ADDED, DELETED, MODE, MODIFIED, RENAMED, Change, classify
from p2pfs.index import KIND_DIR, KIND_FILE, KIND_SYMLINK, Entry

from helpers import create, run_cli


def f(first: int, n: int = 1, mode: int = 0o644, mtime: int = 1) -> Entry:
    return Entry(KIND_FILE, mode, mtime, n * 10, ((first, n),))


D = Entry(KIND_DIR, 0o755, 5)


def test_classify_each_kind_of_change():
    got = classify([
        (b"/mod", f(1), f(2)),                                    # new blocks
        (b"/touched", f(3), f(3, mtime=9)),                        # same blocks, new mtime
        (b"/chmod", f(4), f(4, mode=0o755)),
        (b"/dir", D, Entry(KIND_DIR, 0o755, 99)),                  # mtime only: not listed
        (b"/dirmode", D, Entry(KIND_DIR, 0o700, 5)),
        (b"/kind", f(5), D),                                       # file became a directory
        (b"/old", f(6, 3), None), (b"/new", None, f(6, 3)),        # same blocks: renamed
        (b"/empty-old", Entry(KIND_FILE, 0o644, 1), None),         # no blocks: never paired
        (b"/empty-new", None, Entry(KIND_FILE, 0o644, 1)),
        (b"/link", Entry(KIND_SYMLINK, 0o777, 1, 1, (), b"a"),
         Entry(KIND_SYMLINK, 0o777, 1, 1, (), b"b")),
    ])
    assert [(c.change, c.path, c.old_path) for c in got] == [
        (MODE, b"/chmod", None),
        (MODE, b"/dirmode", None),
        (ADDED, b"/empty-new", None), (DELETED, b"/empty-old", None),
        (ADDED, b"/kind", None), (DELETED, b"/kind", None),
        (MODIFIED, b"/link", None), (MODIFIED, b"/mod", None),
        (RENAMED, b"/new", b"/old"), (MODIFIED, b"/touched", None),
    ]
    assert got[0].line() == b"mode      /chmod  0644 -> 0755"
    assert got[0].as_json() == {"change": "mode", "path": "/chmod", "kind": "file",
                                "old_mode": "0644", "mode": "0755"}
    rename = next(c for c in got if c.change == RENAMED)
    assert rename.line() == b"renamed   /old -> /new"
    assert rename.as_json() == {"change": "renamed", "path": "/new", "kind": "file", "from": "/old"}


def moved_tree(src: bytes, dst: bytes, extra=()) -> list:
    old = [(src, D), (src + b"/a", f(10)), (src + b"/sub", D), (src + b"/sub/b", f(11, 2)),
           (src + b"/empty", Entry(KIND_FILE, 0o600, 3))]
    return ([(p, e, None) for p, e in old] + [(dst + p[len(src):], None, e) for p, e in old]
            + list(extra))


def test_a_moved_directory_is_one_rename():
    got = classify(moved_tree(b"/photos", b"/archive/2025"))
    assert [(c.change, c.path, c.old_path) for c in got] == [
        (RENAMED, b"/archive/2025", b"/photos")]
    # one file inside was changed on the way: the parts that did move whole are listed
    raw = moved_tree(b"/p", b"/q")
    raw[-1] = (b"/q/empty", None, Entry(KIND_FILE, 0o600, 4))
    got = classify(raw)
    assert [(c.change, c.path, c.old_path) for c in got] == [
        (DELETED, b"/p", None), (DELETED, b"/p/empty", None), (ADDED, b"/q", None),
        (RENAMED, b"/q/a", b"/p/a"), (ADDED, b"/q/empty", None), (RENAMED, b"/q/sub", b"/p/sub")]
    # and an extra file in the new place is not hidden either
    got = classify(moved_tree(b"/p", b"/q", [(b"/q/more", None, f(20))]))
    assert (ADDED, b"/q/more") in [(c.change, c.path) for c in got]
    assert (RENAMED, b"/q", b"/p") not in [(c.change, c.path, c.old_path) for c in got]


# ------------------------------------------------------------------ the command


def test_diff_lists_what_a_script_did(home, tmp_path):
    src = tmp_path / "src"
    (src / "docs" / "old").mkdir(parents=True)
    for i in range(30):
        (src / "docs" / "old" / f"{i}.txt").write_bytes(os.urandom(5000 + i))
    (src / "keep").write_bytes(os.urandom(70000))
    (src / "edit").write_bytes(os.urandom(70000))
    (src / "gone").write_text("bye")
    (src / "file.sh").write_text("echo\n")
    key = create(home, src)
    model = {}  # path -> (change, from)

    def step():
        run_cli(home, "import", "-q", key, src)

    (src / "added").write_text("new")
    model["/added"] = ("added", None)
    with open(src / "edit", "r+b") as fh:
        fh.seek(100)
        fh.write(b"changed")
    model["/edit"] = ("modified", None)
    step()
    (src / "gone").unlink()
    model["/gone"] = ("deleted", None)
    os.rename(src / "keep", src / "kept")
    model["/kept"] = ("renamed", "/keep")
    os.chmod(src / "file.sh", 0o755)
    model["/file.sh"] = ("mode", None)
    step()
    os.rename(src / "docs" / "old", src / "archive")
    model["/archive"] = ("renamed", "/docs/old")
    os.makedirs(src / "a" / "b")
    (src / "a" / "b" / "c").write_text("x")
    model.update({"/a": ("added", None), "/a/b": ("added", None), "/a/b/c": ("added", None)})
    shutil.rmtree(src / "docs")
    model["/docs"] = ("deleted", None)
    step()
    out = json.loads(run_cli(home, "diff", key, "1", "--json").out)
    assert (out["from"], out["to"]) == (1, 4)
    assert {c["path"]: (c["change"], c.get("from")) for c in out["changes"]} == model
    text = run_cli(home, "diff", key, "1", "4").out
    assert "renamed   /docs/old -> /archive\n" in text and "deleted   /gone\n" in text
    # the way back is the mirror image; a version with itself is empty
    back = json.loads(run_cli(home, "diff", key, "4", "1", "--json").out)["changes"]
    assert {c["path"] for c in back if c["change"] == "renamed"} == {"/keep", "/docs/old"}
    assert run_cli(home, "diff", key, "2", "2").out == ""
    bad = run_cli(home, "diff", key, "9", check=False)
    assert bad.returncode == 1 and "no version 9" in bad.stderr
    bad = run_cli(home, "diff", key + "@2", "1", check=False)
    assert bad.returncode == 2 and "p2pfs diff KEY V1 [V2]" in bad.stderr


def test_log_json(home, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("abc")
    key = create(home, src, "-m", "first")
    run_cli(home, "import", "-q", "-m", "second", key, src)
    log = json.loads(run_cli(home, "log", key, "--json").out)
    assert [(v["version"], v["message"], v["files"], v["bytes"]) for v in log] == [
        (2, "second", 1, 3), (1, "first", 1, 3)]
    assert log[0]["length"] > log[1]["length"] and log[0]["time_ns"] >= log[1]["time_ns"]


def test_diff_of_a_remote_drive_fetches_only_what_it_compares(home, home2, tmp_path):
    from test_mount_net import seeding
    src = tmp_path / "src"
    for d in range(30):
        (src / f"d{d:02d}").mkdir(parents=True)
        for i in range(100):
            (src / f"d{d:02d}" / f"f{i:03d}").write_bytes(b"%d %d\n" % (d, i))
    key = create(home, src)
    (src / "d07" / "f050").write_text("changed\n")
    os.rename(src / "d20", src / "d20-moved")
    run_cli(home, "import", "-q", key, src)
    with seeding(home, key) as addr:
        out = json.loads(run_cli(home2, "diff", key, "1", "--json", "--peer", addr).out)
        assert [(c["change"], c["path"]) for c in out["changes"]] == [
            ("modified", "/d07/f050"), ("renamed", "/d20-moved")]
        held = json.loads(run_cli(home2, "info", key, "--json").out)["blocks_held"]
        total = json.loads(run_cli(home, "info", key, "--json").out)["length"]
        assert held < total // 4, (held, total)  # index blocks near the changes, no content
