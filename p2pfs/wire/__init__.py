"""Sans-IO wire protocol (version 2): Noise XX handshake, version and cipher
negotiation, frames, messages, connection state.

Pure core: imports only crypto/types/errors, msgspec and hashlib -- never
trio, sockets or clocks.  See `connection` for the theory of operation.
"""
