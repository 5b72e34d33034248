"""LAN discovery source: UDP multicast on every interface, driven with trio.

The protocol (packets, timers, rate limits) is `lan_protocol.LanProtocol`;
this module only moves its datagrams.  Two sockets:

* the *group socket* is bound to `GROUP`:`PORT` (SO_REUSEADDR, so several
  nodes on one host share it) and has joined the group on every interface
  we use: it receives announcements and queries;
* the *unicast socket* is bound to an ephemeral port: everything we send
  leaves from it, so answers to our queries come back to it and to no
  other node on this host.

Multicast goes out once per interface that is up, running, multicast-capable
and has an IPv4 address (loopback only if someone switched multicast on
for it), each datagram pinned to its interface with IP_PKTINFO, TTL 1, with
IP_MULTICAST_LOOP on so that nodes on one host hear each other.  The
interface list is rescanned every `SCAN_INTERVAL` s; a new interface makes
the node announce and query again at once.

The source never fails the node: if the group port cannot be bound, the
reason is in `status()["error"]` and set-up is retried every
`RETRY_INTERVAL` s.  Send errors (an interface gone, a firewall) are counted.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio

from . import Candidate, Emit
from .lan_protocol import GROUP, MAX_PACKET, PORT, Found, LanProtocol, Send

SCAN_INTERVAL = 5.0
RETRY_INTERVAL = 30.0
RECEIVE_BATCH = 256  # datagrams handled per wake-up

_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_IFF_UP, _IFF_RUNNING, _IFF_MULTICAST = 0x1, 0x40, 0x1000
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux; the constant is in Python 3.12+
# Errors a datagram socket may report for one datagram; anything else is a bug.
_TRANSIENT = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
              errno.EHOSTDOWN, errno.ENODEV, errno.ENXIO, errno.EADDRNOTAVAIL, errno.EPERM,
              errno.EACCES, errno.ENOBUFS, errno.EAGAIN, errno.EMSGSIZE}


@dataclass(frozen=True, slots=True)
class Interface:
    index: int
    name: str
    address: str  # its (primary) IPv4 address


def multicast_interfaces(probe: socket.socket | None = None) -> list[Interface]:
    """The interfaces of this network namespace that LAN discovery uses:
    up, running, multicast-capable, with an IPv4 address.  `probe`: an open
    IPv4 socket to ask through (the source's own: a scan then needs no new
    descriptor, so a process at its descriptor limit, say a seeder under a
    connection flood, keeps scanning instead of failing with EMFILE)."""
    if probe is None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:
            return multicast_interfaces(own)
    found = []
    names = socket.if_nameindex()  # OSError (it opens a netlink socket): the caller's to handle
    for index, name in names:
        raw = name.encode()[:15]
        try:
            flags = struct.unpack_from("H", fcntl.ioctl(probe, _SIOCGIFFLAGS, struct.pack("16s24x", raw)), 16)[0]
            wanted = _IFF_UP | _IFF_RUNNING | _IFF_MULTICAST
            if flags & wanted != wanted:
                continue
            reply = fcntl.ioctl(probe, _SIOCGIFADDR, struct.pack("16sH22x", raw, socket.AF_INET))
        except OSError:  # gone meanwhile, or no IPv4 address
            continue
        found.append(Interface(index, name, socket.inet_ntoa(reply[20:24])))
    return found


class LanSource:
    """The `discovery.Source` for the local network (see the module docstring)."""

    name = "lan"

    def __init__(self, node_key: bytes, *, group: str = GROUP, port: int = PORT):
        """`node_key`: this node's X25519 public key (peers check it in the handshake)."""
        self.group, self.port = group, port
        self._protocol = LanProtocol(node_key)
        self._deferred: list[Callable[[float], None]] = []  # calls made before trio runs
        self._wakeup: trio.Event | None = None
        self._interfaces: list[Interface] = []
        self._memberships: set[int] = set()
        self._next_scan = float("-inf")
        self._error: str | None = None
        self._errors = dict.fromkeys(("send_errors", "receive_errors", "membership_errors", "scan_errors"), 0)

    # the Source interface -------------------------------------------------------

    def join(self, discovery_key: bytes, *, announce: bool) -> None:
        self._call(lambda now: self._protocol.join(discovery_key, announce=announce, now=now))

    def leave(self, discovery_key: bytes) -> None:
        self._call(lambda now: self._protocol.leave(discovery_key))

    def set_port(self, port: int | None) -> None:
        self._call(lambda now: self._protocol.set_port(port, now))

    @property
    def active(self) -> bool:
        return self._error is None and bool(self._interfaces)

    def status(self) -> dict:
        return {
            "group": f"{self.group}:{self.port}",
            "interfaces": [i.name for i in self._interfaces],
            "error": self._error,
            **self._errors,
            **self._protocol.status(),
        }

    async def run(self, emit: Emit, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Discover until cancelled.  Started once the sockets are bound (or
        binding failed: then retried, see status()["error"])."""
        for call in self._deferred:
            call(trio.current_time())
        self._deferred.clear()
        started = False
        while True:
            try:
                group_sock, unicast = self._open_sockets()
            except OSError as exc:
                self._error = f"LAN discovery cannot use UDP {self.group}:{self.port}: {exc.strerror or exc}"
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(RETRY_INTERVAL)
                continue
            self._error = None
            with group_sock, unicast:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive, group_sock, unicast, emit)
                    nursery.start_soon(self._receive, unicast, unicast, emit)
                    self._scan(group_sock, trio.current_time(), initial=True)
                    if not started:
                        task_status.started()
                        started = True
                    await self._timers(group_sock, unicast)

    # internals ------------------------------------------------------------------

    def _call(self, call: Callable[[float], None]) -> None:
        try:
            now = trio.current_time()
        except RuntimeError:  # not inside trio yet: run() replays it
            self._deferred.append(call)
            return
        call(now)
        if self._wakeup is not None:
            self._wakeup.set()

    def _open_sockets(self) -> tuple[socket.socket, socket.socket]:
        """Non-blocking datagram sockets: sends never wait (a full buffer drops
        the datagram) and receives are drained in batches (see `_receive`)."""
        group_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        unicast = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for sock in (group_sock, unicast):
                sock.setblocking(False)
            group_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Bound to the group address: unicast datagrams to this port are not ours.
            group_sock.bind((self.group, self.port))
            unicast.bind(("0.0.0.0", 0))
            unicast.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            unicast.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        except OSError:
            group_sock.close()
            unicast.close()
            raise
        self._memberships.clear()
        return group_sock, unicast

    def _scan(self, group_sock: socket.socket, now: float, *, initial: bool = False) -> None:
        """Re-list the interfaces and join the group on new ones."""
        self._next_scan = now + SCAN_INTERVAL
        try:
            interfaces = multicast_interfaces(group_sock)
        except OSError:  # EMFILE and the like: keep what we have, look again next time
            self._errors["scan_errors"] += 1
            return
        current = {i.index for i in interfaces}
        self._memberships &= current  # the kernel drops a membership with its interface
        joined = []
        for iface in interfaces:
            if iface.index not in self._memberships:
                mreq = struct.pack("4s4si", socket.inet_aton(self.group), bytes(4), iface.index)
                try:
                    group_sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:  # EADDRINUSE: already a member
                        self._errors["membership_errors"] += 1  # (ENOBUFS: igmp_max_memberships)
                        continue
                self._memberships.add(iface.index)
            joined.append(iface)
        new = {i.index for i in joined} - {i.index for i in self._interfaces}
        self._interfaces = joined
        if new and not initial:
            self._protocol.network_changed(now)

    async def _timers(self, group_sock: socket.socket, unicast: socket.socket) -> None:
        while True:
            now = trio.current_time()
            if now >= self._next_scan:
                self._scan(group_sock, now)
            for item in self._protocol.tick(now):
                self._send(unicast, item)
            self._wakeup = trio.Event()
            with trio.move_on_at(min(self._protocol.deadline(now), self._next_scan)):
                await self._wakeup.wait()

    async def _receive(self, sock: socket.socket, unicast: socket.socket, emit: Emit) -> None:
        """Handle datagrams until cancelled: wait until `sock` is readable, then
        drain up to RECEIVE_BATCH datagrams without yielding.  A flood is then
        read as fast as the kernel queues it (a datagram costs a recvfrom and a
        token-bucket check), so the datagrams of other sources still get in."""
        while True:
            await trio.lowlevel.wait_readable(sock)  # a checkpoint: other tasks run between batches
            now = trio.current_time()
            for _ in range(RECEIVE_BATCH):
                try:
                    data, address = sock.recvfrom(MAX_PACKET + 1)  # longer: too long, refused
                except BlockingIOError:
                    break
                except OSError as exc:
                    self._count_error(exc, "receive_errors")
                    continue
                for item in self._protocol.datagram_received(data, address[0], address[1], now):
                    if isinstance(item, Found):
                        emit(item.discovery_key, Candidate(item.host, item.port, "lan", item.node_key))
                    else:
                        self._send(unicast, item)

    def _send(self, sock: socket.socket, item: Send) -> None:
        """Send a datagram: unicast, or to the group once per interface."""
        if item.to is not None:
            try:
                sock.sendto(item.data, item.to)
            except OSError as exc:
                self._count_error(exc, "send_errors")
            return
        for iface in self._interfaces:
            pktinfo = struct.pack("i4s4s", iface.index, bytes(4), bytes(4))  # this interface, its address
            try:
                sock.sendmsg([item.data], [(socket.IPPROTO_IP, _IP_PKTINFO, pktinfo)], 0, (self.group, self.port))
            except OSError as exc:
                self._count_error(exc, "send_errors")

    def _count_error(self, exc: OSError, counter: str) -> None:
        """Count an error a datagram socket reports for one datagram; re-raise any other."""
        if exc.errno not in _TRANSIENT:
            raise exc
        self._errors[counter] += 1
