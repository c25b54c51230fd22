"""The HTTP API: one application, served on the control socket and on TCP.

One API, two doors: the CLI is an HTTP client of the Unix socket, n8n and scripts of
the TCP listener, so there is no second protocol to keep in step. Peers on the socket
are trusted by its file mode (0660) and named by their Unix user (SO_PEERCRED):
`requested_by = cli:<user>`. On TCP, /v1/* needs a named bearer token
(`api:<name>`) or a signed request (`api:webhook`); see api_auth.py.

Every answer is gpuwarden's own JSON: no request input reaches a 500, and no library's
exception text reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .api_auth import ApiAuth, AuthError, AuthFailures
from .config import ApiConfig
from .errors import ConflictError, NotFoundError, RefusedError
from .metrics import Metrics
from .openapi import openapi_document
from .service import Service

__all__ = ["BadRequest", "SwitchRequest", "build_app", "event_stream", "peer_user",
           "read_json"]

log = logging.getLogger(__name__)

_READ_ONLY_PATHS = {"/v1/status", "/v1/mode", "/v1/events", "/v1/openapi.json"}
_MAX_MODE_LENGTH = 64
_MAX_GPU = 63


def _read_only(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and (path in _READ_ONLY_PATHS
                                          or path.startswith("/v1/switches/"))


class BadRequest(Exception):
    """A client error, in gpuwarden's words, with an HTTP status."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class SwitchRequest:
    """Body of POST /v1/mode, checked by hand so every message is gpuwarden's own."""

    mode: str
    gpu: int | None = None
    force: bool = False

    @classmethod
    def from_json(cls, body: object) -> SwitchRequest:
        if not isinstance(body, dict):
            raise _invalid([("(body)", "must be a JSON object")])
        problems: list[tuple[str, str]] = [
            (key, "unknown key (expected mode, gpu, force)")
            for key in body if key not in ("mode", "gpu", "force")]
        mode = body.get("mode")
        if "mode" not in body:
            problems.append(("mode", "required"))
        elif not isinstance(mode, str) or not 1 <= len(mode) <= _MAX_MODE_LENGTH:
            problems.append(("mode", f"must be a string of 1 to {_MAX_MODE_LENGTH} "
                                     "characters"))
        gpu = body.get("gpu")
        if gpu is not None:
            # JSON Schema's integer: 3 and 3.0 alike; never true/false or "3".
            whole = (isinstance(gpu, int) and not isinstance(gpu, bool)) or (
                isinstance(gpu, float) and math.isfinite(gpu) and gpu.is_integer())
            if not whole or not 0 <= gpu <= _MAX_GPU:
                problems.append(("gpu", f"must be an integer from 0 to {_MAX_GPU}, or null"))
        force = body.get("force", False)
        if not isinstance(force, bool):
            problems.append(("force", "must be true or false"))
        if problems:
            raise _invalid(problems)
        assert isinstance(mode, str)
        return cls(mode=mode, gpu=None if gpu is None else int(gpu), force=bool(force))


def _invalid(problems: list[tuple[str, str]]) -> BadRequest:
    field, error = problems[0]
    return BadRequest(422, f"invalid request: {field}: {error}",
                      [{"field": f, "error": e} for f, e in problems])


def peer_user(request: web.Request) -> str | None:
    """The Unix user at the other end of a control-socket connection (SO_PEERCRED)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


SERVICE = web.AppKey("service", Service)
AUTH = web.AppKey("auth", ApiAuth)
FAILURES = web.AppKey("failures", AuthFailures)
METRICS = web.AppKey("metrics", Metrics)
CONFIG = web.AppKey("config", ApiConfig)


def _error(status: int, error: str, detail: Any = None,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status,
                             headers=headers)


def _is_socket(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error, ours or aiohttp's, as JSON {"error", "detail"}."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BadRequest as exc:
        return _error(exc.status, str(exc), exc.detail)
    except NotFoundError as exc:
        return _error(404, str(exc), exc.detail)
    except (ConflictError, RefusedError) as exc:
        return _error(409, str(exc), exc.detail)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "request body too large",
                      {"max_bytes": request.app[CONFIG].max_body_bytes})
    except web.HTTPException as exc:
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _error(exc.status, exc.reason, None, headers)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        # A bug, not the client's input: the traceback goes to the log, not to them.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, "internal error (the daemon's log has the details)")


async def read_body(request: web.Request) -> bytes:
    """The whole body, within [api] body_timeout of the headers (408 after)."""
    try:
        async with asyncio.timeout(request.app[CONFIG].body_timeout):
            return await request.read()
    except TimeoutError:
        raise BadRequest(408, "request body not received within "
                              f"{request.app[CONFIG].body_timeout:g} s") from None


async def read_json(request: web.Request) -> object:
    """The body as JSON: application/json only (415), well formed (400)."""
    if request.content_type != "application/json":
        raise BadRequest(415, "the body must be JSON (Content-Type: application/json)",
                         {"content_type": request.content_type})
    raw = await read_body(request)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise BadRequest(400, "malformed JSON: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(400, f"malformed JSON at line {exc.lineno}, column {exc.colno}",
                         {"line": exc.lineno, "column": exc.colno}) from None
    except (ValueError, RecursionError):
        # Python's own limits: nesting beyond the recursion limit, integers beyond
        # 4300 digits, NaN and Infinity.
        raise BadRequest(400, "malformed JSON: nested too deeply, a number too large, "
                              "or NaN/Infinity") from None


def _no_constant(name: str) -> object:
    raise ValueError(name)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path == "/healthz" or not (path.startswith("/v1/") or path == "/metrics"):
        return await handler(request)
    if _is_socket(request):
        request["requested_by"] = f"cli:{peer_user(request)}"
        return await handler(request)
    auth = request.app[AUTH]
    headers: dict[bytes, bytes] = {}
    for name, value in request.raw_headers:
        name = name.lower()
        if name == b"authorization" and name in headers:
            return _error(400, "more than one Authorization header")
        headers[name] = value
    # What is open needs no credentials, but credentials presented must hold.
    presented = b"authorization" in headers or b"webhook-signature" in headers
    open_here = (path == "/metrics" and not auth.metrics_auth) or (
        auth.open_read and _read_only(request.method, path))
    if not presented and open_here:
        request["requested_by"] = "api:anonymous"
        return await handler(request)
    failures = request.app[FAILURES]
    client = request.remote or "unknown"
    wait = failures.retry_after(client)
    if wait is not None:
        return _error(429, f"too many failed authentications from {client}; retry "
                           f"in {wait} s", {"retry_after_s": wait},
                      {"Retry-After": str(wait)})
    body = await read_body(request) if b"webhook-signature" in headers else None
    try:
        identity = await auth.identify(request.method, request.raw_path, headers, body)
    except AuthError as exc:
        if exc.status == 401:
            failures.failed(client, exc.reason)
            request.app[METRICS].on_auth_failure(exc.reason)
        return _error(exc.status, str(exc),
                      headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
    request["requested_by"] = identity.requested_by
    return await handler(request)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].status())


async def _modes(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].modes())


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app[SERVICE].config))


def _wait_parameter(request: web.Request) -> bool:
    values = request.query.getall("wait", [])
    if not values:
        return True
    if len(values) > 1 or values[0] not in ("true", "false"):
        raise BadRequest(422, "invalid request: wait: must be true or false",
                         [{"field": "wait", "error": "must be true or false"}])
    return values[0] == "true"


async def _switch(request: web.Request) -> web.Response:
    req = SwitchRequest.from_json(await read_json(request))
    wait = _wait_parameter(request)
    result = await request.app[SERVICE].switch_mode(
        req.mode, gpu=req.gpu, requested_by=request["requested_by"], force=req.force,
        wait=wait,
    )
    if result.pending:
        return web.json_response(result.to_dict(), status=202)
    if not result.ok:
        return web.json_response({**result.to_dict(), "detail": result.detail}, status=409)
    return web.json_response(result.to_dict())


async def _switch_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].switch_state(request.match_info["id"]))


async def _unblock(request: web.Request) -> web.Response:
    # No body is needed; a client that always sends JSON may send {}.
    if request.can_read_body and await read_json(request) != {}:
        raise BadRequest(422, "invalid request: (body): this route takes no body, or {}",
                         [{"field": "(body)", "error": "must be empty or {}"}])
    result = await request.app[SERVICE].unblock(request.match_info["name"],
                                                requested_by=request["requested_by"])
    return web.json_response(result)


async def _reload(request: web.Request) -> web.Response:
    """Read the config file again; what could not be applied live is named."""
    if request.can_read_body and await read_json(request) != {}:
        raise BadRequest(422, "invalid request: (body): this route takes no body, or {}",
                         [{"field": "(body)", "error": "must be empty or {}"}])
    reload = request.app[SERVICE].reload
    if reload is None:
        raise BadRequest(409, "this daemon cannot reload", None)
    result = await reload(request["requested_by"])
    return web.json_response(result, status=200 if result["ok"] else 409)


async def _events(request: web.Request) -> web.StreamResponse:
    problems = []
    values = {}
    for name, default, low, high in (("since", "0", 0, None), ("limit", "500", 1, 1000)):
        text = request.query.get(name, default)
        value = int(text) if text.isascii() and text.isdigit() and len(text) < 19 else -1
        if value < low or (high is not None and value > high):
            bounds = f"{low} to {high}" if high is not None else f">= {low}"
            problems.append((name, f"must be a whole number {bounds}"))
        values[name] = value
    if problems:
        raise _invalid(problems)
    since, limit = values["since"], values["limit"]
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await event_stream(request, since if "since" in request.query else None)
    events = request.app[SERVICE].events_since(since, limit)
    return web.json_response({"events": [e.to_dict() for e in events]},
                             dumps=lambda o: json.dumps(o, default=str))


# A comment line this often keeps proxies from closing a quiet stream and lets a
# follower see that the daemon is still there.
_HEARTBEAT_S = 15.0


async def event_stream(request: web.Request, since: int | None, *,
                       named: bool = True) -> web.StreamResponse:
    """Server-sent events: those after `since` (without it, only new ones), then each
    as it is published, until the client goes or the daemon stops. The first line
    names the newest event id at the moment the stream began. `named`: each with an
    `event:` line (a browser's EventSource then needs a listener per name)."""
    service = request.app[SERVICE]
    # Taken before the answer's head goes out: a follower that has read the head is
    # subscribed, and any request it sends after that is seen through its events.
    last = service.last_event_id() if since is None else since
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-store"})
    await resp.prepare(request)
    await resp.write(f": events after {last}\n\n".encode())
    try:
        while True:
            events = service.events_since(last, 1000)
            for event in events:
                data = json.dumps(event.to_dict(), default=str)
                head = f"id: {event.id}\nevent: {event.name}\n" if named else \
                    f"id: {event.id}\n"
                await resp.write(f"{head}data: {data}\n\n".encode())
                last = event.id
            if events:
                continue
            if not await service.wait_for_events(last, _HEARTBEAT_S):
                break  # the daemon is stopping
            if service.last_event_id() <= last:
                await resp.write(b": still here\n\n")
    except (ConnectionResetError, ConnectionError):
        pass  # the follower went away
    return resp


def build_app(service: Service, api: ApiConfig, metrics: Metrics, auth: ApiAuth,
              failures: AuthFailures, *, node_page: bool = False) -> web.Application:
    """The application; auth and failures are shared by the apps of both doors.
    `node_page`: serve the node page (/ui), on the TCP door."""
    app = web.Application(middlewares=[_errors, _auth], client_max_size=api.max_body_bytes)
    app[SERVICE] = service
    app[AUTH] = auth
    app[FAILURES] = failures
    app[CONFIG] = api
    app[METRICS] = metrics
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/status", _status)
    app.router.add_get("/v1/mode", _modes)
    app.router.add_post("/v1/mode", _switch)
    app.router.add_get("/v1/switches/{id}", _switch_state)
    app.router.add_post("/v1/workloads/{name}/unblock", _unblock)
    app.router.add_post("/v1/reload", _reload)
    app.router.add_get("/v1/events", _events)
    app.router.add_get("/v1/openapi.json", _openapi)
    if node_page:
        from .ui import NodePage  # it imports this module

        NodePage(service, api, auth, failures).add_routes(app)
    return app
