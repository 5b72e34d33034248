"""Command-line interface (placeholder until the drive-core work lands)."""

import sys


def main(argv=None) -> int:
    print("p2pfs: not built yet", file=sys.stderr)
    return 1
