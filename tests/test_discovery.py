"""Discovery end to end (issue 11, acceptance 1, 2 and 6): real `p2pfs`
processes in network namespaces on one lab bridge, found by key alone.

Needs root and iproute2 (scripts/test runs the suite as root under
`unshare -n`); nothing leaves the machine: the bridge is the only network
and every DHT node is bootstrapped from a lab node.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from bench.netlab import Lab, udp_datagrams
from helpers import cli_command, cli_env, create, write_random
from p2pfs import crypto

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="the lab creates network namespaces: needs root and iproute2")


def _tree(root):
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "hello.txt").write_text("hello from the seeder\n")
    write_random(root / "big.bin", 3 << 20, seed=3)
    return root


def _wait_mounted(mnt, proc, deadline):
    while time.monotonic() < deadline:
        if os.path.ismount(mnt):
            return
        if proc.poll() is not None:
            raise AssertionError(f"mount exited {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError("not mounted in time")


@needs_root
def test_mount_a_key_found_through_the_dht_alone(tmp_path):
    """Acceptance 1 and 6: four DHT nodes, a seeder and a reader on one bridge;
    the reader mounts with only --bootstrap and reads; info says the peer came
    from the DHT; no captured datagram holds the drive key, some hold the infohash."""
    src = _tree(tmp_path / "src")
    owner = tmp_path / "owner"
    key_text = create(owner, src)
    key = crypto.decode_key(key_text)
    info_hash = crypto.discovery_key(key)[:20]
    env = cli_env()
    with Lab() as lab:
        dht_ns = [lab.namespace(f"dht{i}") for i in range(4)]
        seed_ns, read_ns = lab.namespace("seed"), lab.namespace("read")
        bridge = lab.bridge([*dht_ns, seed_ns, read_ns])
        capture = lab.capture(bridge)
        first = f"{bridge.ip(dht_ns[0])}:7640"
        lab.service(dht_ns[0], cli_command(tmp_path / "d0", "dht", "--listen", first), "dht0", env=env)
        for i, ns in enumerate(dht_ns[1:], 1):
            lab.service(ns, cli_command(tmp_path / f"d{i}", "dht", "--listen", f"{bridge.ip(ns)}:7640",
                                        "--bootstrap", first), f"dht{i}", env=env)
        lab.service(seed_ns, cli_command(owner, "seed", key_text, "--listen", f"{bridge.ip(seed_ns)}:0",
                                         "--no-lan", "--bootstrap", first), "seeder", env=env)
        reader = tmp_path / "reader"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        # nsenter, not `ip netns exec` (which makes a mount namespace of its
        # own): the FUSE mount must be visible here
        mount = subprocess.Popen(["nsenter", f"--net=/run/netns/{read_ns.name}", "--",
                                  *cli_command(reader, "mount", key_text, mnt, "--no-lan", "--bootstrap",
                                               first, "--timeout", "60")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            _wait_mounted(mnt, mount, time.monotonic() + 90)
            assert (mnt / "docs" / "hello.txt").read_text() == "hello from the seeder\n"
            assert (mnt / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
            res = lab.run(read_ns, cli_command(tmp_path / "reader2", "info", key_text, "--json", "--no-lan",
                                               "--bootstrap", first, "--timeout", "60"),
                          capture_output=True, env=env)
            assert res.returncode == 0, res.stderr.decode()
            info = json.loads(res.stdout)
            assert info["peers"] and {p["source"] for p in info["peers"]} == {"dht"}, info["peers"]
            assert info["discovery"]["dht"]["lookups"] >= 1
            # the owner's DHT signature of the head travelled with it (to re-put it)
            from p2pfs.store import Store
            with Store(reader) as st:
                head = st.latest_head(key)
                crypto.verify_dht_head(key, head.length, head.root, head.signature,
                                       st.dht_signature(key, head.length))
        finally:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            mount.terminate()
            mount.wait(timeout=20)
            err = mount.stderr.read().decode()
            assert "Traceback" not in err, err
        datagrams = udp_datagrams(capture.stop())
    assert len(datagrams) > 20
    assert any(info_hash in d.payload for d in datagrams), "no datagram carried the infohash"
    for d in datagrams:
        for form in (key, key.hex().encode(), key_text.encode()):
            assert form not in d.payload, f"the drive key went over UDP: {d}"


@needs_root
def test_a_reader_finds_a_seeder_on_the_lan_within_two_seconds(tmp_path):
    """Acceptance 2: seeder and reader on one bridge, no bootstrap, no --peer."""
    src = _tree(tmp_path / "src")
    owner = tmp_path / "owner"
    key_text = create(owner, src)
    env = cli_env()
    with Lab() as lab:
        seed_ns, read_ns = lab.namespace("seed"), lab.namespace("read")
        bridge = lab.bridge([seed_ns, read_ns])
        lab.service(seed_ns, cli_command(owner, "seed", key_text, "--listen", f"{bridge.ip(seed_ns)}:0",
                                         "--no-dht"), "seeder", env=env)
        # --timeout 2: the reader gives up unless the LAN found the seeder within 2 s
        res = lab.run(read_ns, cli_command(tmp_path / "reader", "info", key_text, "--json", "--no-dht",
                                           "--timeout", "2"), capture_output=True, env=env)
        assert res.returncode == 0, res.stderr.decode()
        info = json.loads(res.stdout)
        assert [p["source"] for p in info["peers"]] == ["lan"], info["peers"]
        res = lab.run(read_ns, cli_command(tmp_path / "reader", "cat", key_text, "/docs/hello.txt",
                                           "--no-dht"), capture_output=True, env=env)
        assert res.stdout == b"hello from the seeder\n", res.stderr.decode()


async def test_a_reader_learns_the_newest_head_from_the_dht_alone(tmp_path):
    """BEP 44: the owner's swarm puts its head (with the owner's DHT signature,
    under the blinded key); a reader with no peer at all learns it from the DHT,
    and goes on waiting for a peer that holds its blocks."""
    import trio

    from p2pfs.drive import Drive
    from p2pfs.net.discovery.dht.node import DhtNode
    from p2pfs.net.discovery.dht_source import DhtSource
    from p2pfs.net.swarm import open_swarm
    from p2pfs.store import Store

    src = _tree(tmp_path / "src")
    key = crypto.decode_key(create(tmp_path / "owner", src))
    async with trio.open_nursery() as nursery:
        first = DhtNode(bind=("127.0.0.2", 0), bootstrap=[], timeout=1.0)
        await nursery.start(first.run)
        boot = [first.address]
        others = [DhtNode(bind=(f"127.0.0.{i}", 0), bootstrap=boot, timeout=1.0) for i in range(3, 7)]
        for node in others:
            await nursery.start(node.run)
        owner_store, reader_store = Store(tmp_path / "owner"), Store(tmp_path / "reader")
        try:
            async with open_swarm(owner_store, crypto.x25519_keypair()[0]) as owner:
                await owner.add_source(DhtSource(DhtNode(bind=("127.0.0.7", 0), bootstrap=boot, timeout=1.0)))
                owner.add_drive(Drive(owner_store, key))
                async with open_swarm(reader_store, crypto.x25519_keypair()[0]) as reader:
                    await reader.add_source(DhtSource(DhtNode(bind=("127.0.0.8", 0), bootstrap=boot,
                                                              timeout=1.0)))
                    drive = reader.add_drive(Drive(reader_store, key))
                    # lookups are retried after 2, 4, 8 ... s while the owner's put is not
                    # in yet (the owner's node bootstraps meanwhile, and retries too)
                    with trio.fail_after(90):
                        while drive.head is None:
                            await reader.connections.wait_changed()
                    assert drive.head == owner_store.latest_head(key)
                    assert reader_store.dht_signature(key, drive.head.length)
                    # a head from the DHT is no version this home can read: a
                    # reader waits for a peer holding it (its whole timeout),
                    # not the grace of a home that holds the drive
                    waited = trio.current_time()
                    await reader.wait_for_peers(drive, 3.0)
                    assert trio.current_time() - waited >= 2.9
        finally:
            owner_store.close()
            reader_store.close()
        nursery.cancel_scope.cancel()


def test_two_processes_of_one_home_are_two_nodes(tmp_path):
    """A mount and an `info` of the same home both connect to one seeder: each
    process is a node of its own, so the seeder's dedupe keeps both."""
    import trio

    from helpers import REPO
    src = _tree(tmp_path / "src")
    owner = tmp_path / "owner"
    key_text = create(owner, src)
    env = cli_env()
    seed = subprocess.Popen(cli_command(owner, "seed", key_text, "--listen", "127.0.0.1:0"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        address = seed.stdout.readline().decode().split()[-1]
        reader = tmp_path / "reader"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        r = subprocess.run(cli_command(reader, "mount", key_text, mnt, "--daemon", "--peer", address,
                                       "--no-lan", "--no-dht"), env=env, cwd=REPO, capture_output=True)
        assert r.returncode == 0, r.stderr.decode()
        try:
            assert (mnt / "docs" / "hello.txt").read_text() == "hello from the seeder\n"
            r = subprocess.run(cli_command(reader, "info", key_text, "--json", "--peer", address,
                                           "--no-lan", "--no-dht"), env=env, cwd=REPO, capture_output=True)
            assert r.returncode == 0, r.stderr.decode()
            assert [p["address"] for p in json.loads(r.stdout)["peers"]] == [address]
            assert (mnt / "big.bin").read_bytes() == (src / "big.bin").read_bytes()  # still connected
        finally:
            subprocess.run(cli_command(reader, "umount", mnt), env=env, cwd=REPO, capture_output=True)
    finally:
        seed.terminate()
        seed.wait(timeout=20)
