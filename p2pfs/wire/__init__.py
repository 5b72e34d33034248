"""Sans-IO wire protocol: Noise XX handshake, frames, messages, connection state.

Pure core: imports only crypto/types/errors, msgspec and hashlib -- never
trio, sockets or clocks.  See `connection` for the theory of operation.
"""
