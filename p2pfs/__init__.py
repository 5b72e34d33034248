"""p2pfs: mount a peer-to-peer drive, named by an Ed25519 public key, as a folder."""

__version__ = "0.1.0"
