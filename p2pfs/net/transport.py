"""TCP transport: node keys, peer addresses, and dialling/listening with trio.

A node's static X25519 key (its identity in Noise handshakes) is made
fresh by every process (`new_node_key`).
"""

from __future__ import annotations


import trio

from .. import crypto
from ..errors import UsageError

DEFAULT_PORT = 7640
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"
EPHEMERAL_LISTEN = "0.0.0.0:0"  # a reader that also serves: any free port
CONNECT_TIMEOUT = 5.0


def new_node_key() -> bytes:
    """A fresh X25519 private key: this process's identity in Noise handshakes.

    Every process has its own (nothing is kept in the home): two processes
    of one home (a mount and an `info`, a seeder and a share) are two
    nodes to their peers, and connections are deduplicated per process."""
    private, _ = crypto.x25519_keypair()
    return private


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port).  UsageError if malformed."""
    raw = text.strip()
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        host, port_text = raw, ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text and default_port is not None:
        port_text = str(default_port)
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{text!r} is not a peer address: expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def dial(address: str) -> trio.SocketStream:
    """Open a TCP connection to 'HOST:PORT'.

    Raises trio.TooSlowError after CONNECT_TIMEOUT, else OSError
    (`describe_dial_error` says why in a user's words)."""
    host, port = parse_address(address)
    with trio.fail_after(CONNECT_TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
    tune(stream)
    return stream


def describe_dial_error(exc: BaseException) -> str:
    """What a failed dial says to a user: refused, timed out, or the system's words."""
    if isinstance(exc, trio.TooSlowError):
        return f"timed out after {CONNECT_TIMEOUT:g} s"
    # trio reports "all attempts to connect ... failed" with the real errors as the cause
    errors = [exc]
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        errors = list(cause.exceptions)
    elif cause is not None:
        errors = [cause]
    for e in errors:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
    for e in errors:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower() if e.strerror[:1].isupper() and e.strerror[1:2].islower() else e.strerror
    return str(exc) or type(exc).__name__


def address_host(address: str) -> str:
    """The host part of 'HOST:PORT' (or '[v6]:PORT')."""
    host = address.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


def tune(stream: trio.SocketStream) -> None:
    import socket

    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    except OSError:
        pass


async def listen(address: str) -> list[trio.SocketListener]:
    """Listeners bound to 'HOST:PORT' (port 0: any free port).  UsageError if it cannot bind."""
    host, port = parse_address(address)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise UsageError(f"cannot listen on {address}: {exc.strerror or exc}") from None


def listener_address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return format_address(host, port)


def peer_address(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return format_address(host, port)
