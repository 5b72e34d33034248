"""The import layering of HACKING.md, checked on the source (ast, no imports run)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "p2pfs"

PURE = {"errors", "types", "flat", "crypto", "tree", "index", "wire"}
THIRD_PURE = {"blake3", "nacl", "cryptography", "msgspec"}
FORBIDDEN_EVERYWHERE_BUT = {  # third-party module -> the only p2pfs modules that may import it
    "lmdb": {"store"},
    "nacl": {"crypto"},
    "cryptography": {"crypto"},
    "pyfuse3": {"fs", "wfs", "mount", "node", "cli"},
}
ALLOWED = {  # p2pfs module (top-level name) -> p2pfs modules it may import
    "errors": set(),
    "types": set(),
    "flat": set(),
    "crypto": {"errors"},
    "tree": {"flat", "types", "errors"},
    "index": {"types", "errors"},
    "wire": {"crypto", "types", "errors", "wire"},
    "store": PURE,
    "drive": PURE | {"store"},
    "history": PURE | {"store", "drive"},
    "cache": PURE | {"store", "drive"},  # which drives are cache, touches, the cap
    "download": PURE | {"store", "drive"},  # fetching a full copy (seed, pin, mirror); trio
    "mirror": PURE | {"store", "drive", "download"},  # a drive written into a plain directory
    "ignore": {"errors"},
    "publish": PURE | {"store", "drive", "ignore"},
    "watch": PURE | {"store", "drive", "ignore", "publish"},
    "net": PURE | {"store", "drive", "publish", "net", "heap"},
    "workspace": PURE | {"store", "drive", "publish"},  # the writable tree, sans FUSE
    "fs": PURE | {"drive", "publish", "snapshots", "fs"},
    "snapshots": PURE | {"drive"},
    "wfs": PURE | {"drive", "publish", "workspace", "snapshots", "fs"},  # the writable mount's FUSE face
    "node": None,  # wiring: everything
    "mount": None,  # wiring for `p2pfs mount` (the FUSE session's process)
    "share": None,  # wiring for `p2pfs share` (watcher, publisher and swarm in one process)
    "daemon": {"errors"},  # --daemon: re-run a command detached, wait until it is ready
    "status": {"store"},  # HOME/run: what each long-running process is doing (trio)
    "progress": set(),  # the progress bar of long writes (rich)
    "seeder": None,  # wiring for `p2pfs seed`
    "config": {"errors"},
    "heap": set(),  # the process's malloc policy and malloc_trim (ctypes, glibc)
    "cli": None,
}
NO_TRIO = PURE | {"store", "drive", "history", "ignore", "publish", "cache", "snapshots", "workspace",
                  "heap"}
SANS_IO_DIRS = {("net", "discovery", "dht"): {"node.py"}}  # folder -> its only trio drivers


def _modules(pkg: Path = PKG):
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        if rel.name in ("__init__.py", "__main__.py") and len(rel.parts) == 1:
            continue
        yield rel.parts[0].removesuffix(".py"), path


def _imports(path: Path, top: str, pkg: Path = PKG) -> tuple[set[str], set[str]]:
    """(p2pfs top-level modules, third-party top-level modules) imported by a file."""
    tree = ast.parse(path.read_text(), str(path))
    ours, theirs = set(), set()
    depth_in_pkg = len(path.relative_to(pkg).parts) - 1
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                if name == "p2pfs" or name.startswith("p2pfs."):
                    parts = name.split(".")
                    if len(parts) > 1:
                        ours.add(parts[1])
                else:
                    theirs.add(name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0:
                if mod == "p2pfs":
                    ours.update(a.name for a in node.names)
                elif mod.startswith("p2pfs."):
                    ours.add(mod.split(".")[1])
                else:
                    theirs.add(mod.split(".")[0])
            else:
                up = node.level - 1  # levels above the file's package
                if up > depth_in_pkg:
                    continue
                if up == depth_in_pkg:  # relative to the p2pfs package itself
                    if mod:
                        ours.add(mod.split(".")[0])
                    else:
                        ours.update(a.name for a in node.names)
                else:  # inside a subpackage: same top-level module
                    ours.add(top)
    ours.discard("__init__")
    return ours, theirs


def test_modules_found():
    names = {top for top, _ in _modules()}
    assert {"errors", "types", "crypto", "store", "drive", "cli", "node"} <= names


def _problems(pkg: Path = PKG) -> list[str]:
    problems = []
    for top, path in _modules(pkg):
        ours, theirs = _imports(path, top, pkg)
        allowed = ALLOWED.get(top, None if top in ("node", "cli") else set())
        if top not in ALLOWED:
            problems.append(f"{path.name}: module {top!r} has no layer in HACKING.md")
            continue
        if allowed is not None:
            bad = ours - allowed - {top}
            if bad:
                problems.append(f"{path.relative_to(pkg)} imports {sorted(bad)}")
        for lib, owners in FORBIDDEN_EVERYWHERE_BUT.items():
            if lib in theirs and top not in owners:
                problems.append(f"{path.relative_to(pkg)} imports {lib}")
        if top in NO_TRIO and "trio" in theirs:
            problems.append(f"{path.relative_to(pkg)} imports trio")
        if top in PURE:
            for lib in theirs & {"socket", "lmdb", "pyfuse3", "trio", "time", "asyncio"}:
                problems.append(f"{path.relative_to(pkg)} (pure core) imports {lib}")
        if top == "fs" and "net" in ours:
            problems.append(f"{path.relative_to(pkg)} imports net")
        rel = path.relative_to(pkg)
        drivers = SANS_IO_DIRS.get(rel.parts[:-1])
        if drivers is not None and rel.name not in drivers:
            for lib in theirs & {"socket", "trio", "time", "asyncio"}:
                problems.append(f"{rel} (sans-IO) imports {lib}")
    return problems


def test_layering():
    problems = _problems()
    assert not problems, "\n".join(problems)


def test_checker_catches_violations(tmp_path):
    pkg = tmp_path / "p2pfs"
    (pkg / "net").mkdir(parents=True)
    (pkg / "tree.py").write_text("from .store import Store\nimport trio\n")
    (pkg / "index.py").write_text("from p2pfs import drive\n")
    (pkg / "fs.py").write_text("from .net.session import Peer\n")
    (pkg / "store.py").write_text("import lmdb\nfrom . import tree\n")
    (pkg / "drive.py").write_text("import lmdb\n")
    (pkg / "net" / "x.py").write_text("from ..drive import Drive\nfrom . import y\n")
    (pkg / "net" / "y.py").write_text("import p2pfs.fs\n")
    (pkg / "net" / "discovery" / "dht").mkdir(parents=True)
    (pkg / "net" / "discovery" / "dht" / "routing.py").write_text("import time\n")
    (pkg / "net" / "discovery" / "dht" / "node.py").write_text("import trio\nimport time\n")
    got = "\n".join(_problems(pkg))
    for expected in ["tree.py imports ['store']", "tree.py (pure core) imports trio",
                     "index.py imports ['drive']", "fs.py imports ['net']",
                     "drive.py imports lmdb", "net/y.py imports ['fs']",
                     "net/discovery/dht/routing.py (sans-IO) imports time"]:
        assert expected in got, (expected, got)
    assert "store.py" not in got and "net/x.py" not in got and "dht/node.py" not in got
