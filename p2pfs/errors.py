"""Errors of p2pfs.

Every exception meant for a user derives from `P2pfsError`; its message is
exactly what the CLI prints (one line, saying what to do next where there is
something to do).  Only `p2pfs.cli` turns exceptions into exit codes.

Errors caused by bytes a *peer* sent are `ProtocolError`: decoders and the
wire state machine may raise nothing else on peer input.  Errors caused by
our own misuse of an API are ordinary Python exceptions (TypeError,
ValueError, AssertionError) and are bugs.
"""

from __future__ import annotations


class P2pfsError(Exception):
    """Base class; str(exc) is the message shown to the user."""

    exit_code = 1


class UsageError(P2pfsError):
    """The user gave bad input: a malformed key, path or option."""

    exit_code = 2


class NotFoundError(P2pfsError):
    """An unknown drive, a missing path, or a version past the head."""


class VerificationError(P2pfsError):
    """A hash, proof or signature does not match: corrupt local data or a lying peer."""


class ForkError(VerificationError):
    """Two different signed roots exist for one length of a drive."""


class BlockUnavailableError(P2pfsError):
    """A block is not held locally and no peer supplied it in time."""


class ReadOnlyError(P2pfsError):
    """A write to a drive whose secret key this node does not hold."""


class KeyFileError(P2pfsError):
    """A secret-key file is missing, malformed or readable by others."""


class StoreError(P2pfsError):
    """The local store cannot be opened or written (disk full, permissions)."""


class DiskFullError(StoreError):
    """The disk holding the store is full: says how much is free and, when the
    writer knows it, about how much more the command needs."""

    def __init__(self, home, free: int | None, needed: int | None = None):
        self.home, self.free, self.needed = home, free, needed
        have = "no space left" if not free else f"{free / (1 << 20):.1f} MiB free"
        more = "" if needed is None else f", this needs about {max(needed, 1 << 20) / (1 << 20):,.0f} MiB more"
        super().__init__(f"the disk holding the store in {home} is full ({have}{more}): free some "
                         "space, or give --home a bigger disk, and run the command again")

    def needing(self, nbytes: int) -> "DiskFullError":
        """The same error, with what the command still had to write."""
        return DiskFullError(self.home, self.free, nbytes)


class StoreDamagedError(StoreError):
    """The local store's file is damaged (an LMDB page, a truncated file)."""

    def __init__(self, home, detail: str):
        self.home = home
        self.detail = detail
        super().__init__(f"the store in {home} is damaged: {detail}; run 'p2pfs verify'")


class ProtocolError(P2pfsError):
    """A peer sent bytes that break the protocol.  The only error peer input may raise."""


class TruncatedError(ProtocolError):
    """The peer's byte stream ended inside a frame: a connection cut (a
    crash, a kill), not a breach of the protocol."""


class MissingBlock(Exception):
    """Internal signal, never shown to users: block(s) needed are not held locally.

    Raised by synchronous readers (the index, the tree) so that an async
    caller can fetch `indices` from peers and try again.
    """

    def __init__(self, indices: int | list[int]):
        if isinstance(indices, int):
            indices = [indices]
        self.indices = list(indices)
        super().__init__(f"blocks not held locally: {self.indices[:8]}")
