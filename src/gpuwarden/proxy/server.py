"""One reverse proxy per workload, at the address its clients already use.

Everything is forwarded as it comes: Ollama's native API and its OpenAI-compatible
`/v1/*`, ComfyUI's HTTP API and its `/ws` websocket. Bodies stream both ways chunk
by chunk (NDJSON, server-sent events, uploads, downloads), compressed ones untouched.
Demand (see `demand.py`) first gets a ticket from its GPU's scheduler, which may make
it wait for a switch; the rest never waits and never switches anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import web

from ..api_server import ConnectionBudget, Door, serve, track_requests
from ..config import Config, ProxyConfig, RouterConfig, parse_listen
from ..events import EventBus, Severity
from .browser import BrowserPolicy
from .cache import ReadCache, cache_key
from .demand import Kind, classify, local_answer, reads_body
from .scheduler import ROUTER, DemandScheduler, Rejection
from .upstream import UpstreamClient, UpstreamError

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..service import Service

__all__ = ["WorkloadProxy"]

log = logging.getLogger(__name__)

# Headers of one hop (RFC 9110, 7.6.1), never forwarded.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate",
                         "proxy-authorization", "te", "trailer", "transfer-encoding",
                         "upgrade", "proxy-connection"})
# Of an upstream's answer: its length is set again where it is known.
_NOT_RELAYED = _HOP_BY_HOP | {"content-length"}
# Of a client's request: set by the proxy (or its client) for the upstream. An Expect
# was answered here (`continue_if_expected`).
_SET_HERE = frozenset({"host", "content-length", "expect", "origin", "x-forwarded-for",
                       "x-forwarded-host", "x-forwarded-proto"})
# A body read to classify a request (Ollama's JSON, images included) is at most this.
_CLASSIFY_BODY_LIMIT = 64 << 20
# A body up to this size, of announced length, is read at once (aiohttp's own limit on
# a request read whole is 1 MiB).
_ONE_READ = 1 << 20
CACHE_HEADER = "X-Gpuwarden-Cache"
# An overload episode (connections refused at the budget, or cut as too slow) ends once
# none has been for this long; it is announced once at its start and once at its end.
_EPISODE_QUIET_S = 60.0
# How often a held page socket looks whether its upstream runs again.
_HELD_POLL_S = 0.25
# How long a prompt waits for its page's socket to be bridged before it is forwarded.
_BRIDGE_WAIT_S = 10.0


@dataclass
class _Answer:
    """What a demand request's forward has sent so far, for ending it early."""

    response: web.StreamResponse | None = None  # prepared: its head went out
    content_type: str = ""
    sized: bool = False  # a Content-Length was announced


class _RelayedResponse(web.StreamResponse):
    """An upstream's answer relayed: its head waits for the first piece of its body
    when that is already here (see `_forward`), as aiohttp's own `web.Response` does.
    (Were aiohttp to drop the switch, the head would go at once: slower, not wrong.)"""

    _send_headers_immediately = False


class BodyStalled(Exception):
    """A request body paused longer than body_timeout."""


async def streamed_body(request: web.BaseRequest, timeout: float) -> AsyncIterator[bytes]:
    """A request's body as it comes, each piece within `timeout` of the last
    (BodyStalled)."""
    while True:
        try:
            async with asyncio.timeout(timeout):
                part = await request.content.readany()
        except TimeoutError:
            raise BodyStalled() from None
        if not part:
            return
        yield part


async def read_body(request: web.BaseRequest, timeout: float,
                    limit: int = _CLASSIFY_BODY_LIMIT) -> bytes:
    """A request's whole body, each piece within `timeout` of the last (BodyStalled);
    over `limit`, 413. A small one of announced length is read at once (the usual
    case), within `timeout` in all."""
    length = request.content_length
    if length is not None and length <= min(limit, _ONE_READ):
        if request.content.is_eof():  # all here with the head (the usual case)
            return await request.read()
        try:
            async with asyncio.timeout(timeout):
                return await request.read()
        except TimeoutError:
            raise BodyStalled() from None
    parts: list[bytes] = []
    size = 0
    async for part in streamed_body(request, timeout):
        size += len(part)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        parts.append(part)
    return b"".join(parts)


async def continue_if_expected(request: web.BaseRequest) -> web.Response | None:
    """`Expect: 100-continue` answered as aiohttp's routing answers it (its low-level
    server does not): a client that asks (curl, for any body over 1 MiB) sends its body
    at once instead of after waiting a second. An expectation other than that: 417."""
    expect = request.headers.get("Expect")
    if expect is None:
        return None
    if expect.lower() != "100-continue" or request.version < (1, 1):
        return web.Response(status=417, text=f"unknown Expect: {expect}\n")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer's own size is counted from here
    return None


class Overload:
    """Connections a proxy refused (budget full) or cut (too slow), counted, with one
    `proxy.overload` event per episode and `proxy.overload.ended` after it."""

    def __init__(self, proxy: str, bus: EventBus, metrics: Metrics | None) -> None:
        self._proxy, self._bus, self._metrics = proxy, bus, metrics
        self.refused = 0
        self.cut: dict[str, int] = {"head": 0, "body": 0}
        self._episode: dict[str, Any] | None = None

    def record(self, what: str, limit: int, open_now: int) -> None:
        """`what`: "refused", or a cut's reason ("head", "body")."""
        if what == "refused":
            self.refused += 1
        else:
            self.cut[what] = self.cut.get(what, 0) + 1
        if self._metrics is not None:
            if what == "refused":
                self._metrics.proxy_connections_refused.labels(self._proxy).inc()
            else:
                self._metrics.proxy_connections_cut.labels(self._proxy, what).inc()
        now = time.monotonic()
        if self._episode is None:
            self._episode = {"start": now, "last": now, "refused": 0, "cut": 0}
            why = (f"its {limit} connections are all taken, new ones are refused"
                   if what == "refused" else
                   f"connections are cut for sending too slowly ({what})")
            self._bus.publish(
                "proxy.overload", f"proxy {self._proxy}: {why}; the daemon, its API and "
                "the other proxies are unaffected", severity=Severity.WARNING,
                proxy=self._proxy, reason=what, max_connections=limit, open=open_now)
        episode = self._episode
        episode["last"] = now
        episode["refused" if what == "refused" else "cut"] += 1

    def end_quiet(self) -> None:
        episode = self._episode
        if episode is None or time.monotonic() - episode["last"] < _EPISODE_QUIET_S:
            return
        self._episode = None
        lasted = episode["last"] - episode["start"]
        self._bus.publish(
            "proxy.overload.ended", f"proxy {self._proxy}: overload over after "
            f"{lasted:.0f} s: {episode['refused']} connection(s) refused, {episode['cut']} "
            "cut", proxy=self._proxy, refused=episode["refused"], cut=episode["cut"],
            duration_s=round(lasted, 1))


class WorkloadProxy:
    """The proxy of workload `name`: an aiohttp server forwarding to its `url`."""

    def __init__(self, name: str, config: Config, service: Service,
                 scheduler: DemandScheduler, cache: ReadCache, bus: EventBus,
                 metrics: Metrics | None = None, max_connections: int | None = None,
                 *, lane_of: RouterConfig | None = None) -> None:
        """`max_connections`: the budget that fits the open-files limit (default: the
        configured one). `lane_of`: this is not a listening proxy but the model router's
        way to workload `name` (`route`), with the router's settings."""
        proxy: ProxyConfig | RouterConfig = config.proxy[name] if lane_of is None \
            else lane_of
        self.name = name
        # Who asks the scheduler and is counted: the proxy's own workload, or "router".
        self.front = name if lane_of is None else ROUTER
        # The router found a JSON body's model whatever its Content-Type; the engine is
        # told it is JSON (llama-cpp-python's server refuses text/plain with a 500).
        self._json_bodies = lane_of is not None
        # The router's clients speak OpenAI's API: its errors come in OpenAI's shape.
        self._openai_errors = lane_of is not None
        self.listen = proxy.listen or "127.0.0.1:0"  # a lane listens on nothing itself
        self.api = config.proxy_api(name) if lane_of is None else "openai"
        self.mode = config.proxy_mode(name) if lane_of is None else \
            config.modes_of_workload(name)[0]
        url = config.workloads[name].url
        assert url, "checked with the config"
        self.upstream = url.rstrip("/")
        parts = urlsplit(self.upstream)
        self._upstream_host = parts.netloc
        # What the upstream is told a browser's page came from: itself. Both Ollama and
        # ComfyUI accept a request whose Origin is their own address.
        self._upstream_origin = f"{parts.scheme}://{parts.netloc}"
        address = parse_listen(self.listen)
        assert address is not None, "checked with the config"
        self.browser = BrowserPolicy(address[0], address[1],
                                     allowed_hosts=proxy.allowed_hosts,
                                     allowed_origins=proxy.allowed_origins)
        self._max_wait = proxy.max_wait
        self._max_waiting = proxy.max_waiting
        self._idle_timeout = proxy.idle_timeout
        self._body_timeout = proxy.body_timeout
        self.overload = Overload(name, bus, metrics)
        self.budget = ConnectionBudget(
            f"proxy {name}", max_connections or proxy.max_connections,
            idle_timeout=proxy.idle_timeout,
            on_refused=lambda door: self.overload.record("refused", self.budget.limit,
                                                         self.budget.open),
            on_cut=lambda door, why: self.overload.record(why, self.budget.limit,
                                                          self.budget.open))
        self._service = service
        self._scheduler = scheduler
        self._cache = cache
        self._metrics = metrics
        self._upstream: UpstreamClient | None = None  # HTTP requests
        self._session: aiohttp.ClientSession | None = None  # websockets
        self._door: Door | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._held: dict[str, _HeldSocket] = {}  # page sockets by clientId
        self._writes: set[asyncio.Future[None]] = set()
        self._counters: dict[str, Any] = {}
        self.counts = {"forwarded": 0, "cached": 0, "local": 0, "rejected": 0,
                       "unavailable": 0, "error": 0, "forbidden": 0, "cut_by_switch": 0}

    def cache_load(self) -> None:
        """Index the answers kept by an earlier run (blocking)."""
        self._cache.load()

    def open_session(self) -> None:
        # No read timeout: a model load, then a long stream, may take many minutes.
        self._upstream = UpstreamClient(self.upstream, connect_timeout=10)
        self._session = aiohttp.ClientSession(
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            # The client's own headers go as they came: none added for it.
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"))

    async def route(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        """The model router's request for this workload, its body read: demand."""
        return await self._demand(request, body)

    async def start(self) -> None:
        self.open_session()
        address = parse_listen(self.listen)
        assert address is not None, "checked with the config"
        # Within its connection budget, like the API's doors. The budget cuts idle
        # connections itself (and counts them); aiohttp's own keep-alive timer is only a
        # backstop. A client that goes away cancels its handler: a waiting request
        # leaves the queue, a forwarded one stops reading from the upstream.
        self._door = await serve(track_requests(self.budget, self._handle), self.budget,
                                 idle_timeout=2 * self._idle_timeout,
                                 host=address[0], port=address[1],
                                 handler_cancellation=True)

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"gpuwarden stopping")
        if self._door is not None:
            await self._door.runner.cleanup()
        await asyncio.gather(*self._writes, return_exceptions=True)
        if self._upstream is not None:
            await self._upstream.close()
        if self._session is not None:
            await self._session.close()

    def status(self) -> dict[str, Any]:
        waits = self._scheduler.waiting(proxy=self.name)
        view = self._service.proxy_view(self.name)
        return {
            "workload": self.name, "listen": self.listen, "upstream": self.upstream,
            "api": self.api, "mode": self.mode,
            "up": self._up(),
            "in_flight": self._scheduler.in_flight(self.mode),
            "waiting": len(waits), "oldest_wait_s": round(waits[0], 3) if waits else None,
            "blocker": self._scheduler.blocker(self.mode),
            "active_mode": view.mode, **self.counts,
            "connections": {"open": self.budget.open, "max": self.budget.limit,
                            "refused": self.overload.refused, "cut": dict(self.overload.cut)},
        }

    def demand_state(self) -> dict[str, Any]:
        """Its mode's requests in flight, and those of this front waiting, with why."""
        waits = self._scheduler.waiting(mode=self.mode, proxy=self.front)
        return {"mode": self.mode, "in_flight": self._scheduler.in_flight(self.mode),
                "waiting": len(waits), "oldest_wait_s": round(waits[0], 3) if waits else None,
                "blocker": self._scheduler.blocker(self.mode)}

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self._metrics is not None:
            counter = self._counters.get(outcome)
            if counter is None:  # a labelled child, looked up once
                counter = self._counters[outcome] = \
                    self._metrics.proxy_requests.labels(self.front, outcome)
            counter.inc()

    def _up(self) -> bool:
        """The upstream runs in the active mode, with no switch under way."""
        view = self._service.proxy_view(self.name)
        return view.running and view.switching_to is None and \
            self.name in self._service.workload_names(view.mode)

    # -- requests ---------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # Before anything else, websocket upgrades included: what the upstream would
        # refuse a browser, the proxy refuses too (see browser.py).
        verdict = self.browser.check(request.headers.get("Host"),
                                     request.headers.get("Origin"))
        if not verdict.allowed:
            self._count("forbidden")
            return web.Response(status=403, text=f"forbidden: {verdict.reason}\n")
        if (refused := await continue_if_expected(request)) is not None:
            return refused
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        if request.method == "OPTIONS" and not self._up():
            return self.preflight(request)
        body: bytes | None = None
        if reads_body(self.api, request.method, request.path):
            try:
                body = await read_body(request, self._body_timeout)  # small JSON; over 64 MiB: 413
            except BodyStalled:
                return self._stalled()
        kind = classify(self.api, request.method, request.path, body)
        if kind is Kind.DEMAND:
            return await self._demand(request, body)
        if self._up():
            # A HEAD's answer has no body to keep; while stopped, it is a GET's answered.
            key = cache_key(request.method, request.path_qs, body) \
                if kind is Kind.READ and request.method != "HEAD" else None
            return await self._forward(request, body, key)
        if kind is Kind.READ:
            method = "GET" if request.method == "HEAD" else request.method
            cached = await self._cache.get(cache_key(method, request.path_qs, body))
            if cached is not None:
                self._count("cached")
                headers = {**cached.headers, CACHE_HEADER: "stale",
                           "Age": str(max(0, int(time.time() - cached.stored_at))),
                           "X-Gpuwarden-Cached-At": formatdate(cached.stored_at, usegmt=True)}
                return web.Response(status=cached.status, body=cached.body, headers=headers)
        if kind is Kind.LOCAL:
            self._count("local")
            return web.json_response(local_answer(self.api, request.path, body),
                                     headers={CACHE_HEADER: "local"})
        self._count("unavailable")
        return self._unavailable(request, unseen=kind is Kind.READ)

    @staticmethod
    def preflight(request: web.BaseRequest) -> web.Response:
        """A browser's CORS preflight while the upstream is down, answered as Ollama's
        and ComfyUI's servers answer it (204), for a page whose Origin passed the
        checks: its request that follows is what asks for the GPU."""
        headers = {"Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, HEAD, "
                   "OPTIONS", "Access-Control-Max-Age": "43200"}
        if origin := request.headers.get("Origin"):
            headers["Access-Control-Allow-Origin"] = origin
            headers["Vary"] = "Origin"
        if wanted := request.headers.get("Access-Control-Request-Headers"):
            headers["Access-Control-Allow-Headers"] = wanted
        return web.Response(status=204, headers=headers)

    def _stalled(self) -> web.Response:
        self.overload.record("body", self.budget.limit, self.budget.open)
        return web.Response(status=408, text=f"request body paused longer than "
                            f"{self._body_timeout:g} s (body_timeout)\n",
                            headers={"Connection": "close"})

    async def _demand(self, request: web.BaseRequest, body: bytes | None) -> web.StreamResponse:
        client = request.remote or "unknown"
        try:
            ticket = await self._scheduler.admit(
                self.mode, proxy=self.front, workload=self.name, client=client,
                request=f"{request.method} {request.path}", max_wait=self._max_wait,
                max_waiting=self._max_waiting)
        except Rejection as rejection:
            self._count("rejected")
            return self._json_error(503, rejection.to_dict(),
                                    {"Retry-After": str(rejection.retry_after)})
        if self.api == "comfyui" and body:
            # Its progress goes only to the page socket it names: bridge that first.
            with contextlib.suppress(ValueError, AttributeError):
                client_id = json.loads(body).get("client_id")
                if isinstance(client_id, str):
                    await self.bridged(client_id, _BRIDGE_WAIT_S)
        answer = _Answer()
        # A forced switch (Ticket.abort) cancels the forward; the handler takes that
        # cancellation back and closes the answer properly. One it did not make (the
        # client went away) stands.
        handler = asyncio.current_task()
        assert handler is not None
        ticket.on_abort = handler.cancel
        try:
            return await self._forward(request, body, None, answer)
        except asyncio.CancelledError:
            if ticket.aborted is None or handler.uncancel() > 0:
                raise
            return await self._end_cut(request, answer, ticket.aborted)
        finally:
            ticket.done()

    async def _end_cut(self, request: web.BaseRequest, answer: _Answer,
                       reason: str) -> web.StreamResponse:
        """A forced switch ended this answer: say so in the answer's own format (an
        NDJSON line as Ollama writes its errors, an OpenAI server-sent error event), or
        answer 503 when nothing was sent yet."""
        self._count("cut_by_switch")
        response = answer.response
        if response is None:
            return self._json_error(503, {"error": reason, "workload": self.name,
                                          "cause": "forced_switch"})
        if answer.sized:
            response.force_close()  # a body of announced length cannot say more
            return response
        kind = answer.content_type
        notice = b""
        if "ndjson" in kind or "application/json" in kind:
            notice = json.dumps({"error": reason}).encode() + b"\n"
        elif "text/event-stream" in kind:
            error = {"error": {"message": reason, "type": "gpuwarden_switch",
                               "param": None, "code": None}}
            notice = b"data: " + json.dumps(error).encode() + b"\n\n"
        with contextlib.suppress(ConnectionError):
            if notice:
                await response.write(notice)
            await response.write_eof()
        return response

    async def _forward(self, request: web.BaseRequest, body: bytes | None, key: str | None,
                       answer: _Answer | None = None) -> web.StreamResponse:
        assert self._upstream is not None
        headers = self._upstream_headers(request)
        data: bytes | AsyncIterator[bytes] | None = body
        if body is None and request.body_exists:
            if request.content.is_eof():  # all here with the head (a small JSON body)
                data = request.content.read_nowait()
            else:
                data = streamed_body(request, self._body_timeout)  # not read into memory
        try:
            # The path and query exactly as the client sent them (encoded already).
            upstream = await self._upstream.request(
                request.method, request.raw_path, headers, data,
                length=request.content_length)
        except BodyStalled:
            return self._stalled()
        except OSError as exc:  # UpstreamError, among others
            self._count("error")
            return self._json_error(
                502, {"error": f"{self.name} at {self.upstream} did not answer: {exc}",
                      "workload": self.name, "cause": "upstream_error"})
        try:
            response = _RelayedResponse(status=upstream.status, reason=upstream.reason)
            origin = request.headers.get("Origin")
            for name, value in upstream.headers:
                lower = name.lower()
                if lower in _NOT_RELAYED:
                    continue
                if lower == "access-control-allow-origin" and origin and value != "*":
                    # The upstream allowed its own origin (the one it was sent); the
                    # page's is the one the proxy checked.
                    value = origin
                response.headers.add(name, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            writer = await response.prepare(request)
            assert writer is not None, "a new response"
            if answer is not None:
                answer.response, answer.content_type = response, upstream.content_type
                answer.sized = response.content_length is not None
            keep = key is not None and upstream.status == 200
            kept: list[bytes] = []
            size = 0
            # What came with the upstream's head goes out with the head, and the last
            # piece with the end: one write each, where a small answer needs one in all.
            chunk = upstream.read_nowait()
            if not chunk and not upstream.at_eof():
                writer.send_headers()  # nothing more yet (a prompt being read): the head now
            while True:
                if keep:
                    size += len(chunk)
                    if size > self._cache.entry_limit:
                        keep, kept = False, []
                    else:
                        kept.append(chunk)
                if upstream.at_eof():
                    await response.write_eof(chunk)
                    break
                if chunk:
                    await response.write(chunk)  # as it comes: no buffering
                chunk = await upstream.readany()
        except UpstreamError as exc:
            # The upstream's answer ended early (it crashed, was killed): the client's
            # is cut too, its connection closed unfinished rather than ended as whole.
            self._count("error")
            log.warning("%s: %s ended its answer to %s %s early: %s",
                        "router" if self._openai_errors else f"proxy {self.name}",
                        self.upstream, request.method, request.path, exc)
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            upstream.release()
        self._count("forwarded")
        if keep and key is not None:
            kept_headers, kept_body = dict(upstream.headers), b"".join(kept)
            if self._cache.unchanged(key, upstream.status, kept_headers, kept_body):
                return response  # a list polled again, say: kept already
            # Kept apart from the handler: a client that hangs up once it has its answer
            # cancels the handler, not the keeping.
            write = asyncio.ensure_future(self._cache.put(key, upstream.status,
                                                          kept_headers, kept_body))
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)
        return response

    def _json_error(self, status: int, doc: dict[str, Any],
                    headers: dict[str, str] | None = None) -> web.Response:
        """An error answer: gpuwarden's own document, or, to the router's clients,
        OpenAI's shape ({"error": {"message", "type", "param", "code"}}) with the same
        fields beside it."""
        if self._openai_errors:
            kind = "service_unavailable" if status == 503 else "upstream_error"
            doc = {**{k: v for k, v in doc.items() if k != "error"},
                   "error": {"message": doc.get("error"), "type": kind, "param": None,
                             "code": doc.get("cause")}}
        return web.json_response(doc, status=status, headers=headers)

    def _upstream_headers(self, request: web.BaseRequest) -> list[tuple[str, str]]:
        """The client's headers as they came, repeats kept, less those of this hop (and
        those its Connection names) and those the proxy sets itself."""
        hop = _HOP_BY_HOP | _SET_HERE
        if connection := request.headers.get("Connection"):
            hop = hop | {name.strip().lower() for name in connection.split(",")}
        if self._json_bodies:
            hop = hop | {"content-type"}
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in hop]
        # The upstream's own name and, for a browser's request, its own origin: the
        # proxy has checked the client's pair against its own address (browser.py).
        headers.append(("Host", self._upstream_host))
        if self._json_bodies:
            headers.append(("Content-Type", "application/json"))
        if "Origin" in request.headers:
            headers.append(("Origin", self._upstream_origin))
        forwarded = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        remote = request.remote or ""
        headers += [("X-Forwarded-For", f"{forwarded}, {remote}" if forwarded else remote),
                    ("X-Forwarded-Host", request.host),
                    ("X-Forwarded-Proto", request.scheme)]
        return headers

    def _unavailable(self, request: web.BaseRequest, *, unseen: bool = False) -> web.Response:
        """503 that says which mode is active and how to ask for this one (`unseen`: a
        read with no kept answer yet)."""
        view = self._service.proxy_view(self.name)
        state = (f"switching to {view.switching_to}" if view.switching_to else
                 f"mode {view.mode} is active" if self.name not in
                 self._service.workload_names(view.mode) else f"{self.name} is not running")
        ask = ("send a generate, chat or embedding request" if self.api == "ollama"
               else "queue a prompt")
        kept = (" No answer to this read was kept yet: one is kept the first time it is "
                f"read while {self.name} runs." if unseen else "")
        message = (f"{self.name} is not running: {state}.{kept} To get it, {ask} through "
                   f"this address (it waits up to {self._max_wait:g} s for mode "
                   f"{self.mode}), or run: gpuwarden mode {self.mode}")
        doc = {"error": message, "workload": self.name, "mode": self.mode,
               "active_mode": view.mode, "switching_to": view.switching_to}
        if "text/html" in request.headers.get("Accept", ""):
            page = (f"<!doctype html><title>{html.escape(self.name)}: not running</title>"
                    f"<h1>{html.escape(self.name)} is not running</h1>"
                    f"<p>{html.escape(message)}</p>")
            return web.Response(status=503, text=page, content_type="text/html",
                                headers={"Retry-After": "10"})
        return web.json_response(doc, status=503, headers={"Retry-After": "10"})

    # -- websockets ------------------------------------------------------------

    async def _websocket(self, request: web.BaseRequest) -> web.StreamResponse:
        """A websocket: ComfyUI's `/ws`, held by the proxy while ComfyUI is down and
        bridged to it, under the same clientId, whenever it runs. Not demand: an open
        page never holds the GPU or asks for it; a prompt does (see `_demand`)."""
        if self.api == "comfyui":
            return await self._comfy_socket(request)
        if not self._up():
            self._count("unavailable")
            return self._unavailable(request)
        assert self._session is not None
        protocols = _protocols(request)
        try:
            upstream = await self._session.ws_connect(
                self.upstream + request.raw_path, headers=self._socket_headers(request),
                protocols=protocols, autoping=False, max_msg_size=0)
        except (aiohttp.ClientError, OSError) as exc:
            self._count("error")
            return web.json_response(
                {"error": f"{self.name} at {self.upstream}: websocket refused: {exc!r}"},
                status=502)
        client = web.WebSocketResponse(protocols=protocols, autoping=False, max_msg_size=0)
        await client.prepare(request)
        self._sockets.add(client)
        self._count("forwarded")
        try:
            await _bridge(client, upstream)
        finally:
            self._sockets.discard(client)
            await upstream.close()
            await client.close()
        return client

    def _socket_headers(self, request: web.BaseRequest) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("cookie", "authorization", "user-agent")}
        if "Origin" in request.headers:
            headers["Origin"] = self._upstream_origin
        return headers

    async def _comfy_socket(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._session is not None
        protocols = _protocols(request)
        headers = self._socket_headers(request)
        # ComfyUI names a socket by its clientId, and sends a prompt's progress only to
        # the socket named in the prompt: the upstream socket must carry the same one.
        # A page that gave none gets one here, as ComfyUI would make up its own sid.
        client_id = request.query.get("clientId") or uuid.uuid4().hex
        query = {**request.query, "clientId": client_id}
        target = self.upstream + request.path + "?" + urlencode(query)
        client = web.WebSocketResponse(protocols=protocols, autoping=False, max_msg_size=0)
        await client.prepare(request)
        held = _HeldSocket(client_id)
        self._sockets.add(client)
        self._held[client_id] = held  # a second socket with the same id replaces the first
        self._count("forwarded")
        first_frame: str | None = None  # the page's first frame, kept for the upstream
        said_status = False
        try:
            while not client.closed:
                if self._up():
                    try:
                        upstream = await self._session.ws_connect(
                            target, headers=headers, protocols=protocols, autoping=False,
                            max_msg_size=0)
                    except (aiohttp.ClientError, OSError) as exc:
                        log.debug("proxy %s: websocket to %s not open yet: %r", self.name,
                                  target, exc)
                    else:
                        held.bridged.set()
                        try:
                            if first_frame is not None:
                                await upstream.send_str(first_frame)
                            await _bridge(client, upstream)
                        finally:
                            held.bridged.clear()
                            await upstream.close()
                        said_status = True  # the page has had ComfyUI's own
                        continue  # the upstream went (ComfyUI stopped): hold the page
                if not said_status:
                    # What ComfyUI's first frame says, so the page knows its sid.
                    await client.send_json({"type": "status", "data": {"status": {
                        "exec_info": {"queue_remaining": 0}}, "sid": client_id}})
                    said_status = True
                try:
                    message = await client.receive(timeout=_HELD_POLL_S)
                except TimeoutError:
                    continue
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                    aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
                if message.type == aiohttp.WSMsgType.TEXT and first_frame is None:
                    first_frame = message.data  # e.g. feature_flags, which must come first
        finally:
            if self._held.get(client_id) is held:
                del self._held[client_id]
            self._sockets.discard(client)
            await client.close()
        return client

    async def bridged(self, client_id: str, timeout: float) -> None:
        """Wait (up to `timeout`) until the page's socket named `client_id`, if one is
        held, is bridged to the upstream: a prompt forwarded before that would send its
        progress to no socket."""
        held = self._held.get(client_id)
        if held is None or held.bridged.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await held.bridged.wait()


@dataclass
class _HeldSocket:
    """A page's socket the proxy holds, and whether it is bridged to the upstream."""

    client_id: str
    bridged: asyncio.Event = field(default_factory=asyncio.Event)


def _protocols(request: web.BaseRequest) -> list[str]:
    """The websocket subprotocols a client offers."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in offered.split(",") if p.strip()]


async def _bridge(client: web.WebSocketResponse, upstream: Any) -> None:
    """Frames both ways until either side closes."""
    pumps = [asyncio.ensure_future(_relay(upstream, client, close_sink=False)),
             asyncio.ensure_future(_relay(client, upstream))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _relay(source: Any, sink: Any, *, close_sink: bool = True) -> None:
    """Frames from one websocket to the other, until a close or an error; then the
    other side is closed too, unless `close_sink` is false (a page's socket outlives
    the upstream's)."""
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
        async for message in source:
            if message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == aiohttp.WSMsgType.PING:
                await sink.ping(message.data)
            elif message.type == aiohttp.WSMsgType.PONG:
                await sink.pong(message.data)
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                break
    if close_sink:
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
            await sink.close()
