"""The HTTP application, served on the local control socket (and, later, on TCP).

One API, two doors: the CLI is an HTTP client of the Unix socket, so there is no
second protocol to keep in step. Peers on the socket are trusted by its file mode
(0660) and named by their Unix user (SO_PEERCRED): `requested_by = cli:<user>`.
"""

from __future__ import annotations

import json
import pwd
import socket
import struct
from typing import Any

from aiohttp import web

from .errors import ConflictError, NotFoundError, RefusedError
from .service import Service

__all__ = ["MAX_BODY_BYTES", "build_app", "peer_user"]

MAX_BODY_BYTES = 64 * 1024
SERVICE: web.AppKey[Service] = web.AppKey("service", Service)


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


def _error(status: int, error: str, detail: Any = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


def _requested_by(request: web.Request) -> str:
    user = peer_user(request)
    if user is None:
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": "authentication required", "detail": None}),
            content_type="application/json",
        )
    return f"cli:{user}"


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
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
        return _error(413, f"request body over {MAX_BODY_BYTES} bytes")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _status(request: web.Request) -> web.Response:
    _requested_by(request)
    return web.json_response(request.app[SERVICE].status())


async def _modes(request: web.Request) -> web.Response:
    _requested_by(request)
    return web.json_response(request.app[SERVICE].modes())


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise _Invalid(400, f"malformed JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _Invalid(422, "body must be a JSON object")
    return body


class _Invalid(Exception):
    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.detail = status, detail


async def _switch(request: web.Request) -> web.Response:
    requested_by = _requested_by(request)
    try:
        body = await _json_body(request)
        mode, gpu, force = body.get("mode"), body.get("gpu"), body.get("force", False)
        unknown = sorted(set(body) - {"mode", "gpu", "force"})
        if unknown:
            raise _Invalid(422, f"unknown field(s): {', '.join(unknown)}", {"fields": unknown})
        if not isinstance(mode, str) or not mode:
            raise _Invalid(422, "field 'mode' must be a non-empty string", {"field": "mode"})
        if gpu is not None and (not isinstance(gpu, int) or isinstance(gpu, bool) or gpu < 0):
            raise _Invalid(422, "field 'gpu' must be a GPU index (integer >= 0)",
                           {"field": "gpu"})
        if not isinstance(force, bool):
            raise _Invalid(422, "field 'force' must be true or false", {"field": "force"})
    except _Invalid as exc:
        return _error(exc.status, str(exc), exc.detail)
    wait = request.query.get("wait", "true").lower() not in ("false", "0", "no")
    result = await request.app[SERVICE].switch_mode(
        mode, gpu=gpu, requested_by=requested_by, force=force, wait=wait
    )
    if not wait:
        return web.json_response({**result.to_dict(), "pending": True}, status=202)
    if not result.ok:
        return web.json_response({**result.to_dict(), "detail": result.detail}, status=409)
    return web.json_response(result.to_dict())


async def _unblock(request: web.Request) -> web.Response:
    requested_by = _requested_by(request)
    name = request.match_info["name"]
    result = await request.app[SERVICE].unblock(name, requested_by=requested_by)
    return web.json_response(result)


async def _events(request: web.Request) -> web.Response:
    _requested_by(request)
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        return _error(400, "since must be an integer event id")
    events = request.app[SERVICE].events_since(since)
    return web.json_response({"events": [e.to_dict() for e in events]})


def build_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[SERVICE] = service
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/v1/status", _status)
    app.router.add_get("/v1/mode", _modes)
    app.router.add_post("/v1/mode", _switch)
    app.router.add_post("/v1/workloads/{name}/unblock", _unblock)
    app.router.add_get("/v1/events", _events)
    return app
