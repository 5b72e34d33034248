"""The versions a home can show (issue 7, finding 12; acceptance 4).

A home shows every version whose commit and index it holds or can fetch; a
newer signed head it cannot read never hides them.  Two ways to get there,
each with every command run on every home involved:

* the relay: R holds version 1 completely, the owner A publishes version 2,
  R (`seed KEY --peer A`) adopts the new head without its blocks, A goes
  away, and a third home C reads from R;
* a signed head with no blocks behind it anywhere (an owner's mistake, a
  stolen key), heard by the owner and by a reader.

Opens sockets: run inside a loopback-only network namespace.
"""

from __future__ import annotations

import json
from contextlib import ExitStack

from hostile import unbacked_head
from helpers import create, run_cli
from p2pfs import crypto, flat
from p2pfs.drive import Drive
from p2pfs.store import Store
from test_mount import wait_until
from test_mount_net import seeding


def info(home, key: str, *extra) -> dict:
    return json.loads(run_cli(home, "info", key, "--json", *extra).out)


def files_of(src) -> dict[str, bytes]:
    return {"/" + p.relative_to(src).as_posix(): p.read_bytes()
            for p in sorted(src.rglob("*")) if p.is_file()}


def check_reads(home, key: str, version: int, files: dict[str, bytes], *peer) -> None:
    """Every command that reads, on `home`, shows `version` with `files`."""
    for ref in (key, f"{key}@{version}"):
        listing = run_cli(home, "ls", "-R", ref, *peer).out
        for path, data in files.items():
            assert path.rsplit("/", 1)[1] in listing, (ref, path)
            assert run_cli(home, "cat", ref, path, *peer).stdout == data, (ref, path)
    assert info(home, key, *peer)["version"] == version


def make_src(root, text: str):
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text(f"{text} a\n" * 300)
    (root / "b.bin").write_bytes(text.encode() * 40_000)
    return root


def stderr_lines(r) -> list[str]:
    return r.stderr.strip().splitlines()


def test_a_relay_shows_the_version_it_holds_and_serves_it(tmp_path, home, home2):
    owner, relay, third = home, home2, tmp_path / "home3"
    third.mkdir()
    src = make_src(tmp_path / "src", "one")
    v1 = files_of(src)
    key = create(owner, src)
    with ExitStack() as stack:
        owner_seed = ExitStack()
        stack.callback(owner_seed.close)
        a = owner_seed.enter_context(seeding(owner, key))
        # R fetches all of version 1 (every index block and every file)
        run_cli(relay, "ls", "-R", key, "--peer", a)
        for path in v1:
            run_cli(relay, "cat", key, path, "--peer", a)
        held = info(relay, key)
        assert held["blocks_held"] == held["length"], held
        (src / "docs" / "a.txt").write_text("two a\n")
        (src / "new.txt").write_text("new in two\n")
        run_cli(owner, "import", key, src, "-q")
        v2 = files_of(src)
        newest = info(owner, key)["length"]
        owner_seed.close()  # the owner goes away
        # R hears of version 2 from a home that holds its signed head and no
        # block (seed copies every version now: from the owner it would get them all)
        herald = tmp_path / "herald"
        herald.mkdir()
        with Store(owner) as st:
            head2 = st.latest_head(crypto.decode_key(key))
        with Store(herald) as st:
            st.put_head(crypto.decode_key(key), head2)
        h = stack.enter_context(seeding(herald, key))
        r = stack.enter_context(seeding(relay, key, "127.0.0.1:0", "--peer", h))
        wait_until(lambda: info(relay, key)["newest_length"] == newest,
                   what="the relay to hear of version 2")

        # R: every command, version 1, and a note about the newer head
        got = info(relay, key)
        assert (got["version"], got["length"]) == (1, held["length"]) and "held up to version 1" in got["note"]
        log = run_cli(relay, "log", key)
        assert [line.split()[1] for line in log.out.splitlines()] == ["1"]
        assert "held up to version 1" in log.stderr and f"length {newest}" in log.stderr
        check_reads(relay, key, 1, v1)
        assert run_cli(relay, "verify", key).out.startswith("ok:")
        missing = run_cli(relay, "ls", f"{key}@2", check=False)
        assert missing.returncode == 1 and "no version 2" in missing.stderr
        # C reads everything of version 1 from R alone, then locally
        check_reads(third, key, 1, v1, "--peer", r)
        note = run_cli(third, "ls", key, "--peer", r).stderr
        assert "held up to version 1" in note and "no connected peer holds" in note
        assert [line.split()[1] for line in run_cli(third, "log", key).out.splitlines()] == ["1"]
        assert run_cli(third, "verify", key).out.startswith("ok:")
        assert info(third, key)["version"] == 1
        # the owner back: C reads version 2 as soon as a peer has it
        a2 = stack.enter_context(seeding(owner, key))
        check_reads(third, key, 2, v2, "--peer", r, "--peer", a2)
        check_reads(owner, key, 2, v2)


def test_a_signed_head_with_no_blocks_hides_nothing(tmp_path, home, home2):
    """A head the owner's key signed over blocks nobody holds (an owner's
    mistake, a stolen key), heard by the owner and a reader: every version
    held still reads; the owner's next import moves everyone past it."""
    owner, reader, thief = home, home2, tmp_path / "thief"
    thief.mkdir()
    src = make_src(tmp_path / "src", "one")
    key = create(owner, src)
    (src / "b.bin").write_bytes(b"two" * 30_000)
    run_cli(owner, "import", key, src, "-q")
    v2 = files_of(src)
    kb = crypto.decode_key(key)
    with Store(owner) as store:
        drive = Drive(store, kb)
        length = drive.head.length
        peaks = [drive.trusted_node(n) for n in flat.full_roots(length)]
        stolen = unbacked_head(kb, store.load_secret(key), length, peaks, [b"x" * 100] * 3)
    with Store(thief) as store:
        store.put_head(kb, stolen)  # the thief holds a head and no block at all
    with seeding(thief, key) as x, seeding(owner, key, "127.0.0.1:0", "--peer", x) as a:
        wait_until(lambda: info(owner, key)["newest_length"] == stolen.length,
                   what="the owner to hear the stolen head")
        got = info(owner, key)
        assert got["version"] == 2 and "secret key is stolen" in got["note"]
        assert [line.split()[1] for line in run_cli(owner, "log", key).out.splitlines()] == ["2", "1"]
        check_reads(owner, key, 2, v2)
        assert run_cli(owner, "verify", key).out.startswith("ok:")
        # a reader hears both heads and reads version 2 from the owner
        check_reads(reader, key, 2, v2, "--peer", a, "--peer", x)
        assert info(reader, key)["newest_length"] == stolen.length
        assert run_cli(reader, "verify", key).out.startswith("ok:")
        # the owner's import goes on from version 2, past the stolen length
        (src / "three.txt").write_text("three\n")
        r = run_cli(owner, "import", key, src, "-q")
        assert r.out.startswith("version 3:") and f"padded past length {stolen.length}" in r.stderr
        v3 = files_of(src)
        got = info(owner, key)
        assert got["version"] == 3 and got["length"] > stolen.length and "note" not in got
        check_reads(owner, key, 3, v3)
        check_reads(reader, key, 3, v3, "--peer", a, "--peer", x)
        assert run_cli(reader, "cat", f"{key}@1", "/b.bin", "--peer", a).stdout == b"one" * 40_000
        # the stolen head and version 3 are two histories: verify says so
        r = run_cli(owner, "verify", key, check=False)
        assert r.returncode == 1 and f"head of length {stolen.length} contradicts" in r.stderr
