"""The CLI's HTTP client for the daemon: its Unix socket, or a URL with a token.

Standard library only (http.client), so that a client verb starts in milliseconds:
`watch -n1 gpuwarden status` must cost less than the daemon it watches. One
keep-alive connection serves every request of a command.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import socket as socketlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from .errors import DaemonUnreachable

__all__ = ["ControlClient", "Response"]

GROUP_HINT = ("an admin adds you with: sudo scripts/install.sh --operator $USER, or "
              "sudo usermod -aG gpuwarden $USER; then log in again")


@dataclass(frozen=True, slots=True)
class Response:
    status_code: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON (ValueError when it is not)."""
        return jsonlib.loads(self.body)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("gpuwarden", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """Talks HTTP to the daemon over its Unix socket, or over TCP with a token."""

    def __init__(self, *, socket: Path | None = None, url: str | None = None,
                 token: str | None = None, timeout: float = 30.0) -> None:
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._prefix = ""
        if url:
            self.where = url
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise DaemonUnreachable(f"--url {url!r}: expected http://HOST:PORT or "
                                        "https://HOST:PORT")
            self._prefix = parts.path.rstrip("/")
            if parts.scheme == "https":
                self._conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    parts.hostname, parts.port, timeout=timeout)
            else:
                self._conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                                        timeout=timeout)
        else:
            assert socket is not None
            self.where = str(socket)
            self._conn = _UnixConnection(socket, timeout)

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, str] | None = None) -> Response:
        target = self._prefix + path + (f"?{urlencode(params)}" if params else "")
        headers = dict(self._headers)
        body = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            try:
                self._conn.request(method, target, body=body, headers=headers)
                resp = self._conn.getresponse()
                return Response(resp.status, resp.read())
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                # A keep-alive connection the daemon closed (idle_timeout): once more,
                # on a new one. A second failure is the daemon's.
                self._conn.close()
                if attempt == 2:
                    raise self._unreachable(exc) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                raise self._unreachable(exc) from exc
        raise AssertionError("unreachable")

    def _unreachable(self, exc: BaseException) -> DaemonUnreachable:
        if isinstance(exc, PermissionError):
            return DaemonUnreachable(
                f"permission denied on {self.where}: the control socket is for root "
                f"and the gpuwarden group ({GROUP_HINT})")
        reason = "no answer in time" if isinstance(exc, TimeoutError) else (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc))
        return DaemonUnreachable(f"no gpuwarden daemon answers at {self.where} ({reason}); "
                                 "is it running? (systemctl status gpuwarden)")

    def close(self) -> None:
        self._conn.close()
