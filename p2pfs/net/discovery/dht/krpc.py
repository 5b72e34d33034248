"""KRPC (BEP 5, 43, 44): bencoded datagrams <-> typed, validated messages.

Theory of operation
-------------------
`decode(datagram)` is the only door through which a peer's bytes become
objects.  It bencode-decodes strictly (bencode2: no trailing data, sorted
unique keys, canonical integers, bounded depth), then checks every field
this implementation reads against an explicit limit and builds one frozen
message: a query (`Ping`, `FindNode`, `GetPeers`, `AnnouncePeer`,
`GetItem`, `PutItem`, `UnknownQuery`), a `Response` or an `Error`.
Fields we do not read are ignored (BEP 5's forward compatibility), so
their contents cost nothing beyond the datagram bound.  Any failure
raises `ProtocolError`; a query whose envelope was sound but whose
arguments are not raises its subclass `BadQuery`, carrying the transaction
id so that the node can answer "203 Protocol Error".

A response does not say which query it answers, so `Response` carries
every reply field, each validated when present; the caller that sent the
query knows which it needs.  `v` (a BEP 44 value) is kept as its bencoded
bytes: strict decoding means re-encoding is an identity, so these are the
bytes the signature covers.

Only IPv4 is spoken: `nodes6` and 18-byte peers are ignored.
`encode(message)` is the inverse, for messages we build ourselves.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Union

import bencode2

from ....errors import ProtocolError

MAX_DATAGRAM = 1500        # bytes; larger datagrams are dropped unread
ID_BYTES = 20
MAX_TRANSACTION_ID = 16    # bytes of `t`
MAX_TOKEN = 64             # bytes of a write token
MAX_COMPACT_NODES = 32     # nodes in one `nodes` field (26 bytes each)
MAX_VALUES = 200           # peers in one `values` list (6 bytes each)
MAX_VALUE = 1000           # bytes of a BEP 44 value, bencoded
MAX_SALT = 64              # bytes of a BEP 44 salt
MAX_SEQ = 2**63 - 1
MAX_METHOD = 32            # bytes of a query's method name
MAX_ERROR_MESSAGE = 256    # characters kept of an error's message
CLIENT_VERSION = b"PF\x00\x01"

COMPACT_NODE = 26
COMPACT_PEER = 6

# BEP 5 and BEP 44 error codes
GENERIC_ERROR = 201
SERVER_ERROR = 202
PROTOCOL_ERROR = 203
METHOD_UNKNOWN = 204
VALUE_TOO_BIG = 205
INVALID_SIGNATURE = 206
SALT_TOO_BIG = 207
CAS_MISMATCH = 301
SEQ_TOO_OLD = 302

Address = tuple[str, int]  # (IPv4 dotted quad, port)


class BadQuery(ProtocolError):
    """A query with a sound envelope (`t`) but malformed arguments."""

    def __init__(self, message: str, t: bytes):
        super().__init__(message)
        self.t = t


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node as carried in compact node info: ID and address."""

    id: bytes
    host: str
    port: int

    @property
    def address(self) -> Address:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Ping:
    t: bytes
    id: bytes
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class FindNode:
    t: bytes
    id: bytes
    target: bytes
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class GetPeers:
    t: bytes
    id: bytes
    info_hash: bytes
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class AnnouncePeer:
    t: bytes
    id: bytes
    info_hash: bytes
    port: int          # 0 allowed only with implied_port
    token: bytes
    implied_port: bool = False
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class GetItem:
    t: bytes
    id: bytes
    target: bytes
    seq: int | None = None  # only send the item if its seq is greater
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class PutItem:
    """A BEP 44 put: mutable when `k` is given (then `seq` and `sig` are too), else immutable."""

    t: bytes
    id: bytes
    token: bytes
    v: bytes                 # the value, bencoded (<= MAX_VALUE)
    k: bytes | None = None   # Ed25519 public key (32)
    salt: bytes = b""
    seq: int | None = None
    sig: bytes | None = None
    cas: int | None = None
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class UnknownQuery:
    t: bytes
    id: bytes
    method: bytes
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class Response:
    t: bytes
    id: bytes
    ip: Address | None = None              # what the responder saw as our address (BEP 42)
    nodes: tuple[NodeInfo, ...] = ()
    values: tuple[Address, ...] = ()
    token: bytes | None = None
    k: bytes | None = None
    seq: int | None = None
    sig: bytes | None = None
    v: bytes | None = None                 # bencoded


@dataclass(frozen=True, slots=True)
class Error:
    t: bytes
    code: int
    message: str = ""


Query = Union[Ping, FindNode, GetPeers, AnnouncePeer, GetItem, PutItem, UnknownQuery]
Message = Union[Query, Response, Error]

METHODS = {Ping: b"ping", FindNode: b"find_node", GetPeers: b"get_peers",
           AnnouncePeer: b"announce_peer", GetItem: b"get", PutItem: b"put"}


# --- compact formats ------------------------------------------------------------

def usable_address(host: str, port: int) -> bool:
    """Could a node be at (host, port)?  A unicast IPv4 address and a port other than 0."""
    if not 0 < port < 65536:
        return False
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_multicast or ip.is_reserved)


def pack_address(host: str, port: int) -> bytes:
    return ipaddress.IPv4Address(host).packed + port.to_bytes(2, "big")


def unpack_address(data: bytes) -> Address:
    return (str(ipaddress.IPv4Address(data[:4])), int.from_bytes(data[4:6], "big"))


def pack_nodes(nodes) -> bytes:
    return b"".join(n.id + pack_address(n.host, n.port) for n in nodes)


def unpack_nodes(data: bytes, limit: int = MAX_COMPACT_NODES) -> tuple[NodeInfo, ...]:
    """Compact node info (26 bytes each).  ProtocolError if malformed or too many."""
    if len(data) % COMPACT_NODE or len(data) > limit * COMPACT_NODE:
        raise ProtocolError(f"compact node list of {len(data)} bytes")
    return tuple(NodeInfo(data[i:i + 20], *unpack_address(data[i + 20:i + 26]))
                 for i in range(0, len(data), COMPACT_NODE))


# --- decoding ---------------------------------------------------------------------

def _bytes(d: dict, key: bytes, *, size: int | None = None, low: int = 0, high: int | None = None,
           optional: bool = False) -> bytes | None:
    value = d.get(key)
    if value is None:
        if optional:
            return None
        raise ProtocolError(f"missing {key.decode()!r}")
    if not isinstance(value, bytes):
        raise ProtocolError(f"{key.decode()!r} is not a string")
    if size is not None and len(value) != size:
        raise ProtocolError(f"{key.decode()!r} is {len(value)} bytes, not {size}")
    if len(value) < low or (high is not None and len(value) > high):
        raise ProtocolError(f"{key.decode()!r} of {len(value)} bytes")
    return value


def _int(d: dict, key: bytes, low: int, high: int, *, optional: bool = False) -> int | None:
    value = d.get(key)
    if value is None:
        if optional:
            return None
        raise ProtocolError(f"missing {key.decode()!r}")
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{key.decode()!r} out of range")
    return value


def _flag(d: dict, key: bytes) -> bool:
    value = d.get(key, 0)
    return type(value) is int and value == 1


def _value(raw) -> bytes:
    """A BEP 44 value re-encoded: with a strict decoder, exactly the bytes received."""
    try:
        encoded = bencode2.bencode(raw)
    except Exception:  # bencode2 raises several types; none may escape
        raise ProtocolError("'v' does not encode") from None
    if len(encoded) > MAX_VALUE:
        raise ProtocolError(f"'v' of {len(encoded)} bytes (at most {MAX_VALUE})")
    return encoded


def decode(datagram: bytes) -> Message:
    """One KRPC datagram -> a message.  Raises only ProtocolError (or BadQuery)."""
    if len(datagram) > MAX_DATAGRAM:
        raise ProtocolError(f"datagram of {len(datagram)} bytes (at most {MAX_DATAGRAM})")
    try:
        top = bencode2.bdecode(datagram)
    except Exception:  # BencodeDecodeError, RecursionError, MemoryError...: all peer garbage
        raise ProtocolError("datagram is not strict bencode") from None
    if not isinstance(top, dict):
        raise ProtocolError("datagram is not a dictionary")
    t = _bytes(top, b"t", low=1, high=MAX_TRANSACTION_ID)
    kind = top.get(b"y")
    if kind == b"q":
        return _decode_query(top, t)
    if kind == b"r":
        return _decode_response(top, t)
    if kind == b"e":
        return _decode_error(top, t)
    raise ProtocolError("'y' is not q, r or e")


def _decode_query(top: dict, t: bytes) -> Query:
    method = _bytes(top, b"q", low=1, high=MAX_METHOD)
    args = top.get(b"a")
    if not isinstance(args, dict):
        raise BadQuery("query without an argument dictionary", t)
    try:
        node_id = _bytes(args, b"id", size=ID_BYTES)
        ro = _flag(top, b"ro")
        if method == b"ping":
            return Ping(t, node_id, ro)
        if method == b"find_node":
            return FindNode(t, node_id, _bytes(args, b"target", size=ID_BYTES), ro)
        if method == b"get_peers":
            return GetPeers(t, node_id, _bytes(args, b"info_hash", size=ID_BYTES), ro)
        if method == b"announce_peer":
            implied = _flag(args, b"implied_port")
            port = _int(args, b"port", 0 if implied else 1, 65535, optional=implied) or 0
            return AnnouncePeer(t, node_id, _bytes(args, b"info_hash", size=ID_BYTES), port,
                                _bytes(args, b"token", low=1, high=MAX_TOKEN), implied, ro)
        if method == b"get":
            return GetItem(t, node_id, _bytes(args, b"target", size=ID_BYTES),
                           _int(args, b"seq", 0, MAX_SEQ, optional=True), ro)
        if method == b"put":
            return _decode_put(args, t, node_id, ro)
        return UnknownQuery(t, node_id, method, ro)
    except BadQuery:
        raise
    except ProtocolError as exc:
        raise BadQuery(f"{method.decode('latin-1')}: {exc}", t) from None


def _decode_put(args: dict, t: bytes, node_id: bytes, ro: bool) -> PutItem:
    token = _bytes(args, b"token", low=1, high=MAX_TOKEN)
    if b"v" not in args:
        raise ProtocolError("missing 'v'")
    value = _value(args[b"v"])
    key = _bytes(args, b"k", size=32, optional=True)
    if key is None:
        return PutItem(t, node_id, token, value, read_only=ro)
    return PutItem(t, node_id, token, value, key,
                   _bytes(args, b"salt", high=MAX_SALT, optional=True) or b"",
                   _int(args, b"seq", 0, MAX_SEQ), _bytes(args, b"sig", size=64),
                   _int(args, b"cas", 0, MAX_SEQ, optional=True), ro)


def _decode_response(top: dict, t: bytes) -> Response:
    r = top.get(b"r")
    if not isinstance(r, dict):
        raise ProtocolError("response without a reply dictionary")
    ip = _bytes(top, b"ip", optional=True)
    nodes = _bytes(r, b"nodes", optional=True)
    values = r.get(b"values")
    peers = ()
    if values is not None:
        if not isinstance(values, list) or len(values) > MAX_VALUES:
            raise ProtocolError("'values' is not a list of at most %d peers" % MAX_VALUES)
        if not all(isinstance(p, bytes) for p in values):
            raise ProtocolError("'values' holds a non-string")
        peers = tuple(unpack_address(p) for p in values if len(p) == COMPACT_PEER)
    v = _value(r[b"v"]) if b"v" in r else None
    return Response(
        t, _bytes(r, b"id", size=ID_BYTES),
        unpack_address(ip) if ip is not None and len(ip) == COMPACT_PEER else None,
        unpack_nodes(nodes) if nodes is not None else (),
        peers,
        _bytes(r, b"token", low=1, high=MAX_TOKEN, optional=True),
        _bytes(r, b"k", size=32, optional=True),
        _int(r, b"seq", 0, MAX_SEQ, optional=True),
        _bytes(r, b"sig", size=64, optional=True),
        v,
    )


def _decode_error(top: dict, t: bytes) -> Error:
    e = top.get(b"e")
    if not isinstance(e, list) or len(e) < 2 or type(e[0]) is not int or not isinstance(e[1], bytes):
        raise ProtocolError("error without [code, message]")
    return Error(t, e[0], e[1][:MAX_ERROR_MESSAGE].decode("utf-8", "replace"))


# --- encoding ---------------------------------------------------------------------

def encode(message: Message, *, ip: Address | None = None) -> bytes:
    """Bencode a message we built.  `ip` (answers): the address we saw the asker at
    (BEP 42); a `Response` may carry it as its own `ip` instead."""
    top: dict[bytes, object] = {b"t": message.t, b"v": CLIENT_VERSION}
    if ip is None and isinstance(message, Response):
        ip = message.ip
    if ip is not None:
        top[b"ip"] = pack_address(*ip)
    if isinstance(message, Response):
        r: dict[bytes, object] = {b"id": message.id}
        if message.nodes:
            r[b"nodes"] = pack_nodes(message.nodes)
        if message.values:
            r[b"values"] = [pack_address(*p) for p in message.values]
        for key in ("token", "k", "seq", "sig"):
            value = getattr(message, key)
            if value is not None:
                r[key.encode()] = value
        if message.v is not None:  # canonical bencode: decoding and re-encoding is the identity
            r[b"v"] = bencode2.bdecode(message.v)
        top[b"y"], top[b"r"] = b"r", r
        return bencode2.bencode(top)
    if isinstance(message, Error):
        top[b"y"], top[b"e"] = b"e", [message.code, message.message.encode()]
        return bencode2.bencode(top)
    a: dict[bytes, object] = {b"id": message.id}
    top[b"y"], top[b"q"], top[b"a"] = b"q", METHODS.get(type(message), b""), a
    if message.read_only:
        top[b"ro"] = 1
    if isinstance(message, UnknownQuery):
        top[b"q"] = message.method
    elif isinstance(message, FindNode):
        a[b"target"] = message.target
    elif isinstance(message, GetPeers):
        a[b"info_hash"] = message.info_hash
    elif isinstance(message, AnnouncePeer):
        a.update({b"info_hash": message.info_hash, b"port": message.port, b"token": message.token})
        if message.implied_port:
            a[b"implied_port"] = 1
    elif isinstance(message, GetItem):
        a[b"target"] = message.target
        if message.seq is not None:
            a[b"seq"] = message.seq
    elif isinstance(message, PutItem):
        a[b"token"] = message.token
        if message.k is not None:
            a.update({b"k": message.k, b"seq": message.seq, b"sig": message.sig})
            if message.salt:
                a[b"salt"] = message.salt
            if message.cas is not None:
                a[b"cas"] = message.cas
        a[b"v"] = bencode2.bdecode(message.v)
    return bencode2.bencode(top)
