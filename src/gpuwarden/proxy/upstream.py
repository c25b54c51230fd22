"""The proxies' HTTP/1.1 client to their upstreams: kept-alive connections and a C
parser (httptools), nothing else.

A forward is the proxies' hot path, and aiohttp's general client spent a third of the
daemon's time per request building what a proxy does not need (cookies, redirects,
auto headers, URL objects, tracing). This one writes the head the proxy made, relays
the answer's body as it comes, and keeps the connection for the next request once an
answer has been read to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = ["UpstreamClient", "UpstreamError", "UpstreamResponse"]

# A body read this far ahead of its client stops reading from the upstream until the
# client catches up (a large download to a slow client is not held in memory).
_READ_AHEAD = 256 * 1024
# A kept-alive connection idle this long is closed rather than reused: an upstream's
# own idle timeout may close it any moment now (llama.cpp's server: 5 s).
_KEEP_IDLE_S = 4.0
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class UpstreamError(ConnectionError):
    """The upstream did not answer as an HTTP/1.1 server does: refused, closed the
    connection early, or sent what is not HTTP."""


class UpstreamResponse:
    """An upstream's answer: its head, and its body as it comes (`readany`)."""

    def __init__(self, connection: _Connection, status: int, reason: str,
                 headers: list[tuple[str, str]], content_length: int | None,
                 chunked: bool, content_type: str) -> None:
        self._connection: _Connection | None = connection
        self.status = status
        self.reason = reason
        self.headers = headers  # as sent, in order, repeats kept
        self.content_length = content_length  # as announced (a HEAD's too); None: chunked
        self.chunked = chunked
        self.content_type = content_type
        self._parts: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # What the connection feeds.

    def _feed(self, data: bytes) -> None:
        self._parts.append(data)
        self._buffered += len(data)
        if self._buffered > _READ_AHEAD and self._connection is not None:
            self._connection.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._connection = None
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._complete:
            self._error = error
            self._connection = None
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # What the proxy reads.

    def at_eof(self) -> bool:
        """The whole body is here and has been read."""
        return self._complete and not self._parts

    def read_nowait(self) -> bytes:
        """What of the body is here, at once (b"" when nothing is); raises UpstreamError
        once nothing is left of a body cut short."""
        if not self._parts:
            if self._error is not None:
                raise self._error
            return b""
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts.clear()
        self._buffered = 0
        if self._connection is not None:
            self._connection.resume_reading()
        return data

    async def readany(self) -> bytes:
        """The body's next piece, as soon as there is one; b"" at its end."""
        while not self._parts and not self._complete and self._error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.read_nowait()

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with it: a body not read to its end closes its connection (the next
        answer on it would be this one's rest)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        self._parts.clear()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to the upstream: one request at a time."""

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.idle_since = time.monotonic()
        self._paused_reading = False
        self._drained: asyncio.Future[None] | None = None
        self._lost = False  # the connection is closed
        # The exchange under way.
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._head_only = False  # a HEAD request: its answer's head is all of it
        self._sent = False  # the request, body included, is all written
        self._writer: asyncio.Task[None] | None = None  # a body sent as it comes
        self._reason = ""
        self._headers: list[tuple[str, str]] = []
        self._interim = False  # a 1xx answer, which another follows

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._break(UpstreamError(f"the upstream's answer is not HTTP/1.1: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close: half-open connections are not kept

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._client.forget(self)
        response = self._response
        if response is not None and not response._complete and \
                response.content_length is None and not response.chunked:
            # A body without a length ends where the connection does.
            self._response = None
            response._finish()
        self._break(UpstreamError(
            f"the upstream closed the connection before its answer ended ({exc!r})"
            if exc else "the upstream closed the connection before its answer ended"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # The parser's callbacks (httptools)

    def on_status(self, status: bytes) -> None:
        self._reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"),
                              value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue and the like: the answer comes after it
            self._interim = True
            self._reason, self._headers = "", []
            return
        content_length: int | None = None
        chunked = False
        content_type = ""
        for name, value in self._headers:
            lower = name.lower()
            if lower == "content-length":
                content_length = int(value)
            elif lower == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif lower == "content-type":
                content_type = value.split(";", 1)[0].strip().lower()
        if chunked:
            content_length = None
        response = UpstreamResponse(self, status, self._reason, self._headers,
                                    content_length, chunked, content_type)
        self._reason, self._headers = "", []
        self._response = response
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)
        if self._head_only:
            # The parser expects a body the head announced: this connection ends here.
            self._response = None
            response._finish()
            self.close()

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        response, self._response = self._response, None
        if response is None:
            return
        keep = self._parser.should_keep_alive() and self._sent
        response._finish()
        if keep:
            self._idle()
        else:
            self.close()

    # The exchange

    async def exchange(self, head: bytes, body: bytes | AsyncIterator[bytes] | None,
                       chunked: bool, head_only: bool) -> UpstreamResponse:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._head = loop.create_future()
        self._head_only, self._sent = head_only, False
        head_wait = self._head
        if body is None or isinstance(body, bytes):
            self.transport.write(head + body if body else head)
            self._sent = True
            try:
                return await head_wait
            except BaseException:
                self.close()
                raise
        self.transport.write(head)
        writer = self._writer = asyncio.ensure_future(self._write_body(body, chunked))
        writer.add_done_callback(self._body_written)
        try:
            both: list[asyncio.Future[Any]] = [head_wait, writer]
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            if head_wait.done() and head_wait.exception() is None:
                # The answer came, maybe while the body was still being sent (an early
                # refusal, say): the rest is sent while it is read, or dropped with the
                # connection.
                return head_wait.result()
            if writer.done():
                writer.result()  # the body failed (BodyStalled, say): raised here
            return await head_wait
        except BaseException:
            self.close()
            raise

    async def _write_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        assert self.transport is not None
        async for part in body:
            if self._lost:
                return
            if not part:
                continue
            if chunked:
                self.transport.write(b"%x\r\n%b\r\n" % (len(part), part))
            else:
                self.transport.write(part)
            if self._drained is not None and not self._drained.done():
                await self._drained
        if chunked and not self._lost:
            self.transport.write(b"0\r\n\r\n")
        self._sent = True

    def _body_written(self, writer: asyncio.Task[None]) -> None:
        """A body that failed after its answer began ends the exchange (the upstream
        waits for the rest); before, `exchange` raises its error."""
        self._writer = None
        if not writer.cancelled() and writer.exception() is not None:
            self.close()

    def _break(self, error: UpstreamError) -> None:
        """The connection is done for: whoever waits on it hears why."""
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        response, self._response = self._response, None
        if response is not None:
            response._fail(error)
        self.close()

    def _idle(self) -> None:
        self.idle_since = time.monotonic()
        self.resume_reading()  # paused for an answer now read whole
        self._client.keep(self)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()

    @property
    def usable(self) -> bool:
        return not self._lost and self.transport is not None and \
            not self.transport.is_closing() and \
            time.monotonic() - self.idle_since < _KEEP_IDLE_S

    def close(self) -> None:
        self._client.forget(self)
        if self.transport is not None:
            self.transport.close()
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()


class UpstreamClient:
    """Requests to one upstream (`http://host:port[/prefix]`, or https), over
    connections kept alive between them; as many at once as are asked for."""

    def __init__(self, base_url: str, *, connect_timeout: float = 10.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s)://host:port URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = \
            ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []  # LIFO: the warmest connection first
        self._all: set[_Connection] = set()
        self._pruning: asyncio.TimerHandle | None = None

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes | AsyncIterator[bytes] | None = None, *,
                      length: int | None = None) -> UpstreamResponse:
        """Send `method target` (the path and query, encoded as sent) with `headers`
        as they are, in order (Host included; no Content-Length or Transfer-Encoding),
        and `body`: bytes, or pieces as they come, sent with `length` as their
        Content-Length when it is known and chunked when not. The answer's head once
        it is here; raises UpstreamError (no connection in connect_timeout, refused,
        closed early, not HTTP) or what `body` raises."""
        chunked = False
        lines = [f"{method} {self._prefix}{target} HTTP/1.1\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if isinstance(body, bytes):
            if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is not None:
            if length is not None:
                lines.append(f"Content-Length: {length}\r\n")
            else:
                chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        head_only = method == "HEAD"
        while self._idle:
            connection = self._idle.pop()
            if not connection.usable:
                connection.close()
                continue
            try:
                return await connection.exchange(head, body, chunked, head_only)
            except UpstreamError:
                # A kept-alive connection the upstream closed as this was sent: sent
                # again on a new one where that is safe, as aiohttp's client does (an
                # idempotent method, its body whole here); else the client hears why.
                if method not in _IDEMPOTENT or not isinstance(body, (bytes, type(None))):
                    raise
        connection = await self._connect()
        return await connection.exchange(head, body, chunked, head_only)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        where = f"{self._host}:{self._port}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self), self._host, self._port, ssl=self._ssl)
        except TimeoutError:
            raise UpstreamError(f"no connection to {where} within "
                                f"{self._connect_timeout:g} s") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {where}: "
                                f"{exc.strerror or exc}") from exc
        self._all.add(protocol)
        return protocol

    def keep(self, connection: _Connection) -> None:
        if connection in self._all:
            self._idle.append(connection)
            if self._pruning is None:
                self._pruning = asyncio.get_running_loop().call_later(_KEEP_IDLE_S,
                                                                      self._prune)

    def _prune(self) -> None:
        """Close the connections idle too long: a burst's many are not kept open."""
        self._pruning = None
        now = time.monotonic()
        # Kept in the order they fell idle: the oldest first.
        while self._idle and now - self._idle[0].idle_since >= _KEEP_IDLE_S:
            self._idle.pop(0).close()
        if self._idle:
            self._pruning = asyncio.get_running_loop().call_later(
                _KEEP_IDLE_S - (now - self._idle[0].idle_since), self._prune)

    def forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)

    async def close(self) -> None:
        if self._pruning is not None:
            self._pruning.cancel()
            self._pruning = None
        for connection in list(self._all):
            connection.close()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # the transports' close callbacks run

    def __repr__(self) -> str:
        return f"UpstreamClient({self._host}:{self._port}{self._prefix})"
