"""The HTTP API: one application, served on the control socket and on TCP.

One API, two doors: the CLI is an HTTP client of the Unix socket, n8n and scripts of
the TCP listener, so there is no second protocol to keep in step. Peers on the socket
are trusted by its file mode (0660) and named by their Unix user (SO_PEERCRED):
`requested_by = cli:<user>`. On TCP, /v1/* needs a named bearer token
(`api:<name>`) or a Standard Webhooks signature (`api:webhook`).
"""

from __future__ import annotations

import hmac
import json
import pwd
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from standardwebhooks.webhooks import Webhook

from .config import ApiConfig
from .errors import ConflictError, NotFoundError, RefusedError
from .metrics import Metrics
from .openapi import openapi_document
from .service import Service

__all__ = ["ApiAuth", "SwitchRequest", "build_app", "peer_user"]

_REPLAY_WINDOW_S = 600.0  # twice the 5-minute tolerance: a replay is refused either way
_READ_ONLY = {("GET", "/v1/status"), ("GET", "/v1/mode"), ("GET", "/v1/events"),
              ("GET", "/v1/openapi.json")}


def _read_only(method: str, path: str) -> bool:
    return (method, path) in _READ_ONLY or (method == "GET" and path.startswith("/v1/switches/"))


class SwitchRequest(BaseModel):
    """Body of POST /v1/mode."""

    model_config = ConfigDict(extra="forbid")

    mode: str = Field(min_length=1, max_length=64)
    gpu: StrictInt | None = Field(None, ge=0, le=63)
    force: StrictBool = False


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


class ApiAuth:
    """Bearer tokens (constant-time) and Standard Webhooks signatures, with replay guard."""

    def __init__(self, config: ApiConfig) -> None:
        self._tokens = [
            (name, t.token.get_secret_value().encode())
            for name, t in config.tokens.items() if t.token is not None
        ]
        secret = config.signing_secret
        self._webhook = Webhook(secret.get_secret_value()) if secret is not None else None
        self._seen_ids: OrderedDict[str, float] = OrderedDict()
        self.open_read = config.open_read
        self.metrics_auth = config.metrics_auth

    def bearer(self, header: str) -> str | None:
        """The token's name, or None. Every token is compared, in constant time."""
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        found = None
        for name, token in self._tokens:
            if hmac.compare_digest(token, presented.strip().encode()):
                found = name
        return found

    def signed(self, body: bytes, headers: dict[str, str]) -> str | None:
        """None when the signature holds; else why it does not."""
        if self._webhook is None:
            return "signed requests are not configured"
        msg_id = headers.get("webhook-id", "")
        try:
            self._webhook.verify(body, headers, json_parse=False)
        except Exception as exc:  # the library raises several types for bad input
            return f"bad signature: {exc}"
        now = time.monotonic()
        while self._seen_ids and next(iter(self._seen_ids.values())) < now - _REPLAY_WINDOW_S:
            self._seen_ids.popitem(last=False)
        if msg_id in self._seen_ids:
            return f"replayed webhook-id {msg_id!r}"
        self._seen_ids[msg_id] = now
        return None


SERVICE = web.AppKey("service", Service)
AUTH = web.AppKey("auth", ApiAuth)
METRICS = web.AppKey("metrics", Metrics)


def _error(status: int, error: str, detail: Any = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


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
    except NotFoundError as exc:
        return _error(404, str(exc), exc.detail)
    except ConflictError as exc:
        return _error(409, str(exc), exc.detail)
    except RefusedError as exc:
        return _error(422, str(exc), exc.detail)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "request body too large",
                      {"max_bytes": request.app[SERVICE].config.api.max_body_bytes})
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return _error(exc.status, exc.reason, None)


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
    if path == "/metrics" and not auth.metrics_auth:
        return await handler(request)
    if auth.open_read and _read_only(request.method, path):
        request["requested_by"] = "api:anonymous"
        return await handler(request)
    header = request.headers.get("Authorization")
    if header is not None:
        name = auth.bearer(header)
        if name is None:
            return _error(401, "invalid bearer token")
        request["requested_by"] = f"api:{name}"
        return await handler(request)
    if "webhook-signature" in request.headers:
        body = await request.read()
        why = auth.signed(body, {k.lower(): v for k, v in request.headers.items()})
        if why is not None:
            return _error(401, why)
        request["requested_by"] = "api:webhook"
        return await handler(request)
    return _error(401, "authentication required (Authorization: Bearer <token>, or a "
                       "Standard Webhooks signature)")


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


async def _switch(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _error(400, f"malformed JSON: {exc}")
    try:
        req = SwitchRequest.model_validate(body)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(p) for p in e["loc"]) or "(body)", "error": e["msg"]}
                    for e in exc.errors()]
        first = problems[0]
        return _error(422, f"invalid request: {first['field']}: {first['error']}", problems)
    wait = request.query.get("wait", "true").lower() not in ("false", "0", "no")
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
    result = await request.app[SERVICE].unblock(request.match_info["name"],
                                                requested_by=request["requested_by"])
    return web.json_response(result)


async def _events(request: web.Request) -> web.Response:
    try:
        since = int(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "500"))
    except ValueError:
        return _error(400, "since and limit must be integers")
    if since < 0 or not 1 <= limit <= 1000:
        return _error(422, "since must be >= 0 and limit 1..1000")
    events = request.app[SERVICE].events_since(since, limit)
    return web.json_response({"events": [e.to_dict() for e in events]},
                             dumps=lambda o: json.dumps(o, default=str))


def build_app(service: Service, api: ApiConfig, metrics: Metrics) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth], client_max_size=api.max_body_bytes)
    app[SERVICE] = service
    app[AUTH] = ApiAuth(api)
    app[METRICS] = metrics
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/status", _status)
    app.router.add_get("/v1/mode", _modes)
    app.router.add_post("/v1/mode", _switch)
    app.router.add_get("/v1/switches/{id}", _switch_state)
    app.router.add_post("/v1/workloads/{name}/unblock", _unblock)
    app.router.add_get("/v1/events", _events)
    app.router.add_get("/v1/openapi.json", _openapi)
    return app
