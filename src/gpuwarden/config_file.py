"""Finding and reading the config file, without validating it: what the CLI's client
verbs need (the socket path), and the first step of `load_config`.

Kept free of pydantic, and of pathlib (paths here are strings), so that `gpuwarden
status` costs a few milliseconds.
"""

from __future__ import annotations

import os
import re

from .errors import ConfigError

TYPE_CHECKING = False  # not typing's, which a client verb does not import
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_SOCKET",
    "config_path",
    "duration_seconds",
    "parse_duration",
    "read_toml",
    "socket_path",
]

DEFAULT_CONFIG_PATH = "/etc/gpuwarden/config.toml"
DEFAULT_SOCKET = "/run/gpuwarden/gpuwarden.sock"


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


def config_path(explicit: str | os.PathLike[str] | None = None) -> str:
    """--config PATH, else $GPUWARDEN_CONFIG, else /etc/gpuwarden/config.toml."""
    if explicit:
        return os.fspath(explicit)
    return os.environ.get("GPUWARDEN_CONFIG") or DEFAULT_CONFIG_PATH


def read_toml(file: str | os.PathLike[str], problems: list[str] | None = None
              ) -> dict[str, Any]:
    """The file's TOML document; ConfigError when it is unreadable or not TOML.

    Bytes that are not UTF-8 (a Latin-1 comment, say) are a problem naming their
    line: raised at once, or, given `problems`, added there and read as U+FFFD so
    that the rest of the file is still read."""
    try:
        with open(file, "rb") as fh:
            raw = fh.read()
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
    import tomllib  # here: a client verb seldom needs it (see socket_path)

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(file)) from exc


def socket_path(path: str | os.PathLike[str] | None = None) -> str:
    """Where the daemon's control socket is, from `[daemon] socket` alone.

    A client needs only this: the rest of the config (secrets the caller may not be
    able to read, sections a newer daemon added) is the daemon's business. A file
    whose `[daemon] socket` is plainly written is read line by line; anything less
    plain goes through the TOML parser.

    Raises:
        ConfigError: the file is unreadable or not TOML, or the key is not a string.
    """
    file = config_path(path)
    env = os.environ.get("GPUWARDEN_DAEMON__SOCKET")
    if env:
        return env
    try:
        with open(file, "rb") as fh:
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError([f"cannot read {file}: {exc.strerror or exc}"], str(file)) from exc
    plain = _plain_socket(text)
    if plain is not _UNSURE:
        return DEFAULT_SOCKET if plain is None else str(plain)
    data = read_toml(file, problems=[])  # an odd byte elsewhere is not the client's concern
    daemon = data.get("daemon", {})
    value = daemon.get("socket") if isinstance(daemon, dict) else None
    if value is None:
        return DEFAULT_SOCKET
    if not isinstance(value, str) or not value:
        raise ConfigError(["daemon.socket: must be a path"], str(file))
    return value


_UNSURE = object()
_HEADER = re.compile(r"\[\s*([A-Za-z0-9_-]+(?:\s*\.\s*[A-Za-z0-9_-]+)*)\s*\]\s*(?:#.*)?")
_SOCKET = re.compile(r"socket\s*=\s*(?:\"([^\"\\]+)\"|'([^']+)')\s*(?:#.*)?")


def _plain_socket(text: str) -> object:
    """`[daemon] socket` from a file that writes it plainly (a `[daemon]` table and
    `socket = "..."` in it), None when such a file has none, or _UNSURE for anything
    it cannot be sure of: multi-line strings, array tables, quoted or dotted keys
    that could name it, escapes."""
    if '"""' in text or "'''" in text:
        return _UNSURE
    table, found = "", None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            header = _HEADER.fullmatch(line)
            if header is None:
                if "daemon" in line:
                    return _UNSURE
                table = "<other>"
            else:
                table = re.sub(r"\s+", "", header.group(1))
            continue
        key = line.split("=", 1)[0].strip()
        if table == "" and (key.startswith("daemon") or key.startswith(("\"", "'"))):
            return _UNSURE  # daemon.socket = ..., daemon = { ... }, or a quoted key
        if table != "daemon":
            continue
        if key.startswith(("\"", "'")):
            return _UNSURE
        if key != "socket" and key.split(".")[0].strip() == "socket":
            return _UNSURE  # socket.x = ...: not a plain string
        if key == "socket":
            match = _SOCKET.fullmatch(line)
            if match is None or found is not None:
                return _UNSURE  # not a plain string, or written twice (not TOML)
            found = match.group(1) or match.group(2)
    return found
