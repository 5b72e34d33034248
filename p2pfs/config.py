"""The user's configuration file: defaults for the command-line options.

`$P2PFS_CONFIG` names the file if set (an empty value: no file); otherwise
`$XDG_CONFIG_HOME/p2pfs/config.toml` (default `~/.config/p2pfs/config.toml`).
A missing file is an empty configuration.  TOML, read with the standard
library; every key is checked, and a mistake is one line naming the file,
the key and what was expected (exit 2).  Command-line options win over the
file.  The keys (see man p2pfs(1), FILES):

    peers = ["HOST:PORT", ...]       # static peers, added to --peer
    lan = true                       # LAN discovery (--no-lan)
    dht = true                       # Mainline DHT (--no-dht)
    bootstrap = ["HOST:PORT", ...]   # DHT bootstrap nodes (--bootstrap); [] = none
    listen = "HOST:PORT"             # where mount, seed and share accept peers
    timeout = 30                     # seconds (--timeout)
    cache_size = "10G"               # cap of the cache (--cache-size): bytes, or k/M/G/T
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

ENV = "P2PFS_CONFIG"


@dataclass
class Config:
    peers: list[str] = field(default_factory=list)
    lan: bool = True
    dht: bool = True
    bootstrap: list[str] | None = None   # None: the built-in public routers
    listen: str | None = None
    timeout: float | None = None
    cache_size: int | None = None        # bytes; None: no cap
    path: Path | None = None             # the file read, if any


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, what: str = "--cache-size") -> int:
    """'100M', '2G', '512k', '1.5GiB', '1000000' -> bytes (binary units).  UsageError."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"{what}: {text!r} is not a size (give e.g. 100M, 2G or a number of bytes)")
    size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if size >= 2**63:  # also inf, from a number too long for a float
        raise UsageError(f"{what}: {text!r} is too large")
    return int(size)


def config_path() -> Path | None:
    env = os.environ.get(ENV)
    if env is not None:
        return Path(env) if env else None
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "p2pfs" / "config.toml"


def _addresses(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: expected a list of \"HOST:PORT\" strings")
    return list(value)


def load(path: Path | None = None) -> Config:
    """The configuration from `path` (default `config_path()`).  UsageError if malformed."""
    path = path if path is not None else config_path()
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise UsageError(f"cannot read the configuration file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"configuration file {path} is not valid TOML: {exc}") from None
    cfg = Config(path=path)
    for key, value in data.items():
        where = f"configuration file {path}, key {key!r}"
        if key in ("peers", "bootstrap"):
            setattr(cfg, key, _addresses(value, where))
        elif key in ("lan", "dht"):
            if not isinstance(value, bool):
                raise UsageError(f"{where}: expected true or false")
            setattr(cfg, key, value)
        elif key == "listen":
            if not isinstance(value, str):
                raise UsageError(f"{where}: expected \"HOST:PORT\"")
            cfg.listen = value
        elif key == "cache_size":
            if isinstance(value, bool) or not isinstance(value, (int, str)) or \
                    (isinstance(value, int) and value < 0):
                raise UsageError(f"{where}: expected a size such as \"10G\" or a number of bytes")
            cfg.cache_size = parse_size(str(value), where)
        elif key == "timeout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise UsageError(f"{where}: expected a number of seconds above 0")
            cfg.timeout = float(value)
        else:
            raise UsageError(f"{where}: unknown key (known: peers, lan, dht, bootstrap, "
                             "listen, timeout, cache_size)")
    return cfg
