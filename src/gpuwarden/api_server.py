"""Serving HTTP under a hostile network: a connection budget per door (the API's TCP
port, its control socket, each demand proxy), idle and header timeouts, an open-files
limit sized for all of them, and error storms logged once per episode instead of a
traceback per connection.

Each door has its own runner and budget, so a flood on one cannot take the
descriptors or the slots another needs: the control socket keeps the CLI's, and a
proxy's flood leaves the API's alone.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web

__all__ = ["ConnectionBudget", "Door", "ErrorStorms", "FilePlan", "fit_open_files",
           "serve", "track_requests"]

log = logging.getLogger(__name__)

# Descriptors the daemon needs besides API connections: Docker and webhook clients,
# NVML, the ledger, logs, journald, and a burst of accepted connections not yet
# refused (asyncio accepts up to _BACKLOG at once). Generous on purpose.
OWN_FILES = 512
# A proxied connection holds its client's descriptor and one to the upstream.
PROXY_FILES_PER_CONNECTION = 2
_BACKLOG = 128
_STORM_QUIET_S = 60.0

_FULL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")


@dataclass
class _Connection:
    """An admitted connection's requests, as `track_requests` sees them."""

    idle_since: float  # loop time it opened, or its last request ended
    active: int = 0  # requests being handled (a stream, a wait, a websocket)
    # Bytes of a next request arrived since (a head under way): a client that stops
    # there is slow, or hostile; one that sends nothing is an idle keep-alive.
    partial: bool = False


@dataclass
class ConnectionBudget:
    """Connections open on one door, at most `limit`; the next is answered 503.

    With `idle_timeout` (and the door's handler wrapped in `track_requests`), a connection
    with no request being handled for that long is closed: one that has not delivered
    a whole request head since it opened or since its last answer. A request being
    handled is never closed by it, however long it streams or waits. Only one that
    had begun a request head is counted as cut (`on_cut`, "head"); a keep-alive or a
    browser's preconnect that simply sent nothing more is closed quietly.
    """

    door: str
    limit: int
    open: int = 0
    refused: int = 0
    cut: int = 0  # connections closed with a request head half sent (idle_timeout)
    lingering: int = 0  # refused connections still draining (see _BudgetedProtocol)
    on_refused: Callable[[str], None] = field(default=lambda door: None)
    idle_timeout: float | None = None
    on_cut: Callable[[str, str], None] = field(default=lambda door, why: None)
    connections: dict[Any, _Connection] = field(default_factory=dict)

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
        self._idle_check: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        budget = self._budget
        if budget.open >= budget.limit:
            budget.refused += 1
            budget.on_refused(budget.door)
            # A socket's transport (uvloop's is not a subclass of asyncio's).
            transport = cast(asyncio.Transport, transport)
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
        self._transport = transport
        if budget.idle_timeout is not None:
            loop = asyncio.get_running_loop()
            budget.connections[self._inner] = _Connection(loop.time())
            self._idle_check = loop.call_later(budget.idle_timeout, self._check_idle)
        self._inner.connection_made(transport)

    def _check_idle(self) -> None:
        budget, timeout = self._budget, self._budget.idle_timeout
        state = budget.connections.get(self._inner)
        if state is None or timeout is None or self._transport is None:
            return
        loop = asyncio.get_running_loop()
        left = state.idle_since + timeout - loop.time()
        if state.active or left > 0:
            self._idle_check = loop.call_later(timeout if state.active else left,
                                               self._check_idle)
            return
        if state.partial:
            budget.cut += 1
            budget.on_cut(budget.door, "head")
        self._idle_check = None
        self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            self._budget.lingering -= 1
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        self._budget.connections.pop(self._inner, None)
        self._transport = None
        if self._admitted:
            self._admitted = False
            self._budget.open -= 1
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            state = self._budget.connections.get(self._inner)
            if state is not None and not state.active:
                state.partial = True
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

    def __init__(self, runner: web.BaseRunner, budget: ConnectionBudget, name: str,
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


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def track_requests(budget: ConnectionBudget, handler: Handler) -> Handler:
    """`handler`, telling `budget` when each connection is handling a request, so an
    idle one can be cut (ConnectionBudget.idle_timeout) and a busy one never is."""

    async def tracked(request: web.BaseRequest) -> web.StreamResponse:
        state = budget.connections.get(request.protocol)
        if state is None:
            return await handler(request)
        state.active += 1
        state.partial = False
        try:
            return await handler(request)
        finally:
            state.active -= 1
            state.idle_since = asyncio.get_running_loop().time()

    return tracked


@dataclass
class Door:
    """One door of the API: its runner and its budget."""

    runner: web.BaseRunner
    budget: ConnectionBudget


async def serve(app: web.Application | Handler, budget: ConnectionBudget, *,
                idle_timeout: float, unix_path: str | None = None, host: str | None = None,
                port: int | None = None, **server_options: Any) -> Door:
    """Start app on a Unix socket or a TCP address, within budget. `app` may be one
    handler for every request (a proxy's: no routes, no middlewares to run through).

    idle_timeout is aiohttp's keep-alive timeout, armed when a connection opens and
    after each response: a connection that has not delivered a whole request head by
    then is closed, whether it sent nothing or is trickling headers. (A budget with
    its own idle_timeout cuts first, and counts what it cuts.)
    """
    options = {"access_log": None, "keepalive_timeout": idle_timeout,
               "logger": logging.getLogger("gpuwarden.http"), **server_options}
    runner = web.AppRunner(app, **options) if isinstance(app, web.Application) \
        else web.ServerRunner(web.Server(app, **options))
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


@dataclass(frozen=True)
class FilePlan:
    """The budgets that fit the open-files limit: the API's TCP door, each proxy's."""

    tcp: int
    proxies: dict[str, int]
    needed: int  # descriptors the configured budgets need in all


def files_needed(tcp_connections: int, socket_connections: int,
                 proxies: dict[str, int] | None = None) -> int:
    """Descriptors the daemon may hold with every budget full."""
    return (tcp_connections + socket_connections + OWN_FILES
            + PROXY_FILES_PER_CONNECTION * sum((proxies or {}).values()))


def fit_open_files(tcp_connections: int, socket_connections: int,
                   proxies: dict[str, int] | None = None) -> FilePlan:
    """Raise the soft open-files limit to what the budgets need (up to the hard limit)
    and return the budgets that fit. A lower hard limit shrinks the proxies' budgets
    first, then the API's TCP budget, never the control socket's or the daemon's own
    files: the CLI always gets in, and a flood on a proxy cannot take the API's."""
    proxies = dict(proxies or {})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = files_needed(tcp_connections, socket_connections, proxies)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit to %d: %s", target, exc)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return FilePlan(tcp_connections, proxies, needed)
    left = soft - socket_connections - OWN_FILES
    tcp = min(tcp_connections, max(1, left - PROXY_FILES_PER_CONNECTION * len(proxies)))
    left -= tcp
    total = sum(proxies.values())
    fitted = {name: max(1, (left // PROXY_FILES_PER_CONNECTION) * limit // total)
              for name, limit in proxies.items()} if total else {}
    log.warning("open-files limit %d is too low for the connection budgets (they need %d "
                "descriptors with the control socket's %d and %d of the daemon's own): "
                "at most %d API TCP connections (of %d) and %s on the proxies; raise "
                "LimitNOFILE= in the unit", soft, needed, socket_connections, OWN_FILES,
                tcp, tcp_connections,
                ", ".join(f"{n} {fitted[n]} (of {proxies[n]})" for n in proxies) or "none")
    return FilePlan(tcp, fitted, needed)


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
