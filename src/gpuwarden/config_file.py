"""Finding and reading the config file, without validating it: what the CLI's client
verbs need (the socket path), and the first step of `load_config`.

Kept free of pydantic, so that `gpuwarden status` costs a few milliseconds.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_SOCKET",
    "config_path",
    "duration_seconds",
    "parse_duration",
    "read_toml",
    "socket_path",
]

DEFAULT_CONFIG_PATH = Path("/etc/gpuwarden/config.toml")
DEFAULT_SOCKET = Path("/run/gpuwarden/gpuwarden.sock")


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(text: str) -> float:
    """Seconds from "2", "90s", "45m", "1h30m" (ValueError for anything else)."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 45m, 1h30m)")
    return total


def parse_duration(value: object) -> object:
    """For the config model: a string is a duration; anything else is left to the
    field's own type check."""
    return duration_seconds(value) if isinstance(value, str) else value


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """--config PATH, else $GPUWARDEN_CONFIG, else /etc/gpuwarden/config.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("GPUWARDEN_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def read_toml(file: Path, problems: list[str] | None = None) -> dict[str, Any]:
    """The file's TOML document; ConfigError when it is unreadable or not TOML.

    Bytes that are not UTF-8 (a Latin-1 comment, say) are a problem naming their
    line: raised at once, or, given `problems`, added there and read as U+FFFD so
    that the rest of the file is still read."""
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read {file}: {exc.strerror or exc}"], str(file)) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        problem = (f"line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file "
                   "as UTF-8")
        if problems is None:
            raise ConfigError([problem], str(file)) from exc
        problems.append(problem)
        text = raw.decode("utf-8", errors="replace")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(file)) from exc


def socket_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Where the daemon's control socket is, from `[daemon] socket` alone.

    A client needs only this: the rest of the config (secrets the caller may not be
    able to read, sections a newer daemon added) is the daemon's business.

    Raises:
        ConfigError: the file is unreadable or not TOML, or the key is not a string.
    """
    file = config_path(path)
    env = os.environ.get("GPUWARDEN_DAEMON__SOCKET")
    data = read_toml(file, problems=[])  # an odd byte elsewhere is not the client's concern
    daemon = data.get("daemon", {})
    value = env or (daemon.get("socket") if isinstance(daemon, dict) else None)
    if value is None:
        return DEFAULT_SOCKET
    if not isinstance(value, str) or not value:
        raise ConfigError(["daemon.socket: must be a path"], str(file))
    return Path(value)
