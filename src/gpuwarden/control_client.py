"""The CLI's HTTP client for the daemon: its Unix socket, or a URL with a token.

A small HTTP/1.1 client over a plain socket, so that a client verb starts in
milliseconds: `watch -n1 gpuwarden status` must cost less than the daemon it
watches, and http.client alone (with the email package it parses headers with)
would double the CLI's start-up. It speaks just what the daemon's server sends:
Content-Length or chunked bodies, keep-alive. One connection serves every request
of a command; TLS (`https://` URLs) is loaded only when asked for.
"""

from __future__ import annotations

import json as jsonlib
import socket as socketlib
import time

from .errors import DaemonUnreachable

TYPE_CHECKING = False  # not typing's: importing typing costs a client verb 4 ms
if TYPE_CHECKING:
    from collections.abc import Iterator
    from os import PathLike
    from typing import Any

__all__ = ["ControlClient", "Response"]

GROUP_HINT = ("an admin adds you with: sudo scripts/install.sh --operator $USER, or "
              "sudo usermod -aG gpuwarden $USER; then log in again")
_MAX_HEADER = 64 * 1024


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _quote(text: str, safe: str = "") -> str:
    """Percent-encoding (RFC 3986) of everything but unreserved characters and `safe`:
    what urllib.parse.quote does, without its import."""
    keep = _UNRESERVED | frozenset(safe.encode())
    return "".join(chr(b) if b in keep else f"%{b:02X}" for b in text.encode("utf-8"))


class Response:
    __slots__ = ("body", "status_code")

    def __init__(self, status_code: int, body: bytes) -> None:
        self.status_code = status_code
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON (ValueError when it is not)."""
        return jsonlib.loads(self.body)


class _ProtocolError(Exception):
    """The other end did not answer as an HTTP/1.1 server does."""


class _StaleConnection(Exception):
    """A kept-alive connection turned out closed by the daemon (its idle timeout)
    before it answered: the request can be sent again on a new one."""


class _Connection:
    """One HTTP/1.1 connection, opened on first use and again after a close."""

    def __init__(self, *, unix: str | PathLike[str] | None = None, host: str = "",
                 port: int = 0,
                 tls: bool = False, timeout: float) -> None:
        self._unix, self._host, self._port, self._tls = unix, host, port, tls
        self._timeout = self.timeout = timeout
        self._sock: socketlib.socket | None = None
        self._buffer = b""

    def endpoint(self) -> dict[str, Any]:
        """Where this connection goes, to open another one there."""
        return {"unix": self._unix, "host": self._host, "port": self._port, "tls": self._tls}

    def _open(self) -> socketlib.socket:
        if self._unix is not None:
            sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            sock.settimeout(self._timeout)
            try:
                sock.connect(str(self._unix))
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socketlib.create_connection((self._host, self._port), self._timeout)
        if self._tls:
            import ssl

            sock = ssl.create_default_context().wrap_socket(sock,
                                                            server_hostname=self._host)
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buffer = None, b""

    def _fill(self) -> None:
        assert self._sock is not None
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the daemon closed the connection")
        self._buffer += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if len(self._buffer) > _MAX_HEADER:
                raise _ProtocolError("header line too long")
            self._fill()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _head(self) -> tuple[int, dict[bytes, bytes]]:
        status_line = self._line().split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise _ProtocolError(f"not an HTTP answer: {b' '.join(status_line)[:80]!r}")
        headers: dict[bytes, bytes] = {}
        while line := self._line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line[1]), headers

    def _chunk(self) -> bytes | None:
        """The next chunk of a chunked body; None at its end. Nothing is taken from the
        buffer until the whole chunk is in it, so a read that times out midway (a
        follower's quiet timeout) can simply be tried again."""
        while True:
            line_end = self._buffer.find(b"\r\n")
            if line_end >= 0:
                size = int(self._buffer[:line_end].split(b";")[0], 16)
                if not size:
                    self._line()
                    while self._line():  # trailers
                        pass
                    return None
                end = line_end + 2 + size + 2
                if len(self._buffer) >= end:
                    data = self._buffer[line_end + 2:end - 2]
                    self._buffer = self._buffer[end:]
                    return data
            elif len(self._buffer) > _MAX_HEADER:
                raise _ProtocolError("chunk size line too long")
            self._fill()

    def exchange(self, head: bytes, body: bytes) -> Response:
        reused = self._sock is not None
        if self._sock is None:
            self._sock = self._open()
        try:
            self._sock.sendall(head + body)
            status, headers = self._head()
        except (ConnectionResetError, BrokenPipeError) as exc:
            if reused:
                raise _StaleConnection() from exc
            raise
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while (part := self._chunk()) is not None:
                parts.append(part)
            data = b"".join(parts)
        elif b"content-length" in headers:
            data = self._exactly(int(headers[b"content-length"]))
        else:  # until the server closes
            while True:
                try:
                    self._fill()
                except ConnectionResetError:
                    break
            data, self._buffer = self._buffer, b""
            self.close()
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return Response(status, data)

    def lines(self, head: bytes, deadline: float | None,
              quiet: float | None = None) -> Iterator[bytes | None]:
        """Send `head` on a new connection and yield the answer's lines as they come,
        until it ends or `deadline` (time.monotonic()) passes; None each time `quiet`
        seconds pass with nothing read. An answer other than 200 is raised as
        _Refused with its body."""
        self.close()
        self._sock = sock = self._open()
        sock.sendall(head)
        status, headers = self._head()
        chunked = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
        if status != 200:
            length = int(headers.get(b"content-length", b"0"))
            raise _Refused(Response(status, b"" if chunked else self._exactly(length)))
        pending = b""
        while True:
            wait = self._timeout if quiet is None else min(self._timeout, quiet)
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            sock.settimeout(max(0.01, wait))
            try:
                if chunked:
                    data = self._chunk()
                else:
                    self._fill()
                    data, self._buffer = self._buffer, b""
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                if quiet is None:
                    raise
                # A chunk cut short stays whole in the buffer (see _chunk); the caller,
                # told of the quiet, asks the daemon itself whether it still answers.
                yield None
                continue
            if data is None:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                yield line.rstrip(b"\r")


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class ControlClient:
    """Talks HTTP to the daemon over its Unix socket, or over TCP with a token."""

    def __init__(self, *, socket: str | PathLike[str] | None = None, url: str | None = None,
                 token: str | None = None, timeout: float = 30.0,
                 headers: dict[str, str] | None = None) -> None:
        self._token = token
        self._headers = headers or {}
        self._prefix = ""
        if url:
            from urllib.parse import urlsplit

            self.where = url
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise DaemonUnreachable(f"--url {url!r}: expected http://HOST:PORT or "
                                        "https://HOST:PORT")
            tls = parts.scheme == "https"
            self._prefix = parts.path.rstrip("/")
            self._host = parts.netloc
            self._conn = _Connection(host=parts.hostname, tls=tls, timeout=timeout,
                                     port=parts.port or (443 if tls else 80))
        else:
            assert socket is not None
            self.where = str(socket)
            self._host = "gpuwarden"
            self._conn = _Connection(unix=socket, timeout=timeout)

    def _head_bytes(self, method: str, path: str, params: dict[str, str] | None,
                    body: bytes, *, json: bool = False,
                    accept: str = "application/json") -> bytes:
        target = _quote(self._prefix + path, "/") + ("?" + "&".join(
            f"{_quote(k)}={_quote(v)}" for k, v in params.items()) if params else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host}", f"Accept: {accept}",
                 f"Content-Length: {len(body)}"]
        if json:
            lines.append("Content-Type: application/json")
        if self._token:
            lines.append(f"Authorization: Bearer {self._token}")
        lines.extend(f"{name}: {value}" for name, value in self._headers.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, str] | None = None) -> Response:
        body = b"" if json is None else jsonlib.dumps(json).encode()
        head = self._head_bytes(method, path, params, body, json=json is not None)
        try:
            try:
                return self._conn.exchange(head, body)
            except _StaleConnection:
                self._conn.close()  # once more, on a new connection
                return self._conn.exchange(head, body)
        except (OSError, _ProtocolError, ValueError) as exc:
            self._conn.close()
            raise self._unreachable(exc) from exc

    def follow(self, *, since: int | None = None, deadline: float | None = None,
               quiet: float | None = None) -> Iterator[dict[str, Any] | None]:
        """Follow the daemon's events as they are published (server-sent events on a
        connection of their own): each event's document, and None once the stream is
        open, at each heartbeat, each time `quiet` seconds pass with nothing on the
        stream, and when `deadline` passed (then it ends).

        Raises:
            DaemonUnreachable: no daemon, or the stream broke.
            RefusedError-like: the answer was not 200 (raised as DaemonUnreachable
                with the daemon's message).
        """
        params = {} if since is None else {"since": str(since)}
        head = self._head_bytes("GET", "/v1/events", params, b"",
                                accept="text/event-stream")
        stream = _Connection(**self._conn.endpoint(), timeout=max(self._conn.timeout, 20.0))
        data: list[str] = []
        try:
            for line in stream.lines(head, deadline, quiet):
                if line is None or line.startswith(b":"):
                    yield None
                elif line.startswith(b"data:"):
                    data.append(line[5:].strip().decode("utf-8"))
                elif not line and data:
                    yield jsonlib.loads("\n".join(data))
                    data = []
            yield None  # the deadline passed, or the daemon ended the stream
        except _Refused as refused:
            try:
                message = refused.response.json().get("error", refused.response.text)
            except ValueError:
                message = refused.response.text
            raise DaemonUnreachable(f"{self.where} refused the event stream "
                                    f"({refused.response.status_code}): {message}") from None
        except (OSError, _ProtocolError, ValueError) as exc:
            raise self._unreachable(exc) from exc
        finally:
            stream.close()

    def _unreachable(self, exc: BaseException) -> DaemonUnreachable:
        if isinstance(exc, PermissionError):
            return DaemonUnreachable(
                f"permission denied on {self.where}: the control socket is for root "
                f"and the gpuwarden group ({GROUP_HINT})", denied=True)
        reason = "no answer in time" if isinstance(exc, TimeoutError) else (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
        return DaemonUnreachable(f"no gpuwarden daemon answers at {self.where} ({reason}); "
                                 "is it running? (systemctl status gpuwarden)")

    def close(self) -> None:
        self._conn.close()
