"""`p2pfs mirror KEY[@N] DIR [--live]` (issue 12, acceptance 2 and 4): a drive
exported to a plain directory, incrementally, atomically per file, and never
outside DIR however hostile the drive.

Hostile drives are built here from raw parts (blocks, tree, signature through
the real write path; raw index keys that never went through
`normalize_path`).  Tests with peers open sockets on loopback: run under
`unshare -n` (as scripts/test does).  Every process is stopped in a `finally`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

from helpers import (REPO, cli_command, cli_env, create, make_tree, run_cli, stop_process,
                     write_random)
from p2pfs import crypto, index
from p2pfs.index import KIND_DIR, KIND_FILE, KIND_SYMLINK, Commit, Entry, Header, Leaf
from p2pfs.publish import _Appender
from p2pfs.store import DriveRecord, Store
from test_mount import wait_until
from test_mount_net import seeding
from test_seed import Running, Throttle
from test_share import same_tree, sharing

MiB = 1 << 20
LOCAL = ("--no-lan", "--no-dht")
T = 1_700_000_000_123_456_789  # an mtime with every nanosecond digit set


def mirror(home, ref, out, *extra, check=True):
    """`p2pfs mirror --json`: (result, events)."""
    r = run_cli(home, "mirror", ref, out, "--json", *LOCAL, *extra, check=check)
    return r, [json.loads(line) for line in r.out.splitlines() if line]


def version_event(events) -> dict:
    return [e for e in events if e["event"] == "version"][-1]


def inodes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_ino for p in Path(root).rglob("*")}


def files_in(root) -> int:
    """Files and links below `root` (a link to a directory is a link)."""
    return sum(1 for p in Path(root).rglob("*") if p.is_symlink() or not p.is_dir())


def test_a_full_mirror_then_only_what_changed(tmp_path, home):
    src = make_tree(tmp_path / "src", files=150, big=3 * MiB)
    os.utime(src / "run.sh", ns=(T, T))
    key = create(home, src)
    out = tmp_path / "out"
    r, ev = mirror(home, key, out)
    same_tree(src, out)
    first = version_event(ev)
    assert first["written"] == files_in(src) and first["unchanged"] == 0 and first["refused"] == 0
    assert os.lstat(out / "run.sh").st_mtime_ns == T  # nanoseconds, as the drive has them
    before = inodes(out)
    # a version later: one changed, one added, one deleted, a chmod, a new link, a rename
    (src / "d0-0" / "f00000.txt").write_bytes(b"changed\n")
    (src / "added.txt").write_text("added\n")
    (src / "empty").unlink()
    (src / "run.sh").chmod(0o700)
    os.symlink("added.txt", src / "to-added")
    os.rename(src / "big.bin", src / "moved.bin")
    run_cli(home, "import", "-q", key, src)
    r, ev = mirror(home, key, out)
    same_tree(src, out)
    second = version_event(ev)
    assert (second["written"], second["deleted"]) == (5, 2), second  # not the 150 others
    after = inodes(out)
    untouched = [p for p in before if p in after and p not in
                 ("d0-0/f00000.txt", "run.sh", "d0-0", ".")]
    assert all(before[p] == after[p] for p in untouched)  # the rest was not rewritten
    # nothing new: nothing written
    r, ev = mirror(home, key, out)
    assert version_event(ev)["written"] == 0
    assert not list(out.rglob(".p2pfs-*"))
    shutil.rmtree(out)  # DIR removed: the next run writes everything again
    _r, ev = mirror(home, key, out)
    assert version_event(ev)["written"] == files_in(src)
    same_tree(src, out)
    state = home / "mirrors"  # the home is private
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()} == {0o600}


def test_modes_never_setuid_and_a_fixed_version(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    (src / "tool").chmod(0o6755)
    (src / "shared").mkdir()
    (src / "shared").chmod(0o1777)
    (src / "ro").mkdir()
    (src / "ro" / "inside").write_text("x")
    (src / "ro").chmod(0o555)
    key = create(home, src)
    (src / "tool").write_bytes(b"#!/bin/sh\necho 2\n")
    run_cli(home, "import", "-q", key, src)
    out = tmp_path / "out"
    mirror(home, key, out)
    assert stat.S_IMODE(os.lstat(out / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(out / "shared").st_mode) == 0o777
    assert stat.S_IMODE(os.lstat(out / "ro").st_mode) == 0o555
    assert (out / "ro" / "inside").read_text() == "x"
    _r, ev = mirror(home, f"{key}@1", out)  # back to version 1: only that file changes
    assert version_event(ev)["version"] == 1 and version_event(ev)["written"] == 1
    assert (out / "tool").read_bytes() == b"#!/bin/sh\n"
    r = run_cli(home, "mirror", f"{key}@1", out, "--live", check=False)
    assert r.returncode == 2 and "--live" in r.stderr


def test_prune_and_no_prune(tmp_path, home):
    src = make_tree(tmp_path / "src", files=20, symlinks=False)
    key = create(home, src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("not the drive's")
    (out / "junk").mkdir()
    (out / "junk" / "x").write_text("x")
    mirror(home, key, out, "--no-prune")
    assert (out / "mine.txt").exists() and (out / "junk" / "x").exists()
    (src / "run.sh").unlink()
    run_cli(home, "import", "-q", key, src)
    mirror(home, key, out, "--no-prune")
    assert (out / "run.sh").exists()
    _r, ev = mirror(home, key, out, "--full")  # compare all, prune what the drive lacks
    assert not (out / "mine.txt").exists() and not (out / "junk").exists()
    assert not (out / "run.sh").exists()
    assert version_event(ev)["deleted"] == 3
    same_tree(src, out)
    # another drive into the same directory: a full pass, the old one's files go
    other = make_tree(tmp_path / "other", files=5, seed=9, symlinks=False, unicode=False)
    key2 = create(home, other)
    mirror(home, key2, out)
    same_tree(other, out)


def test_every_file_is_replaced_whole(tmp_path, home):
    """A reader of DIR sees the old file or the new one, never a mix."""
    src = tmp_path / "src"
    src.mkdir()
    size = 24 * MiB
    (src / "f.bin").write_bytes(b"a" * size)
    key = create(home, src)
    out = tmp_path / "out"
    mirror(home, key, out)
    (src / "f.bin").write_bytes(b"b" * size)
    run_cli(home, "import", "-q", key, src)
    seen = set()
    torn = []
    stop = threading.Event()

    def read():
        while not stop.is_set():
            data = (out / "f.bin").read_bytes()
            if len(data) != size or data.count(data[:1]) != size:
                torn.append(len(data))
            seen.add(data[:1])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        mirror(home, key, out)
        wait_until(lambda: b"b" in seen or not reader.is_alive(), what="the new content")
    finally:
        stop.set()
        reader.join()
    assert not torn, torn
    assert seen == {b"a", b"b"} or seen == {b"b"}


# --- acceptance 2: live, and a hostile drive -------------------------------------------------

def test_acceptance_2_live_follows_every_kind_of_change_within_3s(tmp_path, home, home2):
    src = make_tree(tmp_path / "src", files=30, big=MiB)
    out = tmp_path / "out"
    with sharing(home, src) as share:
        proc = subprocess.Popen(cli_command(home2, "mirror", share.key, out, "--live", "--peer",
                                            share.address, *LOCAL), env=cli_env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: out.exists() and (out / "run.sh").exists(), 60, "the first mirror")
            wait_until(lambda: _same(src, out), 20, "the first version in DIR")
            changes = [
                ("add", lambda: (src / "new.txt").write_text("new\n")),
                ("modify", lambda: (src / "big.bin").write_bytes(os.urandom(MiB + 7))),
                ("delete", lambda: (src / "empty").unlink()),
                ("rename", lambda: os.rename(src / "d0-1", src / "renamed-dir")),
                ("chmod", lambda: (src / "run.sh").chmod(0o600)),
                ("symlink", lambda: os.symlink("new.txt", src / "link-new")),
            ]
            took = {}
            for what, change in changes:
                change()
                started = time.monotonic()
                wait_until(lambda: _same(src, out), 20, f"{what} to reach DIR", interval=0.05)
                took[what] = time.monotonic() - started
            print("mirror --live: " + ", ".join(f"{w} {t:.2f} s" for w, t in took.items()))
            assert all(t < 3.0 for t in took.values()), took
            same_tree(src, out)
        finally:
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()


def _same(src, out) -> bool:
    try:
        same_tree(src, out)
        return True
    except (AssertionError, FileNotFoundError):
        return False


def forge(store: Store, items: dict[bytes, Entry | bytes], block_size: int = 4096) -> str:
    """A drive signed by a stranger whose index is exactly `items` (raw keys;
    a bytes value is a file's content), landed in `store` as a drive it reads."""
    key, seed = crypto.generate_keypair()
    app = _Appender(store, key, 0, [], None)
    app.append(index.encode_block(Header(1, block_size, T)))
    entries = {}
    for k, v in items.items():
        if isinstance(v, bytes):
            first = app.length
            pieces = [v[i:i + block_size] for i in range(0, len(v), block_size)]
            for p in pieces:
                app.append(p)
            v = Entry(KIND_FILE, 0o644, T, len(v), ((first, len(pieces)),) if pieces else ())
        entries[k] = v
    keys = sorted(entries)
    root = app.append(index.encode_block(Leaf(keys, [entries[k] for k in keys])))
    app.append(index.encode_block(Commit(1, root, -1, T, "forged", 0, 0)))
    app.sign_and_commit(seed, DriveRecord(owned=False, pinned=False))
    return crypto.encode_key(key)


def test_acceptance_2_a_hostile_drive_writes_nothing_outside_dir(tmp_path, home):
    sandbox = tmp_path / "sandbox"
    out = sandbox / "mirror" / "out"
    out.mkdir(parents=True)
    (sandbox / "victim.txt").write_text("keep me\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    d = Entry(KIND_DIR, 0o755, T)

    def link(target: bytes) -> Entry:
        return Entry(KIND_SYMLINK, 0o777, T, len(target), (), target)

    bad = {
        b"/\x00..": b"dot-dot",
        b"/\x00.": b"dot",
        b"/\x00": b"empty name",
        b"/\x00a/../../../victim.txt": b"slash in a name",
        b"/\x00nul\x00byte": b"a NUL",
        b"/\x00" + b"n" * 300: b"over-long",
        b"/../..\x00victim.txt": b"a parent path with ..",
        b"/\x00escape": link(os.fsencode(os.path.relpath(outside, out))),
        b"/escape\x00payload": b"through the escaping link",
        b"/\x00abs": link(os.fsencode(outside)),
        b"/abs\x00payload": b"through the absolute link",
        b"/\x00file": b"a plain file",
        b"/file\x00under": b"a file below a file",
    }
    good = {b"": d, b"/\x00ok.txt": b"fine\n", b"/\x00dir": d, b"/dir\x00inner.txt": b"inner\n",
            b"/\x00rel": link(b"ok.txt")}
    with Store(home) as store:
        key = forge(store, {**good, **bad})
    def everything_but_dir_and_home():
        return sorted((str(p), p.lstat().st_mtime_ns) for p in tmp_path.rglob("*")
                      if not {out, home} & ({p} | set(p.parents)))

    snapshot = everything_but_dir_and_home()
    r, ev = mirror(home, key, out, check=False)
    assert r.returncode == 1, r.stderr
    # nothing outside DIR changed, nothing was written through a link
    assert everything_but_dir_and_home() == snapshot
    assert (sandbox / "victim.txt").read_text() == "keep me\n" and os.listdir(outside) == []
    # the good entries are there, as they are
    assert (out / "ok.txt").read_bytes() == b"fine\n"
    assert (out / "dir" / "inner.txt").read_bytes() == b"inner\n"
    assert os.readlink(out / "rel") == "ok.txt" and (out / "file").read_bytes() == b"a plain file"
    # links are made as they are (never followed), like cp -a and rsync -a
    assert os.path.islink(out / "escape") and os.path.islink(out / "abs")
    assert sorted(os.listdir(out)) == ["abs", "dir", "escape", "file", "ok.txt", "rel"]
    # each bad one reported, by name, one line each
    refused = [e for e in ev if e["event"] == "refused"]
    assert len(refused) == 10 and version_event(ev)["refused"] == 10, refused
    reasons = "\n".join(f"{e['path']}: {e['reason']}" for e in refused)
    for want in ("name is '..'", "name is '.'", "empty name", "name contains '/'",
                 "name contains a NUL byte", "300 bytes long", "escape/payload", "abs/payload",
                 "file/under"):
        assert want in reasons, (want, reasons)
    assert "10 entries of the drive were refused" in r.stderr
    # --safe-links: the links that leave DIR are refused too
    out2 = sandbox / "mirror" / "out2"
    r, ev = mirror(home, key, out2, "--safe-links", check=False)
    reasons = [e["reason"] for e in ev if e["event"] == "refused"]
    assert "absolute link target (--safe-links)" in reasons
    assert "link target leaves the directory (--safe-links)" in reasons
    assert sorted(os.listdir(out2)) == ["dir", "file", "ok.txt", "rel"]


def _climbing_links(home) -> str:
    """A drive whose links each look safe alone: d/up -> '..' is DIR, and
    'd/up/..' never goes above DIR as text.  But d/up is a link, so
    chain -> 'd/up/..' is DIR/.."""
    d = Entry(KIND_DIR, 0o755, T)

    def link(target: bytes) -> Entry:
        return Entry(KIND_SYMLINK, 0o777, T, len(target), (), target)

    entries = {b"": d, b"/\x00d": d, b"/d\x00up": link(b".."), b"/\x00chain": link(b"d/up/.."),
               b"/\x00near": link(b"d/../d"), b"/\x00ok": link(b"d/up")}
    with Store(home) as store:
        return forge(store, entries)


def test_safe_links_refuse_a_climb_through_another_link(tmp_path, home):
    """--safe-links refuses any '..' after a name (see _climbing_links)."""
    out = tmp_path / "out"
    key = _climbing_links(home)
    r, ev = mirror(home, key, out, "--safe-links", check=False)
    refused = {e["path"]: e["reason"] for e in ev if e["event"] == "refused"}
    assert refused == {"/chain": "link target climbs up after a name (--safe-links)",
                       "/near": "link target climbs up after a name (--safe-links)"}, refused
    assert r.returncode == 1
    assert os.readlink(out / "d" / "up") == ".." and os.readlink(out / "ok") == "d/up"
    assert sorted(os.listdir(out)) == ["d", "ok"]


def test_quiet_mirror_still_names_what_it_refused(tmp_path, home):
    """-q silences the report of each version, not the refusals: the last
    line says they were "named above", and they are."""
    key = _climbing_links(home)
    r = run_cli(home, "mirror", "-q", "--safe-links", key, tmp_path / "out", *LOCAL, check=False)
    assert r.returncode == 1 and r.out == ""
    why = "link target climbs up after a name (--safe-links)"
    assert r.stderr.splitlines() == [
        f"p2pfs: mirror: refused /chain: {why}", f"p2pfs: mirror: refused /near: {why}",
        "p2pfs: mirror: 2 entries of the drive were refused (named above)"], r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["d", "ok"]


def test_a_tree_deeper_than_the_recursion_limit(tmp_path, home):
    """1,500 nested directories (a path of 3,000 bytes, which drives allow):
    the exporter opened a directory by recursing into its parent, and a
    drive this deep ended the mirror with RecursionError; so did removing
    it when the next version has a file there."""
    from hostile import Forge
    depth = 1500
    with Store(home) as store:
        f = Forge(store, block_size=1 << 19)
        d = Entry(KIND_DIR, 0o755, T)
        items = {b"": d}
        parent = b""
        for _ in range(depth):
            items[(parent or b"/") + b"\x00a"] = d
            parent += b"/a"
        items[parent + b"\x00bottom.txt"] = f.file(b"at the bottom\n")
        keys = sorted(items)
        leaves, separators, size, first = [], [], 0, 0
        for i, k in enumerate(keys):  # leaves of at most about 450 KB
            size += len(k) + 40
            if size > 450_000 or i == len(keys) - 1:
                upto = i + 1 if i == len(keys) - 1 else i
                leaves.append(f.leaf({k: items[k] for k in keys[first:upto]}))
                if upto < len(keys):
                    separators.append(keys[upto])
                first, size = upto, len(k) + 40
        f.commit(f.internal(separators, leaves))
        # version 2: a file where the deep tree was
        f.commit(f.leaf({b"": d, b"/\x00a": f.file(b"a file now\n")}))
        key = f.key_text
    out = tmp_path / "out"
    mirror(home, f"{key}@1", out)
    deepest = out.joinpath(*["a"] * depth)
    try:
        assert (deepest / "bottom.txt").read_bytes() == b"at the bottom\n"
        # removing the tree recursed (shutil.rmtree: RecursionError) and
        # held a descriptor per level
        _r, ev = mirror(home, f"{key}@2", out)
        assert (out / "a").read_bytes() == b"a file now\n"
        assert os.listdir(out) == ["a"]
        # and back: the file is replaced by the deep tree again
        mirror(home, f"{key}@1", out)
        assert (deepest / "bottom.txt").read_bytes() == b"at the bottom\n"
    finally:  # shutil.rmtree (pytest's clean-up) recurses too: rm does not
        subprocess.run(["rm", "-rf", str(out)], check=True)


# --- acceptance 4: kill -9 mid-transfer ---------------------------------------------------

def test_acceptance_4_mirror_live_killed_mid_transfer_resumes(tmp_path, home, home2):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        write_random(src / f"part{i}.bin", 4 * MiB, seed=i)
    key = create(home, src)
    out = tmp_path / "out"
    total = json.loads(run_cli(home, "info", key, "--json").out)["bytes_held"]
    with seeding(home, key) as addr:
        slow = Throttle(addr, 6 * MiB)
        try:
            first = subprocess.Popen(cli_command(home2, "mirror", key, out, "--live", "--peer",
                                                 slow.address, *LOCAL), env=cli_env(), cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                def held():
                    return json.loads(run_cli(home2, "info", key, "--json").out)["bytes_held"]
                wait_until(lambda: os.path.exists(home2 / "store") and total // 4 < held(), 60,
                           "a quarter of the drive to arrive", interval=0.1)
                wait_until(lambda: any(s["pid"] == first.pid for s in
                                       json.loads(run_cli(home2, "status", "--json").out)),
                           what="the mirror to be listed by status")
                os.kill(first.pid, signal.SIGKILL)
                first.wait()
            finally:
                stop_process(first)
        finally:
            slow.close()
        assert all(s["pid"] != first.pid for s in json.loads(run_cli(home2, "status", "--json").out))
        had = json.loads(run_cli(home2, "info", key, "--json").out)["bytes_held"]
        assert had < total * 9 // 10
        again = Running(home2, "mirror", key, out, "--live", "--peer", addr, "--json", *LOCAL)
        try:
            again.wait(lambda ev: [e for e in ev if e["event"] == "version"],
                       "the restarted mirror to write the version")
            st = wait_until(lambda: [s for s in json.loads(run_cli(home2, "status", "--json").out)
                                     if s["pid"] == again.proc.pid
                                     and s["drives"][0]["state"] == "idle"],
                            what="the restarted mirror's state")[0]
            # it fetched what was missing, not what the killed one had fetched
            assert st["bytes_down"] < (total - had) * 1.1 + 256 * 1024, (st["bytes_down"], had, total)
        finally:
            again.stop()
    same_tree(src, out)
    assert not list(out.rglob(".p2pfs-*"))


def test_live_mirror_waits_out_a_peer_that_went_away_mid_version(tmp_path, home, home2):
    """The only peer goes away in the middle of a version's blocks: `mirror
    --live` says it is waiting (a "waiting" event), keeps what it fetched,
    and finishes the version when the peer is back at the same address."""
    src = make_tree(tmp_path / "src", files=10)
    key = create(home, src)
    out = tmp_path / "out"
    with seeding(home, key) as addr:
        link = Throttle(addr, 2 * MiB)
        port = int(link.address.rpartition(":")[2])
        m = Running(home2, "mirror", key, out, "--live", "--json", "--peer", link.address,
                    "--timeout", "2", *LOCAL)
        try:
            def event(kind, **fields):
                return lambda ev: [e for e in ev if e["event"] == kind
                                   and all(e.get(k) == v for k, v in fields.items())]

            def held():
                return json.loads(run_cli(home2, "info", key, "--json").out)["bytes_held"]
            m.wait(event("version", version=1), "version 1 to be written")
            before = held()
            write_random(src / "big.bin", 16 * MiB, seed=7)
            run_cli(home, "import", "-q", key, src)
            m.wait(lambda _ev: held() > before + 2 * MiB, "version 2's blocks to be on their way")
            link.close()  # the only peer goes away in the middle of version 2's blocks
            why = m.wait(event("waiting"), "the mirror to say it waits")[0]["reason"]
            assert "did not arrive" in why and link.address in why, why
            assert not event("version", version=2)(m.events())
            assert held() < before + 15 * MiB  # mid-version indeed
            link = Throttle(addr, 64 * MiB, port)  # back, at the same address
            got = m.wait(event("version", version=2), "version 2 to be written")[0]
            assert got["written"] == 1 and got["bytes"] == 16 * MiB
            assert m.proc.poll() is None  # still following
        finally:
            link.close()
            code = m.stop()
        assert code == 0, m.stderr()
    same_tree(src, out)


def test_mirror_json_and_plain_output(tmp_path, home):
    src = make_tree(tmp_path / "src", files=10)
    key = create(home, src)
    r = run_cli(home, "mirror", key, tmp_path / "out", *LOCAL)
    assert r.out == ""
    assert re.search(r"^p2pfs: mirror: version 1 in .*out: \d+ written", r.stderr, re.M)
    _r, ev = mirror(home, key, tmp_path / "out2")
    e = version_event(ev)
    assert {"key", "directory", "version", "length", "written", "deleted", "unchanged",
            "refused", "bytes", "dirs"} <= e.keys()
    assert e["key"] == key and e["directory"] == str(tmp_path / "out2")
