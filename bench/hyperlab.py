"""Holepunch Hyperdrive 13 as a baseline: the node scripts in bench/hyperdrive/
(put.mjs imports a directory, serve.mjs serves it over plain TCP, fetch.mjs
reads one file cold, download.mjs copies a whole drive: both through remote.mjs),
driven from Python.

Only corestore and hyperdrive are loaded (the versions pinned in
package-lock.json): no hyperswarm, no hyperdht, so nothing contacts a public
host; serve and fetch run inside the namespaces the caller gives.  When `node`
is there but node_modules is not, `npm ci` installs them once (npm packages
install by name on these machines); without node the Hyperdrive rows are
left out with a line saying why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bench.netlab import Lab, LabError, Netns, Service

HYPERDRIVE = Path(__file__).resolve().parent / "hyperdrive"


def missing() -> str | None:
    """Why Hyperdrive cannot run here, or None (installing node_modules if needed)."""
    if shutil.which("node") is None:
        return "no node on PATH (apt install nodejs npm)"
    if not (HYPERDRIVE / "node_modules").is_dir():
        if shutil.which("npm") is None:
            return f"no npm to install {HYPERDRIVE}/node_modules (apt install npm)"
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HYPERDRIVE,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"npm ci in {HYPERDRIVE} failed: {done.stderr.strip()[-300:]}"
    return None


def put(directory: Path, storage: Path) -> tuple[float, str]:
    """Import `directory` into a new corestore at `storage`: (seconds, drive key hex)."""
    out = subprocess.run(["node", str(HYPERDRIVE / "put.mjs"), str(directory), str(storage)],
                         capture_output=True, text=True, cwd=HYPERDRIVE, timeout=1800)
    if out.returncode != 0:
        raise LabError(f"hyperdrive put.mjs exited with {out.returncode}: {out.stderr.strip()[-300:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["seconds"], result["key"]


def serve(lab: Lab, ns: Netns, storage: Path) -> Service:
    """A Hyperdrive seeder of the corestore at `storage`, listening in `ns`."""
    return lab.service(ns, ["node", str(HYPERDRIVE / "serve.mjs"), str(storage)], "hyperdrive-serve",
                       timeout=60.0)


def fetch(lab: Lab, ns: Netns, storage: Path, key: str, server: Service, path: str,
          timeout: float = 900.0) -> tuple[float, float, int]:
    """Read `path` cold into a fresh corestore at `storage` from `server`:
    (wall seconds of the whole process, its CPU seconds, bytes read)."""
    argv = ["node", str(HYPERDRIVE / "fetch.mjs"), str(storage), key, str(server.addr[1]), path]
    wall, cpu, done = lab.timed(ns, argv, capture_output=True, text=True, cwd=HYPERDRIVE, timeout=timeout)
    shutil.rmtree(storage, ignore_errors=True)
    if done.returncode != 0:
        raise LabError(f"hyperdrive fetch.mjs exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    return wall, cpu, json.loads(done.stdout.strip().splitlines()[-1])["bytes"]
