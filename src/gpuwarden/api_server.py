"""Serving the API on its two doors under a hostile network: a connection budget per
door, idle and header timeouts, an open-files limit sized for them, and error storms
logged once per episode instead of a traceback per connection.

The TCP door and the control socket each have their own runner and budget, so a
flood of TCP connections cannot take the descriptors or the slots the local CLI
needs.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["ConnectionBudget", "Door", "ErrorStorms", "fit_open_files", "serve"]

log = logging.getLogger(__name__)

# Descriptors the daemon needs besides API connections: Docker and webhook clients,
# NVML, the ledger, logs, journald, and a burst of accepted connections not yet
# refused (asyncio accepts up to _BACKLOG at once). Generous on purpose.
OWN_FILES = 512
_BACKLOG = 128
_STORM_QUIET_S = 60.0

_FULL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")


@dataclass
class ConnectionBudget:
    """Connections open on one door, at most `limit`; the next is answered 503."""

    door: str
    limit: int
    open: int = 0
    refused: int = 0
    lingering: int = 0  # refused connections still draining (see _BudgetedProtocol)
    on_refused: Callable[[str], None] = field(default=lambda door: None)

    def full_response(self) -> bytes:
        body = (b'{"error": "too many connections (%d open on this door); retry shortly", '
                b'"detail": null}' % self.limit)
        return _FULL % (len(body), body)


_LINGER_S = 1.0  # how long a refused connection may drain before it is closed
_MAX_LINGERING = 64


class _BudgetedProtocol(asyncio.Protocol):
    """aiohttp's request handler, admitted only while the door has room.

    A refused connection gets its 503 and a FIN, and what the client still sends is
    read and dropped for up to a second: closing a socket with unread data would send
    a reset that destroys the 503 before the client reads it. Past _MAX_LINGERING such
    connections, a refused one is closed at once, so a flood cannot pile them up.
    """

    def __init__(self, inner: Any, budget: ConnectionBudget) -> None:
        self._inner = inner
        self._budget = budget
        self._admitted = False
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        budget = self._budget
        if budget.open >= budget.limit:
            budget.refused += 1
            budget.on_refused(budget.door)
            assert isinstance(transport, asyncio.Transport)
            transport.write(budget.full_response())
            if budget.lingering >= _MAX_LINGERING or not transport.can_write_eof():
                transport.close()
                return
            budget.lingering += 1
            transport.write_eof()
            self._linger = asyncio.get_running_loop().call_later(_LINGER_S, transport.close)
            return
        budget.open += 1
        self._admitted = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            self._budget.lingering -= 1
        if self._admitted:
            self._admitted = False
            self._budget.open -= 1
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        # A refused connection's client is done: returning None closes it.
        return self._inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()


class _BudgetedSite(web.BaseSite):
    """A listening socket whose connections go through a ConnectionBudget."""

    def __init__(self, runner: web.AppRunner, budget: ConnectionBudget, name: str,
                 listen: Callable[[Callable[[], asyncio.Protocol]],
                                  Awaitable[asyncio.AbstractServer]]) -> None:
        super().__init__(runner, backlog=_BACKLOG)
        self._budget = budget
        self._name = name
        self._listen = listen

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await self._listen(lambda: _BudgetedProtocol(server(), self._budget))


@dataclass
class Door:
    """One door of the API: its runner and its budget."""

    runner: web.AppRunner
    budget: ConnectionBudget


async def serve(app: web.Application, budget: ConnectionBudget, *, idle_timeout: float,
                unix_path: str | None = None, host: str | None = None,
                port: int | None = None) -> Door:
    """Start app on a Unix socket or a TCP address, within budget.

    idle_timeout is aiohttp's keep-alive timeout, armed when a connection opens and
    after each response: a connection that has not delivered a whole request head by
    then is closed, whether it sent nothing or is trickling headers.
    """
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=idle_timeout,
                           logger=logging.getLogger("gpuwarden.http"))
    await runner.setup()
    loop = asyncio.get_running_loop()
    if unix_path is not None:
        path = unix_path
        site = _BudgetedSite(runner, budget, f"http://unix:{path}:",
                             lambda factory: loop.create_unix_server(factory, path,
                                                                     backlog=_BACKLOG))
    else:
        assert host is not None and port is not None, "a TCP door needs host and port"
        site = _BudgetedSite(runner, budget, f"http://{host}:{port}",
                             lambda factory: loop.create_server(factory, host, port,
                                                                backlog=_BACKLOG))
    await site.start()
    return Door(runner, budget)


def fit_open_files(tcp_connections: int, socket_connections: int) -> int:
    """Raise the soft open-files limit to what the budgets need (up to the hard
    limit) and return the TCP budget that fits. A lower hard limit shrinks the TCP
    budget, never the control socket's: the CLI always gets in."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = tcp_connections + socket_connections + OWN_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit to %d: %s", target, exc)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return tcp_connections
    fitted = max(1, soft - socket_connections - OWN_FILES)
    log.warning("open-files limit %d is too low for [api] max_connections = %d (needs %d "
                "descriptors with the control socket's %d and %d of the daemon's own): "
                "at most %d TCP connections; raise LimitNOFILE= in the unit",
                soft, tcp_connections, needed, socket_connections, OWN_FILES, fitted)
    return fitted


@dataclass
class _Storm:
    first: float
    last: float
    count: int = 1


class ErrorStorms:
    """Repeated errors logged once per episode with a count: the first occurrence, then
    one summary when it has been quiet for a minute. Never a traceback per connection,
    and never the text of a client's bad request line (it may hold a token)."""

    def __init__(self) -> None:
        self._storms: dict[str, _Storm] = {}

    def record(self, kind: str, detail: str,
               exc: BaseException | None = None) -> None:
        now = time.monotonic()
        storm = self._storms.get(kind)
        if storm is None:
            self._storms[kind] = _Storm(now, now)
            log.warning("%s: %s (repeats are counted and summarised once it is quiet)",
                        kind, detail, exc_info=exc)
            return
        storm.count += 1
        storm.last = now

    def end_quiet(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        for kind in list(self._storms):
            storm = self._storms[kind]
            if everything or now - storm.last >= _STORM_QUIET_S:
                del self._storms[kind]
                if storm.count > 1:
                    log.warning("%s: %d times in %.0f s", kind, storm.count,
                                storm.last - storm.first)

    def loop_exception_handler(self, loop: asyncio.AbstractEventLoop,
                               context: dict[str, Any]) -> None:
        """asyncio's handler: accept() failing for want of descriptors, and the like."""
        exc = context.get("exception")
        message = str(context.get("message", "event loop error"))
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else message
        # A traceback helps with a bug, not with a resource running out.
        trace = exc if isinstance(exc, BaseException) and not isinstance(exc, OSError) \
            else None
        self.record(message, detail, trace)

    def http_filter(self, record: logging.LogRecord) -> bool:
        """A filter for aiohttp's server logger: one line per episode, no request text."""
        exc = record.exc_info[1] if record.exc_info else None
        kind = f"HTTP {type(exc).__name__}" if exc is not None else "HTTP server error"
        self.record(kind, "a client sent something the HTTP server could not handle "
                          "(details withheld: they may carry credentials)")
        return False
