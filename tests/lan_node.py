"""A LAN discovery node for tests/test_lan.py, run as a process inside a lab namespace.

    python tests/lan_node.py [--serve KEY]... [--read KEY]... [--port N]
                             [--lan-port N] [--node-key HEX]

Runs one `LanSource` (the real one: sockets, interfaces, timers) that
serves (`--serve`, announcing TCP port `--port`) and reads (`--read`)
drives given by drive key, joining their discovery keys as the swarm does
(so this process knows the drive keys, and a capture can check that they
never reach the wire).  Prints JSON lines on stdout:
{"ready": ..., "t": ...} once the source is running, {"found": dk, "host",
"port", "node_key", "source", "t"} for each candidate it emits, and
{"status": ...} when it gets SIGTERM (then exits 0).  "t" is
time.monotonic(): the system-wide clock, comparable across processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import trio

from p2pfs import crypto
from p2pfs.net.discovery.lan import LanSource
from p2pfs.net.discovery.lan_protocol import PORT


def say(**fields) -> None:
    print(json.dumps({**fields, "t": time.monotonic()}), flush=True)


async def main(args) -> None:
    node_key = bytes.fromhex(args.node_key) if args.node_key else crypto.x25519_public(crypto.x25519_keypair()[0])
    source = LanSource(node_key, port=args.lan_port)
    if args.port:
        source.set_port(args.port)
    for key in args.serve:
        source.join(crypto.discovery_key(crypto.decode_key(key)), announce=True)
    for key in args.read:
        source.join(crypto.discovery_key(crypto.decode_key(key)), announce=False)

    def emit(discovery_key, candidate):
        say(found=discovery_key.hex(), host=candidate.host, port=candidate.port,
            node_key=candidate.node_key.hex(), source=candidate.source)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, emit)
            say(ready=True, node_key=node_key.hex(), interfaces=source.status()["interfaces"])
            async for _ in signals:
                break
            say(status=source.status())
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="append", default=[])
    parser.add_argument("--read", action="append", default=[])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lan-port", type=int, default=PORT)
    parser.add_argument("--node-key")
    trio.run(main, parser.parse_args())
