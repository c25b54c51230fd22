"""The node page: `/ui` on the API's TCP door, for people who would rather look.

Static files from the package (no build step, no CDN) and a few JSON routes under
`/ui/api/`, all through the service like every other front end.

Reading is open to a peer on loopback (and with `[api] open_read`); elsewhere it needs
a session. Acting (a switch, an unblock) always needs one. A session is granted for an
API token posted once to `/ui/api/session`: an HttpOnly, SameSite=Strict cookie signed
with a key this daemon made at start, bound to the token's value, so it ends with a
restart, the token's change or removal, or after 12 hours. No secret is ever in the
page or a URL. Every request must carry a `Host` of this machine (DNS rebinding), a
state change must come by POST with JSON and an `Origin` of this address: another
site cannot act through a signed-in browser (CSRF). Actions are audited as
`ui:<token name>`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import time
from pathlib import Path

from aiohttp import web

from ..api import BadRequest, SwitchRequest, event_stream, read_json
from ..api_auth import ApiAuth, AuthFailures
from ..config import ApiConfig, parse_listen
from ..events import Severity
from ..proxy.browser import BrowserPolicy
from ..service import Service

__all__ = ["NodePage", "UiSessions"]

STATIC = Path(__file__).parent / "static"
_TYPES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css",
          "icon.svg": "image/svg+xml"}
COOKIE = "gpuwarden_session"
SESSION_S = 12 * 3600
_EVENTS_SHOWN = 40
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UiSessions:
    """Signed session cookies, each granted by one API token and bound to its value."""

    def __init__(self, auth: ApiAuth) -> None:
        self._auth = auth
        self._key = os.urandom(32)  # a restart ends every session

    def _mac(self, payload: str, fingerprint: bytes) -> bytes:
        return hmac.new(self._key, payload.encode("ascii") + b"." + fingerprint,
                        hashlib.sha256).digest()

    def grant(self, name: str, now: float | None = None) -> str:
        fingerprint = self._auth.fingerprint(name)
        assert fingerprint is not None, "granted for a token just checked"
        expires = int((now or time.time()) + SESSION_S)
        payload = _b64(json.dumps({"n": name, "e": expires}).encode())
        return f"{payload}.{_b64(self._mac(payload, fingerprint))}"

    def name_of(self, cookie: str | None, now: float | None = None) -> str | None:
        """The token name a valid, unexpired session cookie was granted by."""
        if not cookie or len(cookie) > 512:
            return None
        payload, _, mac = cookie.partition(".")
        try:
            doc = json.loads(_unb64(payload))
            name, expires = str(doc["n"]), int(doc["e"])
            presented = _unb64(mac)
        except (ValueError, KeyError, TypeError):
            return None
        fingerprint = self._auth.fingerprint(name)
        if fingerprint is None or expires < (now or time.time()):
            return None
        return name if hmac.compare_digest(self._mac(payload, fingerprint), presented) \
            else None


class NodePage:
    """The page's routes, added to the TCP door's application."""

    def __init__(self, service: Service, api: ApiConfig, auth: ApiAuth,
                 failures: AuthFailures) -> None:
        self._service = service
        self._auth = auth
        self._failures = failures
        self._open_read = api.open_read
        self._loopback_reads = api.ui_read == "loopback"
        self.sessions = UiSessions(auth)
        address = parse_listen(api.listen or "") or ("127.0.0.1", 0)
        self._browser = BrowserPolicy(address[0], address[1])
        # Read once, at start (never from disk on the event loop): 23 kB in all.
        self._files = {name: (STATIC / name).read_bytes() for name in _TYPES}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ui", self._index)
        app.router.add_get("/ui/", self._to_index)
        app.router.add_get("/ui/static/{name}", self._static)
        app.router.add_get("/ui/api/state", self._state)
        app.router.add_get("/ui/api/events", self._events)
        app.router.add_get("/ui/api/switches/{id}", self._switch_state)
        app.router.add_post("/ui/api/session", self._sign_in)
        app.router.add_post("/ui/api/session/end", self._sign_out)
        app.router.add_post("/ui/api/mode", self._switch)
        app.router.add_post("/ui/api/unblock", self._unblock)

    # -- who may do what ---------------------------------------------------------

    def _host_checked(self, request: web.Request, *, acting: bool) -> None:
        origin = request.headers.get("Origin")
        if acting and origin is None:
            raise BadRequest(403, "a change needs the page's Origin header (send it from "
                                  "the page)")
        verdict = self._browser.check(request.headers.get("Host"), origin)
        if not verdict.allowed:
            raise BadRequest(403, verdict.reason.replace("this proxy's", "this node's")
                             .replace("; add it to allowed_origins to let that site in", ""))

    def _session(self, request: web.Request) -> str | None:
        return self.sessions.name_of(request.cookies.get(COOKIE))

    def _may_read(self, request: web.Request) -> bool:
        if self._open_read or self._session(request) is not None:
            return True
        if not self._loopback_reads:
            return False
        try:
            return ipaddress.ip_address(request.remote or "").is_loopback
        except ValueError:
            return False

    def _reader(self, request: web.Request) -> None:
        self._host_checked(request, acting=False)
        if not self._may_read(request):
            raise BadRequest(401, "sign in with an API token to see this node",
                             {"sign_in": True})

    def _actor(self, request: web.Request) -> str:
        self._host_checked(request, acting=True)
        name = self._session(request)
        if name is None:
            raise BadRequest(401, "sign in with an API token to act on this node",
                             {"sign_in": True})
        return f"ui:{name}"

    # -- pages -------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        self._host_checked(request, acting=False)
        return web.Response(body=self._files["index.html"], content_type="text/html",
                            charset="utf-8", headers=_HEADERS)

    async def _to_index(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._files or name == "index.html":
            raise web.HTTPNotFound()
        self._host_checked(request, acting=False)
        return web.Response(body=self._files[name], content_type=_TYPES[name],
                            headers=_HEADERS)

    # -- reading -----------------------------------------------------------------

    async def _state(self, request: web.Request) -> web.Response:
        self._reader(request)
        service = self._service
        events = service.events_since(max(0, service.last_event_id() - 500), 500)
        t = service.config.thresholds
        doc = {
            "status": service.status(),
            "history": {str(gpu): samples for gpu, samples in service.vram_history().items()},
            "thresholds": {"warn": t.warn, "alert": t.alert, "critical": t.critical},
            "alerts": service.open_alerts(),
            # Steps and other debug events show as a switch's progress, not here.
            "events": [e.to_dict() for e in events
                       if e.severity > Severity.DEBUG][-_EVENTS_SHOWN:],
            "last_event_id": service.last_event_id(),
            "signed_in": self._session(request),
            "now": time.time(),
        }
        return web.json_response(doc, dumps=lambda o: json.dumps(o, default=str),
                                 headers={"Cache-Control": "no-store"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self._reader(request)
        since = request.query.get("since", "")
        return await event_stream(request, int(since) if since.isdigit() and
                                  len(since) < 19 else None, named=False)

    async def _switch_state(self, request: web.Request) -> web.Response:
        self._reader(request)
        return web.json_response(self._service.switch_state(request.match_info["id"]))

    # -- acting ------------------------------------------------------------------

    async def _sign_in(self, request: web.Request) -> web.Response:
        self._host_checked(request, acting=True)
        client = request.remote or "unknown"
        wait = self._failures.retry_after(client)
        if wait is not None:
            raise BadRequest(429, f"too many failed sign-ins from {client}; retry in {wait} s",
                             {"retry_after_s": wait})
        body = await read_json(request)
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token or len(token) > 4096:
            raise BadRequest(422, "invalid request: token: a string is required",
                             [{"field": "token", "error": "required"}])
        found = self._auth.token_named(token.strip().encode("utf-8", "replace"))
        if found is None:
            self._failures.failed(client, "token")
            raise BadRequest(401, "not a token of this node ([api.tokens.NAME] token)")
        name, needs_signature = found
        if needs_signature:
            raise BadRequest(403, f"token {name!r} needs signed requests, which a page "
                                  "cannot make: sign in with a token without "
                                  "require_signature")
        secure = request.secure or request.headers.get("X-Forwarded-Proto") == "https"
        resp = web.json_response({"ok": True, "signed_in": name})
        resp.set_cookie(COOKIE, self.sessions.grant(name), max_age=SESSION_S, path="/ui",
                        httponly=True, samesite="Strict", secure=secure)
        return resp

    async def _sign_out(self, request: web.Request) -> web.Response:
        self._host_checked(request, acting=True)
        resp = web.json_response({"ok": True, "signed_in": None})
        resp.del_cookie(COOKIE, path="/ui")
        return resp

    async def _switch(self, request: web.Request) -> web.Response:
        requested_by = self._actor(request)
        req = SwitchRequest.from_json(await read_json(request))
        result = await self._service.switch_mode(
            req.mode, gpu=req.gpu, requested_by=requested_by, force=req.force, wait=False)
        if result.pending:
            return web.json_response(result.to_dict(), status=202)
        if not result.ok:
            return web.json_response({**result.to_dict(), "detail": result.detail},
                                     status=409)
        return web.json_response(result.to_dict())

    async def _unblock(self, request: web.Request) -> web.Response:
        requested_by = self._actor(request)
        body = await read_json(request)
        name = body.get("workload") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRequest(422, "invalid request: workload: a name is required",
                             [{"field": "workload", "error": "required"}])
        return web.json_response(await self._service.unblock(name,
                                                             requested_by=requested_by))
