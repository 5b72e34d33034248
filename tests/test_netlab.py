"""Tests of the benchmark network lab (bench/netlab.py) itself.

The delay proxy is tested in-process over real loopback sockets against a
real trio echo server, on trio's virtual clock, so its delay is counted
exactly rather than timed.  The namespace, tbf and loss helpers need root
and iproute2; they run as part of `scripts/test` (root, `unshare -n`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from functools import partial

import pytest
import trio

from bench import netlab
from bench.netlab import Lab, delay_proxy, list_netns, parse_addr

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="the lab creates network namespaces: needs root and iproute2",
)


async def echo_server(*, task_status=trio.TASK_STATUS_IGNORED):
    """A real TCP echo server on loopback; echoes until EOF, then closes."""

    async def handle(stream):
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[:2])
    await trio.serve_listeners(handle, listeners)


async def receive_exactly(stream, n):
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        assert data, "EOF before the echo came back"
        buf += data
    return bytes(buf)


def test_parse_addr():
    assert parse_addr("127.0.0.1:7447") == ("127.0.0.1", 7447)
    assert parse_addr("10.77.3.1:0") == ("10.77.3.1", 0)
    for bad in ("127.0.0.1", ":80", "host:x", "h:70000"):
        with pytest.raises(ValueError):
            parse_addr(bad)


def test_tc_rate():
    assert netlab.tc_rate("200mbit") == 25_000_000
    assert netlab.tc_rate("200Mbit") == 25_000_000
    assert netlab.tc_rate("25mbps") == 25_000_000
    assert netlab.tc_rate("1gbit") == 125_000_000
    assert netlab.tc_rate("8kbit") == 1000
    for bad in ("x", "mbit", "-1mbit", "0mbit", "200"):
        with pytest.raises(ValueError):
            netlab.tc_rate(bad)


@pytest.mark.parametrize("rtt", [0.02, 0.25])
async def test_proxy_adds_the_configured_rtt_to_each_round_trip(autojump_clock, rtt):
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(echo_server)
        proxy = await nursery.start(partial(delay_proxy, ("127.0.0.1", 0), echo, rtt))
        started = trio.current_time()
        stream = await trio.open_tcp_stream(*proxy)
        round_trips = []
        for i in range(6):
            t = trio.current_time()
            msg = b"ping %d" % i
            await stream.send_all(msg)
            assert await receive_exactly(stream, len(msg)) == msg
            round_trips.append(trio.current_time() - t)
        # The first exchange also pays the emulated TCP handshake (1 RTT).
        assert round_trips[0] == pytest.approx(2 * rtt)
        assert round_trips[1:] == pytest.approx([rtt] * 5)
        assert trio.current_time() - started == pytest.approx(7 * rtt)
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_proxy_without_handshake_costs_one_rtt_per_exchange(autojump_clock):
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(echo_server)
        proxy = await nursery.start(partial(delay_proxy, ("127.0.0.1", 0), echo, 0.1, handshake=False))
        stream = await trio.open_tcp_stream(*proxy)
        t = trio.current_time()
        await stream.send_all(b"x")
        assert await receive_exactly(stream, 1) == b"x"
        assert trio.current_time() - t == pytest.approx(0.1)
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_proxy_passes_a_stream_intact_and_propagates_eof():
    payload = os.urandom(3 * 1024 * 1024 + 17)
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(echo_server)
        proxy = await nursery.start(partial(delay_proxy, ("127.0.0.1", 0), echo, 0.005, bound=4))
        stream = await trio.open_tcp_stream(*proxy)
        received = bytearray()

        async def read_all():
            while data := await stream.receive_some(65536):
                received.extend(data)

        async with trio.open_nursery() as inner:
            inner.start_soon(read_all)
            for i in range(0, len(payload), 100_000):
                await stream.send_all(payload[i : i + 100_000])
            await stream.send_eof()  # echo server sees EOF, closes; we see EOF
        assert bytes(received) == payload
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_proxy_closes_client_when_target_refuses():
    # A port nobody listens on: bind and close a listener to get one.
    probe = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    dead = probe.socket.getsockname()[:2]
    await probe.aclose()
    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(partial(delay_proxy, ("127.0.0.1", 0), dead, 0.01))
        stream = await trio.open_tcp_stream(*proxy)
        with trio.fail_after(10):
            try:
                assert await stream.receive_some(10) == b""
            except trio.BrokenResourceError:
                pass  # reset is as good as EOF here
        await stream.aclose()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- namespaces


def lab_names(lab):
    return [n for n in list_netns() if n.startswith(lab.prefix)]


@needs_root
def test_lab_tears_down_namespaces_and_processes():
    with Lab() as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.link(a, b)
        sleeper = lab.spawn(a, ["sleep", "600"])
        assert sorted(lab_names(lab)) == sorted([a.name, b.name])
        tmp = lab.tmp
        assert tmp.is_dir()
    assert lab_names(lab) == []
    assert sleeper.poll() is not None
    assert not tmp.exists()


@needs_root
def test_lab_tears_down_on_an_exception_and_kills_strays():
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            ns = lab.namespace("a")
            # A process the lab did not start itself, inside its namespace.
            stray = subprocess.Popen(ns.argv("sleep", "600"))
            raise RuntimeError("boom")
    assert lab_names(lab) == []
    assert stray.wait(10) is not None


JOIN_LATE = """
import ctypes, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
print("opened", flush=True)
time.sleep(float(sys.argv[2]))
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
    sys.exit(3)
time.sleep(600)
"""


@needs_root
def test_lab_teardown_kills_a_process_on_its_way_into_a_namespace():
    """`ip netns exec` opens the namespace, then joins it: a scan of the
    members in between misses it, and it would join after the delete and
    live on (CI saw `ip netns exec NS sleep 600` survive a teardown).  Here
    the process holds the namespace open for 0.5 s before it joins."""
    with Lab() as lab:
        ns = lab.namespace("a")
        joiner = subprocess.Popen([sys.executable, "-c", JOIN_LATE, f"/run/netns/{ns.name}", "0.5"],
                                  stdout=subprocess.PIPE)
        assert joiner.stdout.readline() == b"opened\n"
    assert lab_names(lab) == []
    assert joiner.wait(10) == -9 or joiner.returncode == -15, joiner.returncode


@needs_root
def test_new_lab_sweeps_namespaces_of_dead_labs():
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"p2l{dead.pid}x000000-zz"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with Lab():
            assert name not in list_netns()
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@needs_root
def test_link_carries_raw_tcp_between_namespaces():
    with Lab() as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        link = lab.link(a, b)
        sent_before = lab.counters(a, link.a_dev)["tx_bytes"]
        got_before = lab.counters(b, link.b_dev)["rx_bytes"]
        moved = lab.raw_tcp(b, a, host=link.b_ip, nbytes=5 * 1024 * 1024 + 3)
        assert moved.nbytes == 5 * 1024 * 1024 + 3
        assert moved.seconds > 0
        # The bytes crossed the veth (plus TCP/IP headers), from a to b.
        assert lab.counters(a, link.a_dev)["tx_bytes"] - sent_before >= moved.nbytes
        assert lab.counters(b, link.b_dev)["rx_bytes"] - got_before >= moved.nbytes
        both = lab.raw_tcp_parallel([(b, link.b_ip, a), (a, link.a_ip, b)], nbytes=1024 * 1024)
        assert both.nbytes == 2 * 1024 * 1024


@needs_root
def test_tbf_limits_a_stream():
    rate = 1_000_000  # bytes/s (8 mbit)
    nbytes = 2_000_000
    with Lab() as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        link = lab.link(a, b)
        lab.rate_limit(a, link.a_dev, "8mbit", burst="16kb")
        qdisc = subprocess.run(["tc", "-n", a.name, "qdisc", "show", "dev", link.a_dev],
                               capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdisc and "8Mbit" in qdisc
        moved = lab.raw_tcp(b, a, host=link.b_ip, nbytes=nbytes)
    # A lower bound only (a busy machine can only make it slower): without
    # the limit this takes milliseconds.
    assert moved.seconds >= 0.9 * (nbytes - 16 * 1024) / rate


def rx_packets(ns, dev):
    out = subprocess.run(["ip", "-n", ns.name, "-s", "-j", "link", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["stats64"]["rx"]["packets"]


@needs_root
def test_loss_rule_drops_what_a_namespace_sends():
    send_udp = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        s.sendto(b'x', (sys.argv[1], 9))\n"
        "    except PermissionError:\n"
        "        pass  # an nft drop in output answers EPERM\n"
    )
    with Lab() as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        link = lab.link(a, b)
        lab.loss(a, 100)
        before = rx_packets(b, link.b_dev)
        lab.run(a, [sys.executable, "-c", send_udp, link.b_ip], check=True)
        assert rx_packets(b, link.b_dev) == before
        lab.loss(a, 0)  # replaces the rule
        before = rx_packets(b, link.b_dev)
        lab.run(a, [sys.executable, "-c", send_udp, link.b_ip], check=True)
        assert rx_packets(b, link.b_dev) >= before + 200
        lab.loss(a, 30)
        lab.loss(a, 30)
        rules = lab.run(a, ["nft", "list", "table", "inet", "p2lab"], capture_output=True, text=True).stdout
        assert rules.count("numgen random mod 100 < 30") == 1


@needs_root
def test_delay_proxy_process_delays_the_first_byte():
    rtt = 0.2
    with Lab() as lab:
        ns = lab.namespace("lo")
        sink = lab.sink(ns)
        proxy = lab.delay_proxy(ns, sink.addr, rtt)
        launched = time.monotonic()
        source = lab.source(ns, proxy.addr, 1000)
        assert source.wait(30) == 0
        result = lab.sink_result(sink)
        assert result["bytes"] == 1000
        # Connect (1 RTT, emulated) plus half an RTT before the first byte lands.
        assert result["start"] - launched >= 1.5 * rtt
        assert proxy.proc.poll() is None
        assert proxy.stop() == 0


@needs_root
def test_service_reports_a_process_that_dies_before_listening():
    with Lab() as lab:
        ns = lab.namespace("a")
        with pytest.raises(netlab.LabError, match="exited with code 3"):
            lab.service(ns, [sys.executable, "-c", "print('nope'); raise SystemExit(3)"], "dud")


@needs_root
def test_raw_tcp_baseline_cleans_up_after_itself():
    before = set(list_netns())
    assert netlab.raw_tcp_baseline(nbytes=4 * 1024 * 1024, runs=1) > 0
    assert set(list_netns()) == before


RECEIVE_ONE = (
    "import socket, struct, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', 5000))\n"
    "if sys.argv[1] != '-':  # join with INADDR_ANY: the kernel picks the interface by route\n"
    "    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,\n"
    "                 struct.pack('4s4s', socket.inet_aton(sys.argv[1]), bytes(4)))\n"
    "print('ready', flush=True)\n"
    "s.settimeout(20)\n"
    "data, src = s.recvfrom(100)\n"
    "print(data.decode(), src[0], flush=True)\n"
)
SEND = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "for dest, text in zip(sys.argv[1::2], sys.argv[2::2]):\n"
    "    s.sendto(text.encode(), (dest, 5000))\n"
)


@needs_root
def test_bridge_switches_unicast_and_multicast_among_many_namespaces():
    with Lab() as lab:
        a, b, c, d = (lab.namespace(r) for r in "abcd")
        lab.link(a, b)  # link 1: the bridge takes the next subnet
        bridge = lab.bridge([a, b, c])
        assert bridge.subnet == 2
        assert [bridge.ip(ns) for ns in (a, b, c)] == ["10.77.2.1", "10.77.2.2", "10.77.2.3"]
        port = lab.attach(bridge, d)
        assert port.ip == "10.77.2.4" and bridge.port(d) == port
        with pytest.raises(netlab.LabError, match="already on bridge"):
            lab.attach(bridge, d)
        capture = lab.capture(bridge)
        receivers = {ns: lab.spawn(ns, [sys.executable, "-c", RECEIVE_ONE, "239.1.2.3" if ns != d else "-"],
                                   stdout=subprocess.PIPE, text=True) for ns in (b, c, d)}
        for proc in receivers.values():
            assert proc.stdout.readline() == "ready\n"
        lab.run(a, [sys.executable, "-c", SEND, "239.1.2.3", "to-all", bridge.ip(d), "to-d"], check=True)
        got = {ns: proc.stdout.readline().split() for ns, proc in receivers.items()}
        assert got == {b: ["to-all", "10.77.2.1"], c: ["to-all", "10.77.2.1"], d: ["to-d", "10.77.2.1"]}
        datagrams = netlab.udp_datagrams(capture.stop())
        names = lab_names(lab)
    sent = [(dg.dst, dg.payload) for dg in datagrams if dg.src[0] == "10.77.2.1"]
    # Each datagram entered the bridge once, whatever the number of ports it left by.
    assert sent == [(("239.1.2.3", 5000), b"to-all"), (("10.77.2.4", 5000), b"to-d")]
    assert any(name.endswith("-bridge-2") for name in names)
    assert lab_names(lab) == []  # the bridge's namespace went with the rest


@needs_root
def test_a_namespace_on_two_bridges_routes_multicast_to_the_first():
    with Lab() as lab:
        m, x, y = lab.namespace("m"), lab.namespace("x"), lab.namespace("y")
        first, second = lab.bridge([m, x]), lab.bridge([m, y])
        with pytest.raises(netlab.LabError, match="not attached"):
            first.ip(y)
        routes = lab.run(m, ["ip", "route", "show", "224.0.0.0/4"], capture_output=True, text=True, check=True).stdout
        assert routes.split()[:3] == ["224.0.0.0/4", "dev", first.port(m).dev]
        assert lab.run(m, [sys.executable, "-c", SEND, second.ip(y), "x"]).returncode == 0


def test_pcap_round_trip_and_udp_parsing(tmp_path):
    def ipv4_udp(src, dst, sport, dport, payload, frag=0):
        udp = struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, frag, 1, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
        return bytes(12) + b"\x08\x00" + ip + udp + bytes(6)  # Ethernet padding after the IP packet

    def ipv6_udp(payload):
        udp = struct.pack(">HHHH", 1, 2, 8 + len(payload), 0) + payload
        ip = struct.pack(">IHBB16s16s", 6 << 28, len(udp), 17, 1,
                         socket.inet_pton(socket.AF_INET6, "fe80::1"), socket.inet_pton(socket.AF_INET6, "ff12::7"))
        return bytes(12) + b"\x86\xdd" + ip + udp

    frames = [ipv4_udp("10.77.1.1", "239.1.2.3", 40000, 7641, b"hello"), b"\x00" * 60, ipv6_udp(b"six"), b""]
    path = tmp_path / "x.pcap"
    path.write_bytes(netlab.pcap_header() + b"".join(netlab.pcap_record(f, 1.5) for f in frames))
    assert netlab.read_pcap(path) == frames
    assert netlab.udp_datagrams(frames) == [
        netlab.Datagram(("10.77.1.1", 40000), ("239.1.2.3", 7641), b"hello"),
        netlab.Datagram(("fe80::1", 1), ("ff12::7", 2), b"six"),
    ]
    with pytest.raises(netlab.LabError, match="fragmented"):
        netlab.udp_datagrams([ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2, b"x", frag=0x2000)])
    path.write_bytes(netlab.pcap_header() + netlab.pcap_record(b"abc", 0)[:-1])
    with pytest.raises(netlab.LabError, match="inside a frame"):
        netlab.read_pcap(path)
