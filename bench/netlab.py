"""A network lab on one machine: namespaces, veth links, rate limits, loss,
a delay proxy and a raw TCP baseline, for the benchmarks and their tests.

Theory of operation
-------------------
* Nothing leaves this machine.  Every namespace the lab creates starts with
  only `lo`; a link is a veth pair whose two ends both live in lab
  namespaces; no namespace gets a default route or any device of the root
  namespace.  Link N's ends are 10.77.N.1/24 (the `a` side) and 10.77.N.2/24
  (the `b` side); those addresses exist only inside the lab.
* A bridge is a switched link for many namespaces: a Linux bridge in a lab
  namespace of its own, one veth per member (bridge N's members are
  10.77.N.1, .2, ...), multicast flooded to every port, and a 224.0.0.0/4
  route in each member, so multicast works as on a LAN.  Links and bridges
  share the numbering N.  `Lab.capture(bridge)` records every frame that
  members send onto a bridge (a pcap file; `udp_datagrams` parses it).
* The root namespace has no route to lab addresses (and must never get one),
  so every client runs inside a lab namespace too: `Lab.run`, `Lab.spawn`,
  `Lab.service` all take the namespace to run in.
* Teardown is total.  `Lab.close()` (run on leaving `with`, also on Ctrl-C,
  and on SIGTERM inside `sigterm_raises()`) kills every process inside each
  lab namespace or holding one open (about to join it), deletes the
  namespaces, which takes their veths, qdiscs and nft tables with them,
  and kills whoever got in meanwhile (`_destroy_netns`).  Namespaces are named
  `p2l<pid>x<tag>-<role>`; close() deletes every namespace with its lab's
  prefix, also one whose set-up was interrupted, and a new Lab first removes
  namespaces left by labs whose process is dead (kill -9).
* Rate: `tc tbf` on the egress of one end of a link.  Loss: an nft output
  rule dropping `numgen random mod 100 < N`.  Delay: this kernel has no
  netem, so `delay_proxy` is a trio TCP proxy that holds every chunk for half
  the RTT in each direction, and holds the first bytes as long as a TCP
  handshake would (1.5 RTT upstream, 2 RTT back), so connecting costs its
  round trip too.  It pipelines: the delay costs latency, not bandwidth.
* The raw TCP baseline is two processes, a sink and a source, moving bytes
  with trio in 64 KiB writes: the ceiling p2pfs transfers are compared to.
  The sink times from its first byte to EOF on the system-wide monotonic
  clock, so several sinks can be summed into one aggregate.

Entry points for the processes the lab places in namespaces:
`python -m bench.netlab proxy|sink|source|capture ...` (see `_cli`).  A process
that serves prints `listening on HOST:PORT` on stdout, as `p2pfs seed` does.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
WRITE_SIZE = 64 * 1024
_LISTENING = re.compile(rb"listening on (\S+):(\d+)")
_LAB_NAME = re.compile(r"^p2l(\d+)x[0-9a-f]+-")


class LabError(Exception):
    """The lab could not be set up or a lab process failed; the message says why."""


# --------------------------------------------------------------------------
# addresses


def parse_addr(text: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def format_addr(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def tc_rate(text: str) -> float:
    """Bytes per second of a tc rate such as '200mbit' or '25mbps' (tc's SI units)."""
    units = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
             "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
    low = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        number = low.removesuffix(unit)
        if number != low:
            try:
                value = float(number)
            except ValueError:
                break
            if value > 0 and math.isfinite(value):
                return value * units[unit]
            break
    raise ValueError(f"expected a tc rate such as 200mbit or 25mbps, got {text!r}")


# --------------------------------------------------------------------------
# the delay proxy (in-process, trio)


async def _forward(
    src: trio.SocketStream,
    dst: trio.SocketStream,
    delay: float,
    not_before: float,
    bound: int,
) -> None:
    """Copy src to dst, each chunk (and EOF) delivered `delay` s after it was read."""
    send, recv = trio.open_memory_channel[tuple[float, bytes]](bound)

    async def read() -> None:
        async with send:
            while True:
                data = await src.receive_some(WRITE_SIZE)
                await send.send((trio.current_time() + delay, data))
                if not data:
                    return

    async def write() -> None:
        async with recv:
            async for due, data in recv:
                await trio.sleep_until(max(due, not_before))
                if not data:
                    await dst.send_eof()
                    return
                await dst.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)


async def delay_proxy(
    listen: tuple[str, int],
    target: tuple[str, int],
    rtt: float,
    *,
    handshake: bool = True,
    bound: int = 256,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve TCP on `listen`, forwarding each connection to `target` with `rtt`
    seconds of added round-trip time (half each way).  With `handshake`, the
    first bytes also wait as long as a TCP handshake over that RTT would make
    them.  At most `bound` chunks of 64 KiB are held per direction (backpressure
    beyond).  `task_status.started((host, port))` gives the bound address.
    Runs until cancelled; a failing connection closes only itself."""
    if rtt < 0:
        raise ValueError("rtt must be >= 0")
    one_way = rtt / 2

    async def handle(client: trio.SocketStream) -> None:
        t0 = trio.current_time()
        try:
            upstream = await trio.open_tcp_stream(*target)
        except OSError:
            await client.aclose()
            return
        up_not_before = t0 + 1.5 * rtt if handshake else 0.0
        down_not_before = t0 + 2 * rtt if handshake else 0.0
        async with client, upstream:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_forward, client, upstream, one_way, up_not_before, bound)
                    nursery.start_soon(_forward, upstream, client, one_way, down_not_before, bound)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # one side reset: the other is closed on leaving `async with`

    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    host, port = listeners[0].socket.getsockname()[:2]
    task_status.started((host, port))
    await trio.serve_listeners(handle, listeners)


# --------------------------------------------------------------------------
# raw TCP baseline (in-process halves; the lab runs them as two processes)


@dataclass(frozen=True)
class Transfer:
    """Bytes moved and the seconds they took; `rate` in bytes per second."""

    nbytes: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else math.inf


async def tcp_sink(stream: trio.abc.ReceiveStream) -> tuple[int, float, float]:
    """Read to EOF; return (bytes, monotonic time of the first byte, of EOF)."""
    nbytes, start = 0, None
    while data := await stream.receive_some(WRITE_SIZE):
        if start is None:
            start = time.monotonic()
        nbytes += len(data)
    end = time.monotonic()
    return nbytes, (end if start is None else start), end


async def tcp_source(stream: trio.SocketStream, nbytes: int, write_size: int = WRITE_SIZE) -> None:
    """Write `nbytes` in `write_size` writes, then half-close and wait for the
    peer to close (so the data has been read, not just queued)."""
    chunk = os.urandom(write_size)
    whole, rest = divmod(nbytes, write_size)
    for _ in range(whole):
        await stream.send_all(chunk)
    if rest:
        await stream.send_all(chunk[:rest])
    await stream.send_eof()
    while await stream.receive_some(WRITE_SIZE):
        pass


# --------------------------------------------------------------------------
# packet captures (pcap files of Ethernet frames)

_PCAP_HEADER = struct.Struct("<IHHiIII")  # magic, version 2.4, zone, sigfigs, snaplen, linktype
_PCAP_RECORD = struct.Struct("<IIII")     # seconds, microseconds, captured length, length
_PCAP_MAGIC = 0xA1B2C3D4
_SNAPLEN = 65535


def pcap_header() -> bytes:
    return _PCAP_HEADER.pack(_PCAP_MAGIC, 2, 4, 0, 0, _SNAPLEN, 1)  # linktype 1: Ethernet


def pcap_record(frame: bytes, when: float) -> bytes:
    seconds, micros = divmod(round(when * 1e6), 1_000_000)
    return _PCAP_RECORD.pack(seconds, micros, len(frame), len(frame)) + frame


def read_pcap(path: Path) -> list[bytes]:
    """The frames of a pcap file written by `pcap_header` and `pcap_record`."""
    data = Path(path).read_bytes()
    if len(data) < _PCAP_HEADER.size or _PCAP_HEADER.unpack_from(data)[0] != _PCAP_MAGIC:
        raise LabError(f"{path} is not a pcap file")
    frames, pos = [], _PCAP_HEADER.size
    while pos < len(data):
        if pos + _PCAP_RECORD.size > len(data):
            raise LabError(f"{path} ends inside a record header")
        _, _, size, _ = _PCAP_RECORD.unpack_from(data, pos)
        pos += _PCAP_RECORD.size
        if pos + size > len(data):
            raise LabError(f"{path} ends inside a frame")
        frames.append(data[pos:pos + size])
        pos += size
    return frames


@dataclass(frozen=True)
class Datagram:
    """A UDP datagram taken from a captured frame."""

    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


def udp_datagrams(frames: Sequence[bytes]) -> list[Datagram]:
    """Every UDP datagram (IPv4 or IPv6) in Ethernet frames; other frames are
    skipped.  A fragmented IPv4 datagram raises LabError (not reassembled:
    a check of every datagram's bytes would miss the later fragments)."""
    out = []
    for frame in frames:
        if len(frame) < 14:
            continue
        ethertype = int.from_bytes(frame[12:14], "big")
        ip = frame[14:]
        if ethertype == 0x0800 and len(ip) >= 20 and ip[0] >> 4 == 4:
            header = (ip[0] & 0x0F) * 4
            if ip[9] != 17:
                continue
            if int.from_bytes(ip[6:8], "big") & 0x3FFF:  # more fragments, or an offset
                raise LabError("a captured UDP datagram is fragmented (not reassembled)")
            src_ip, dst_ip = socket.inet_ntop(socket.AF_INET, ip[12:16]), socket.inet_ntop(socket.AF_INET, ip[16:20])
            end = int.from_bytes(ip[2:4], "big")
        elif ethertype == 0x86DD and len(ip) >= 40 and ip[0] >> 4 == 6:
            header = 40
            if ip[6] != 17:  # extension headers are not followed
                continue
            src_ip, dst_ip = socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(socket.AF_INET6, ip[24:40])
            end = 40 + int.from_bytes(ip[4:6], "big")
        else:
            continue
        udp = ip[header:end]
        if len(udp) < 8:
            continue
        src_port, dst_port, length = struct.unpack_from(">HHH", udp)
        out.append(Datagram((src_ip, src_port), (dst_ip, dst_port), bytes(udp[8:length])))
    return out


# --------------------------------------------------------------------------
# the lab


@dataclass(frozen=True)
class Netns:
    """A network namespace made by a Lab."""

    name: str

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]


@dataclass(frozen=True)
class Link:
    """A veth pair: `a_dev`/`a_ip` in `a`, `b_dev`/`b_ip` in `b`."""

    a: Netns
    b: Netns
    a_dev: str
    b_dev: str
    a_ip: str
    b_ip: str


@dataclass(frozen=True)
class BridgePort:
    """A namespace on a bridge: `dev` (address `ip`) in `ns`, whose other end
    `port_dev` is a port of the bridge in the bridge's namespace."""

    ns: Netns
    dev: str
    ip: str
    port_dev: str


@dataclass
class Bridge:
    """A Linux bridge (`dev`, in its own namespace `ns`) with subnet 10.77.`subnet`.0/24:
    one switched link for any number of namespaces (`Lab.attach`)."""

    ns: Netns
    dev: str
    subnet: int
    ports: list[BridgePort]

    def port(self, ns: Netns) -> BridgePort:
        for port in self.ports:
            if port.ns == ns:
                return port
        raise LabError(f"{ns.name} is not attached to bridge {self.dev}")

    def ip(self, ns: Netns) -> str:
        """The address of `ns` on this bridge."""
        return self.port(ns).ip


@dataclass
class Service:
    """A process in a namespace that printed `listening on HOST:PORT`."""

    proc: subprocess.Popen
    addr: tuple[str, int]
    log: Path

    @property
    def address(self) -> str:
        return format_addr(self.addr)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the process and wait for it (SIGKILL after `timeout`); returns its code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the running process has used so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            raise LabError(f"process {self.proc.pid} is gone: cannot read its CPU time") from None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Capture:
    """A packet capture process (`Lab.capture`) writing a pcap file."""

    proc: subprocess.Popen
    pcap: Path
    log: Path

    def stop(self, timeout: float = 10.0) -> list[bytes]:
        """Stop capturing; return every frame captured, in order.  Raises
        LabError if the process failed or the kernel dropped any frame."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise LabError("the capture did not stop on SIGTERM") from None
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            raise LabError(f"the capture failed (code {self.proc.returncode}):\n{self.log.read_text(errors='replace')}")
        summary = json.loads(lines[-1])
        if summary["drops"]:
            raise LabError(f"the capture lost {summary['drops']} of {summary['frames'] + summary['drops']} frames")
        return read_pcap(self.pcap)


def _sh(*argv: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a set-up command; raise LabError with its stderr if it fails."""
    done = subprocess.run(argv, input=input, capture_output=True)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace').strip()}")
    return done


def require_tools() -> None:
    """Check that we are root and that ip/tc/nft exist (installing iproute2 and
    nftables with apt-get when they are missing); raises LabError."""
    if os.geteuid() != 0:
        raise LabError("the network lab creates namespaces: run it as root")
    missing = [t for t in ("ip", "tc", "nft") if shutil.which(t) is None]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "iproute2", "nftables"]):
            if subprocess.run(argv, env=env, capture_output=True).returncode != 0:
                raise LabError(f"missing {', '.join(missing)} and `{' '.join(argv)}` failed")
        still = [t for t in ("ip", "tc", "nft") if shutil.which(t) is None]
        if still:
            raise LabError(f"missing {', '.join(still)} after installing iproute2 and nftables")


def _wait_oper_up(ns: Netns, dev: str, timeout: float = 5.0) -> None:
    """Poll until `dev` in `ns` is operationally up (carrier seen: the kernel
    may take up to a second to say so after `ip link set up`)."""
    deadline = time.monotonic() + timeout
    while json.loads(_sh("ip", "-n", ns.name, "-j", "link", "show", "dev", dev).stdout)[0].get("operstate") != "UP":
        if time.monotonic() > deadline:
            raise LabError(f"{dev} in {ns.name} is not up after {timeout:g} s")
        time.sleep(0.02)


def list_netns() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _holders(inodes: set[int], paths: set[str]) -> list[int]:
    """Processes (not this one) inside one of the namespaces (nsfs `inodes`)
    or holding a descriptor of one (about to join it: `ip netns exec` opens,
    then joins).  A descriptor is looked at only if its link names one of
    the namespaces' `paths` (or "/", what the link says once the namespace is
    deleted): following any other could block on a hung FUSE mount."""
    me, out = os.getpid(), []
    texts = {f"net:[{i}]" for i in inodes}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        proc = f"/proc/{entry.name}"
        try:
            if os.readlink(f"{proc}/ns/net") in texts:
                out.append(int(entry.name))
                continue
            fds = os.listdir(f"{proc}/fd")
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{proc}/fd/{fd}")
                if (link in paths or link == "/") and os.stat(f"{proc}/fd/{fd}").st_ino in inodes:
                    out.append(int(entry.name))
                    break
            except OSError:
                continue
    return out


def _destroy_netns(names: Sequence[str], grace: float = 5.0) -> None:
    """Kill every process in the namespaces (TERM, then KILL), then delete them.

    A process on its way in (`ip netns exec` forked, not yet joined) is in
    no scan of the members; deleting the namespace then does not stop it
    joining, and it lives on in a namespace nobody can name.  So each
    namespace is held open here while it is emptied, deleted, and emptied
    again: after the delete nobody can open it, and whoever opened it
    before is a member or holds a descriptor of it, and is killed."""
    pins, inodes = [], set()
    paths = {f"/run/netns/{name}" for name in names}
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        pins.append(fd)
        inodes.add(os.fstat(fd).st_ino)
    try:
        scan = functools.partial(_holders, inodes, paths)
        _empty(scan, grace)
        for name in names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        _empty(scan, grace)
    finally:
        for fd in pins:
            os.close(fd)


def _empty(scan, grace: float) -> None:
    """TERM, then KILL, what `scan` finds, until it finds nothing."""
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        pids = scan()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = scan()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_labs() -> list[str]:
    """Delete namespaces left by labs whose process is gone; returns their names."""
    stale = []
    for name in list_netns():
        m = _LAB_NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            stale.append(name)
    if stale:
        _destroy_netns(stale)
    return stale


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside this block SIGTERM raises SystemExit(143), so `finally` clauses
    (and Lab teardown) run as they do on Ctrl-C.  Main thread only."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class Lab:
    """Owns namespaces, links and processes; `with Lab() as lab:` tears it all down."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.prefix = f"p2l{os.getpid()}x{tag}-"
        self._dev_tag = tag
        self._links = 0
        self._namespaces: list[Netns] = []
        self._procs: list[subprocess.Popen] = []
        self._tmp: Path | None = None
        self._closed = False

    # set-up -----------------------------------------------------------------

    def __enter__(self) -> Lab:
        require_tools()
        sweep_stale_labs()
        self._tmp = Path(tempfile.mkdtemp(prefix="p2pfs-lab-"))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            raise LabError("use the Lab in a `with` block")
        return self._tmp

    def namespace(self, role: str) -> Netns:
        """A new namespace with only `lo`, up."""
        if not re.fullmatch(r"[a-z0-9]{1,12}", role):
            raise ValueError(f"role must be 1-12 of [a-z0-9], got {role!r}")
        return self._new_namespace(self.prefix + role)

    def _new_namespace(self, name: str) -> Netns:
        ns = Netns(name)
        self._namespaces.append(ns)  # before creating: close() must find it
        _sh("ip", "netns", "add", ns.name)
        _sh("ip", "-n", ns.name, "link", "set", "lo", "up")
        return ns

    def _next_subnet(self) -> int:
        """N of the next 10.77.N.0/24: one per link or bridge."""
        if self._links >= 254:
            raise LabError("a lab holds at most 254 links and bridges")
        self._links += 1
        return self._links

    def link(self, a: Netns, b: Netns, mtu: int | None = None) -> Link:
        """Join two lab namespaces with a veth pair; link N gets 10.77.N.1 (a), .2 (b)."""
        n = self._next_subnet()
        link = Link(a, b, f"v{self._dev_tag}{n}a", f"v{self._dev_tag}{n}b", f"10.77.{n}.1", f"10.77.{n}.2")
        _sh("ip", "link", "add", link.a_dev, "netns", a.name, "type", "veth",
            "peer", "name", link.b_dev, "netns", b.name)
        for ns, dev, ip in ((a, link.a_dev, link.a_ip), (b, link.b_dev, link.b_ip)):
            _sh("ip", "-n", ns.name, "addr", "add", f"{ip}/24", "dev", dev)
            if mtu:
                _sh("ip", "-n", ns.name, "link", "set", dev, "mtu", str(mtu))
            _sh("ip", "-n", ns.name, "link", "set", dev, "up")
        return link

    def bridge(self, namespaces: Sequence[Netns] = ()) -> Bridge:
        """A switched link: a Linux bridge in a namespace of its own (no
        addresses there), each of `namespaces` attached by a veth (`attach`).
        Bridge N's members get 10.77.N.1, .2, ... in the order attached.
        Multicast is flooded to every port (snooping off, so no querier is
        needed) and each member routes 224.0.0.0/4 to its first bridge, as a
        host's default route would."""
        n = self._next_subnet()
        ns = self._new_namespace(f"{self.prefix}bridge-{n}")  # '-' is not in roles: no clash
        bridge = Bridge(ns, f"b{self._dev_tag}{n}", n, [])
        _sh("ip", "-n", ns.name, "link", "add", bridge.dev, "type", "bridge", "mcast_snooping", "0")
        _sh("ip", "-n", ns.name, "link", "set", bridge.dev, "up")
        for member in namespaces:
            self.attach(bridge, member)
        return bridge

    def attach(self, bridge: Bridge, ns: Netns) -> BridgePort:
        """Attach one more namespace to `bridge`; returns its port (device, address)."""
        if any(p.ns == ns for p in bridge.ports):
            raise LabError(f"{ns.name} is already on bridge {bridge.dev}")
        i = len(bridge.ports) + 1
        if i > 254:
            raise LabError("a bridge holds at most 254 namespaces")
        port = BridgePort(ns, f"v{self._dev_tag}{bridge.subnet}m{i}", f"10.77.{bridge.subnet}.{i}",
                          f"v{self._dev_tag}{bridge.subnet}p{i}")
        _sh("ip", "link", "add", port.dev, "netns", ns.name, "type", "veth",
            "peer", "name", port.port_dev, "netns", bridge.ns.name)
        _sh("ip", "-n", bridge.ns.name, "link", "set", port.port_dev, "master", bridge.dev)
        _sh("ip", "-n", bridge.ns.name, "link", "set", port.port_dev, "up")
        _sh("ip", "-n", ns.name, "addr", "add", f"{port.ip}/24", "dev", port.dev)
        _sh("ip", "-n", ns.name, "link", "set", port.dev, "up")
        routes = _sh("ip", "-n", ns.name, "-j", "route", "show", "224.0.0.0/4").stdout
        if not json.loads(routes or "[]"):
            _sh("ip", "-n", ns.name, "route", "add", "224.0.0.0/4", "dev", port.dev)
        bridge.ports.append(port)
        _wait_oper_up(ns, port.dev)
        return port

    def capture(self, bridge: Bridge, timeout: float = 15.0) -> Capture:
        """Start recording every frame that enters `bridge` from any port (each
        frame once: what members send, not the copies forwarded to them), up
        to the ports attached now.  `Capture.stop()` returns the frames."""
        if not bridge.ports:
            raise LabError(f"bridge {bridge.dev} has no ports to capture on")
        pcap = self.tmp / f"{bridge.dev}.{len(self._procs)}.pcap"
        log = pcap.with_suffix(".log")
        argv = self.python("-m", "bench.netlab", "capture", "--out", str(pcap),
                           *[a for p in bridge.ports for a in ("--dev", p.port_dev)])
        proc, _ = self._start_and_wait(bridge.ns, argv, "capture", log, re.compile(rb"capturing on"), timeout)
        return Capture(proc, pcap, log)

    def rate_limit(self, ns: Netns, dev: str, rate: str, burst: str = "64kb", latency: str = "20ms") -> None:
        """Limit what `dev` in `ns` sends to `rate` (tc syntax, e.g. '200mbit') with tbf."""
        _sh("tc", "-n", ns.name, "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", rate, "burst", burst, "latency", latency)

    def loss(self, ns: Netns, percent: int) -> None:
        """Drop `percent` % of the packets `ns` sends (all devices), at random;
        replaces the previous loss rule of `ns`."""
        if not 0 <= percent <= 100:
            raise ValueError("percent must be 0..100")
        if percent == 0:
            rule = ""
        elif percent == 100:
            rule = "  counter drop\n"
        else:
            rule = f"  numgen random mod 100 < {percent} counter drop\n"
        rules = (
            "table inet p2lab\n"
            "delete table inet p2lab\n"
            "table inet p2lab {\n"
            " chain out {\n"
            "  type filter hook output priority 0; policy accept;\n"
            f"{rule}"
            " }\n"
            "}\n"
        )
        _sh("ip", "netns", "exec", ns.name, "nft", "-f", "-", input=rules.encode())

    def counters(self, ns: Netns, dev: str) -> dict[str, int]:
        """Kernel counters of `dev` in `ns`: tx_bytes, tx_packets, rx_bytes, rx_packets."""
        out = _sh("ip", "-n", ns.name, "-s", "-j", "link", "show", "dev", dev).stdout
        stats = json.loads(out)[0]["stats64"]
        return {f"{d}_{k}": stats[d][k] for d in ("tx", "rx") for k in ("bytes", "packets")}

    # processes --------------------------------------------------------------

    def run(self, ns: Netns, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """subprocess.run(argv) inside `ns` (cwd = the repository unless given)."""
        kw.setdefault("cwd", REPO)
        return subprocess.run(ns.argv(*argv), **kw)

    def timed(self, ns: Netns, argv: Sequence[str], **kw) -> tuple[float, float, subprocess.CompletedProcess]:
        """Run argv in `ns`; return (wall seconds, CPU seconds (user + system)
        of the process and anything it waited for, result).  The CPU figure
        assumes no other child of ours is reaped meanwhile."""
        cpu_before = _children_cpu()
        started = time.perf_counter()
        done = self.run(ns, argv, **kw)
        wall = time.perf_counter() - started
        return wall, _children_cpu() - cpu_before, done

    def spawn(self, ns: Netns, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start argv in `ns`; the lab kills it on close."""
        kw.setdefault("cwd", REPO)
        proc = subprocess.Popen(ns.argv(*argv), **kw)
        self._procs.append(proc)
        return proc

    def service(self, ns: Netns, argv: Sequence[str], name: str, timeout: float = 30.0,
                env: dict[str, str] | None = None) -> Service:
        """Start a server in `ns` and wait (polling, up to `timeout` s) for it to
        print `listening on HOST:PORT`; its stdout and stderr go to a log file."""
        log = self.tmp / f"{name}.{len(self._procs)}.log"
        proc, m = self._start_and_wait(ns, argv, name, log, _LISTENING, timeout, env)
        return Service(proc, (m.group(1).decode(), int(m.group(2))), log)

    def _start_and_wait(self, ns: Netns, argv: Sequence[str], name: str, log: Path, ready: re.Pattern,
                        timeout: float, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, re.Match]:
        """Start argv in `ns`, output to `log`; poll until the log matches `ready`."""
        with open(log, "wb") as out:
            proc = self.spawn(ns, argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        service = Service(proc, ("", 0), log)
        deadline = time.monotonic() + timeout
        while True:
            m = ready.search(log.read_bytes())
            if m:
                return proc, m
            if proc.poll() is not None:
                raise LabError(f"{name} exited with code {proc.returncode} before it was ready:\n{service.log_tail()}")
            if time.monotonic() > deadline:
                service.stop()
                raise LabError(f"{name} did not print {ready.pattern.decode()!r} within {timeout:g} s:\n{service.log_tail()}")
            time.sleep(0.02)

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def delay_router(self, members: Sequence[tuple[Netns, Sequence[str]]], rtt: float) -> Service:
        """Run `delay_router` as a process in a namespace of its own, joining
        `members` (each with its 10.78.0.X addresses): every packet between
        two members is delayed rtt/2 each way.  Stop it with the lab."""
        ns = self.namespace(f"rt{len(self._procs)}")
        spec = [f"{m.name}:t{self._dev_tag}{i}:{','.join(addrs)}" for i, (m, addrs) in enumerate(members)]
        argv = self.python("-m", "bench.netlab", "router", "--rtt", repr(rtt),
                           *[a for one in spec for a in ("--member", one)])
        log = self.tmp / f"router.{len(self._procs)}.log"
        proc, _ = self._start_and_wait(ns, argv, "router", log, re.compile(rb"routing with"), 15.0)
        return Service(proc, ("", 0), log)

    def delay_proxy(self, ns: Netns, target: tuple[str, int], rtt: float,
                    listen: tuple[str, int] = ("127.0.0.1", 0), handshake: bool = True) -> Service:
        """Run `delay_proxy` as a process in `ns`; returns the Service (its .addr)."""
        argv = self.python("-m", "bench.netlab", "proxy", "--listen", format_addr(listen),
                           "--target", format_addr(target), "--rtt", repr(rtt))
        if not handshake:
            argv.append("--no-handshake")
        return self.service(ns, argv, "proxy", timeout=15.0)

    def raw_tcp(self, sink_ns: Netns, source_ns: Netns, host: str = "127.0.0.1",
                nbytes: int = 1 << 30, write_size: int = WRITE_SIZE) -> Transfer:
        """Raw trio TCP between two processes: a sink listening on `host` in
        `sink_ns`, a source in `source_ns` writing `nbytes` in `write_size` writes."""
        return self.raw_tcp_parallel([(sink_ns, host, source_ns)], nbytes, write_size)

    def sink(self, ns: Netns, host: str = "127.0.0.1") -> Service:
        """Start a raw TCP sink process listening on `host` in `ns`."""
        return self.service(ns, self.python("-m", "bench.netlab", "sink", "--listen", f"{host}:0"), "sink", timeout=15.0)

    def source(self, ns: Netns, addr: tuple[str, int], nbytes: int, write_size: int = WRITE_SIZE,
               wait_go: bool = False) -> subprocess.Popen:
        """Start a raw TCP source process in `ns` writing `nbytes` to `addr`.
        With `wait_go` it connects, prints `connected`, and writes only after
        a line arrives on its stdin (see `raw_tcp_parallel`)."""
        argv = self.python("-m", "bench.netlab", "source", "--connect", format_addr(addr),
                           "--bytes", str(nbytes), "--write-size", str(write_size))
        if wait_go:
            argv.append("--wait-go")
        pipe = subprocess.PIPE if wait_go else subprocess.DEVNULL
        return self.spawn(ns, argv, stdin=pipe, stdout=pipe, stderr=subprocess.PIPE)

    @staticmethod
    def sink_result(sink: Service, timeout: float = 60.0) -> dict:
        """Wait for a sink to finish; returns {"bytes", "start", "end"} (monotonic seconds)."""
        try:
            sink.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LabError(f"raw TCP sink did not finish within {timeout:g} s") from None
        lines = [ln for ln in sink.log.read_text().splitlines() if ln.startswith("{")]
        if sink.proc.returncode != 0 or not lines:
            raise LabError(f"raw TCP sink failed:\n{sink.log_tail()}")
        return json.loads(lines[-1])

    def raw_tcp_parallel(self, pairs: Sequence[tuple[Netns, str, Netns]], nbytes: int,
                         write_size: int = WRITE_SIZE, timeout: float = 300.0) -> Transfer:
        """Several raw TCP transfers at once, one (sink ns, sink host, source ns)
        each, `nbytes` apiece; returns the aggregate (all bytes over the span
        from the first sink's first byte to the last sink's EOF)."""
        sinks = [self.sink(ns, host) for ns, host, _ in pairs]
        sources = [self.source(src_ns, sink.addr, nbytes, write_size, wait_go=True)
                   for sink, (_, _, src_ns) in zip(sinks, pairs)]
        # Start every transfer at once, not as each process happens to start.
        for source in sources:
            if source.stdout.readline().strip() != b"connected":  # b"" if it exited
                source.wait()
                raise LabError(f"raw TCP source failed to connect: {source.stderr.read().decode(errors='replace').strip()}")
        for source in sources:
            source.stdin.write(b"go\n")
            source.stdin.close()
        deadline = time.monotonic() + timeout
        for source in sources:
            try:
                source.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise LabError(f"raw TCP source did not finish within {timeout:g} s") from None
            err = source.stderr.read()  # a few lines at most: only a failing source writes there
            source.stderr.close()
            source.stdout.close()
            if source.returncode != 0:
                raise LabError(f"raw TCP source failed: {err.decode(errors='replace').strip()}")
        results = [self.sink_result(sink, max(0.0, deadline - time.monotonic())) for sink in sinks]
        total = sum(r["bytes"] for r in results)
        if total != nbytes * len(pairs):
            raise LabError(f"raw TCP moved {total} bytes, expected {nbytes * len(pairs)}")
        span = max(r["end"] for r in results) - min(r["start"] for r in results)
        return Transfer(total, span)

    # teardown ---------------------------------------------------------------

    def close(self) -> None:
        """Kill every lab process, delete every lab namespace and the temp dir.
        Safe to call twice; Ctrl-C and SIGTERM are ignored until it is done."""
        if self._closed:
            return
        self._closed = True
        old = _ignore_signals()
        try:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in self._procs:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            names = {ns.name for ns in self._namespaces}
            names.update(n for n in list_netns() if n.startswith(self.prefix))
            _destroy_netns(sorted(names))
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
        finally:
            _restore_signals(old)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _ignore_signals() -> dict[int, object]:
    """Ignore SIGINT and SIGTERM (main thread only) so teardown runs to the end."""
    old: dict[int, object] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread: signals go there anyway
            pass
    return old


def _restore_signals(old: dict[int, object]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


def raw_tcp_baseline(nbytes: int = 1 << 30, runs: int = 3) -> float:
    """Median bytes/s of raw trio TCP between two processes (64 KiB writes)
    on the loopback of a fresh namespace: the ceiling for a transfer in the
    same run.  Needs root (see `require_tools`); raises LabError."""
    with Lab() as lab:
        lo = lab.namespace("lo")
        return statistics.median(lab.raw_tcp(lo, lo, nbytes=nbytes).rate for _ in range(runs))


# --------------------------------------------------------------------------
# processes the lab starts: python -m bench.netlab proxy|sink|source


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def _proxy_main(listen: tuple[str, int], target: tuple[str, int], rtt: float, handshake: bool) -> None:
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(lambda task_status: delay_proxy(
            listen, target, rtt, handshake=handshake, task_status=task_status))
        print(f"listening on {host}:{port}", flush=True)
        await _until_signal()
        nursery.cancel_scope.cancel()


async def _sink_main(listen: tuple[str, int]) -> None:
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    host, port = listeners[0].socket.getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    stream = await listeners[0].accept()
    for listener in listeners:
        await listener.aclose()
    async with stream:
        nbytes, start, end = await tcp_sink(stream)
    print(json.dumps({"bytes": nbytes, "start": start, "end": end}), flush=True)


async def _source_main(connect: tuple[str, int], nbytes: int, write_size: int, wait_go: bool) -> None:
    async with await trio.open_tcp_stream(*connect) as stream:
        if wait_go:
            print("connected", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
        await tcp_source(stream, nbytes, write_size)


_ETH_P_ALL = 0x0003
_SOL_PACKET, _PACKET_STATISTICS, _PACKET_OUTGOING = 263, 6, 4
_SO_RCVBUFFORCE = 33


def _capture_main(devices: Sequence[str], out: Path) -> None:
    """Write every frame received on `devices` (not those sent out of them)
    to a pcap file until SIGTERM; then print {"frames", "drops"}."""
    wanted = set(devices)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)
    frames = 0

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        with open(out, "wb") as pcap:
            pcap.write(pcap_header())
            print(f"capturing on {' '.join(devices)}", flush=True)
            while True:
                frame, (ifname, _, pkttype, *_) = sock.recvfrom(_SNAPLEN)
                if ifname in wanted and pkttype != _PACKET_OUTGOING:
                    pcap.write(pcap_record(frame, time.time()))
                    frames += 1
    finally:
        _, drops = struct.unpack("II", sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))
        print(json.dumps({"frames": frames, "drops": drops}), flush=True)



# --- a user-space IP router adding delay (no netem on these machines) ---------

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
ROUTER_NET = "10.78.0"  # the delay router's /24: members' addresses are 10.78.0.X


async def delay_router(members: Sequence[tuple[str, str, Sequence[str]]], rtt: float,
                       queue: int = 4096,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Join namespaces through this process: for each (namespace, device,
    addresses) a TUN device is made here, moved into the namespace and given
    the addresses (10.78.0.X/24); every IPv4 packet one member sends to
    another's address is read here and written to the other's device
    `rtt`/2 seconds later, so every exchange between members -- UDP and TCP
    alike -- takes `rtt` more per round trip.  Traffic within one namespace
    does not pass here.  At most `queue` packets wait per device (more are
    dropped, as a router's full queue would).  Runs until cancelled; the
    devices vanish with the process."""
    if rtt < 0:
        raise ValueError("rtt must be >= 0")
    one_way = rtt / 2
    fds: dict[bytes, int] = {}
    devices: list[int] = []
    for ns, dev, addresses in members:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", dev.encode(), _IFF_TUN | _IFF_NO_PI))
        devices.append(fd)
        _sh("ip", "link", "set", "dev", dev, "netns", ns)
        for addr in addresses:
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            fds[socket.inet_aton(addr)] = fd
        _sh("ip", "-n", ns, "link", "set", dev, "up")
    outs = {fd: trio.open_memory_channel(queue) for fd in devices}

    async def deliver(fd: int, receive) -> None:
        async for due, packet in receive:
            await trio.sleep_until(due)
            try:
                os.write(fd, packet)
            except OSError:
                pass  # the member's device is down: the packet is lost, as on a wire

    async def read(fd: int) -> None:
        while True:
            await trio.lowlevel.wait_readable(fd)
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(packet) < 20 or packet[0] >> 4 != 4:
                    continue  # IPv4 only
                out = fds.get(packet[16:20])
                if out is None:
                    continue
                try:
                    outs[out][0].send_nowait((trio.current_time() + one_way, packet))
                except trio.WouldBlock:
                    pass  # a full queue drops

    try:
        async with trio.open_nursery() as nursery:
            for fd in devices:
                nursery.start_soon(deliver, fd, outs[fd][1])
                nursery.start_soon(read, fd)
            task_status.started()
    finally:
        for fd in devices:
            os.close(fd)


async def _router_main(members: list[tuple[str, str, list[str]]], rtt: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(delay_router, members, rtt)
        print(f"routing with {rtt * 1000:g} ms RTT", flush=True)
        await trio.sleep_forever()


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.netlab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("proxy", help="TCP proxy adding delay")
    p.add_argument("--listen", type=parse_addr, required=True)
    p.add_argument("--target", type=parse_addr, required=True)
    p.add_argument("--rtt", type=float, required=True, help="added round-trip time, seconds")
    p.add_argument("--no-handshake", action="store_true", help="do not delay the first bytes for a TCP handshake")
    s = sub.add_parser("sink", help="accept one connection, read to EOF, print a JSON line")
    s.add_argument("--listen", type=parse_addr, required=True)
    c = sub.add_parser("source", help="connect and write N bytes")
    c.add_argument("--connect", type=parse_addr, required=True)
    c.add_argument("--bytes", type=int, required=True)
    c.add_argument("--write-size", type=int, default=WRITE_SIZE)
    c.add_argument("--wait-go", action="store_true", help="after connecting, print 'connected' and wait for a stdin line")
    k = sub.add_parser("capture", help="write every frame received on some devices to a pcap file")
    k.add_argument("--dev", action="append", required=True, help="a device to capture on (repeatable)")
    k.add_argument("--out", type=Path, required=True, help="the pcap file to write")
    r = sub.add_parser("router", help="join namespaces through TUN devices, adding delay to every packet")
    r.add_argument("--rtt", type=float, required=True, help="added round-trip time, seconds")
    r.add_argument("--member", action="append", required=True, metavar="NETNS:DEV:ADDR[,ADDR...]")
    args = parser.parse_args(argv)
    if args.cmd == "router":
        members = []
        for m in args.member:
            ns, dev, addrs = m.split(":")
            members.append((ns, dev, addrs.split(",")))
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_router_main, members, args.rtt)
        return 0
    if args.cmd == "capture":
        _capture_main(args.dev, args.out)
    elif args.cmd == "proxy":
        trio.run(_proxy_main, args.listen, args.target, args.rtt, not args.no_handshake)
    elif args.cmd == "sink":
        trio.run(_sink_main, args.listen)
    else:
        trio.run(_source_main, args.connect, args.bytes, args.write_size, args.wait_go)
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
