"""Discord's gateway and REST API on loopback, as discord.py 2.7 speaks to them.

The real discord.py client connects here (`point_discord_py_at` sets `Route.BASE` and
the gateway's address): HELLO, IDENTIFY, heartbeats and their ACKs, READY,
GUILD_CREATE, RESUME/RESUMED and INVALID_SESSION on a zlib-stream websocket, and the
REST routes the bot uses, answered with `Content-Type: application/json` exactly (what
discord.py's `json_or_text` requires). Slash commands arrive as INTERACTION_CREATE
dispatches and their answers come back through the interaction callback, follow-up
and edit endpoints, as in production. Faults are switched on per test: REST refusing
connections, 403 on command sync, a reset while posting a channel message, the
gateway dropped mid-session, a guild that never arrives.

It runs in a thread with its own event loop (Discord is another machine); the
`a_*` helpers are for tests running on the bot's loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import discord
import yarl
from aiohttp import web

from .standins import free_port

T = TypeVar("T")

APP_ID = 900_000_000_000_000_001
BOT_ID = 900_000_000_000_000_002
GUILD_ID = 77
CHANNEL_ID = 123
OWNER = {"id": "1", "username": "owner", "discriminator": "0", "global_name": "Owner",
         "avatar": None}
BOT_USER = {"id": str(BOT_ID), "username": "gpuwarden", "discriminator": "0",
            "global_name": None, "avatar": None, "bot": True, "flags": 0}
TOKEN = "test-bot-token"
_BODY = web.RequestKey("body", object)  # the parsed JSON body of a request

# Gateway opcodes.
DISPATCH, HEARTBEAT, IDENTIFY, RESUME, RECONNECT, INVALID_SESSION, HELLO, HEARTBEAT_ACK = (
    0, 1, 2, 6, 7, 9, 10, 11)


def point_discord_py_at(standin: DiscordStandIn, monkeypatch: Any) -> None:
    """Send discord.py's REST calls and its first gateway connection to the stand-in."""
    monkeypatch.setattr(discord.http.Route, "BASE", f"{standin.url}/api/v10")
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        yarl.URL(standin.gateway_url))


@dataclass
class Call:
    """One REST request the stand-in answered."""

    method: str
    path: str
    body: Any
    at: float = field(default_factory=time.monotonic)


@dataclass
class Sent:
    """An interaction sent to the bot, and what came back for it."""

    id: int
    token: str
    sent_at: float
    callbacks: list[dict[str, Any]] = field(default_factory=list)  # {"type", "data", "at"}
    followups: list[dict[str, Any]] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)

    def texts(self) -> list[str]:
        """Every text the user saw, in order: reply, edits, follow-ups."""
        out = [str((c.get("data") or {}).get("content") or "") for c in self.callbacks]
        out += [str(e.get("content") or "") for e in self.edits]
        out += [str(f.get("content") or "") for f in self.followups]
        return [t for t in out if t]


class _Session:
    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None
                 ) -> None:
        self.ws = ws
        self.transport = transport
        self.deflate = zlib.compressobj()  # one shared context per connection
        self.id = ""
        self.seq = 0
        self.identified = asyncio.Event()


class DiscordStandIn:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.gateway_url = f"ws://127.0.0.1:{self.port}/gateway"
        self.calls: list[Call] = []
        self.commands: dict[int | None, list[dict[str, Any]]] = {}  # guild (None: global)
        self.interactions: dict[int, Sent] = {}
        self.by_token: dict[str, Sent] = {}
        self.messages: list[dict[str, Any]] = []  # posted to channels
        self.identifies = 0
        self.resumes = 0
        # Faults.
        self.sync_error: tuple[int, dict[str, Any]] | None = None  # PUT commands answer
        self.reset_messages = 0  # channel message POSTs to cut off without an answer
        self.send_guild = True  # False: READY lists the guild, GUILD_CREATE never comes
        self.resumable = True  # False: a RESUME gets INVALID_SESSION(false)
        self._ids = itertools.count(1_000_000)
        self._sessions: list[_Session] = []
        self._resumable_sessions: dict[str, int] = {}  # session id -> last seq
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- life cycle (called from the test's thread) --------------------------------

    def start(self) -> DiscordStandIn:
        self._thread.start()
        self._run(self._start())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._run(self._cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def refuse(self) -> None:
        """Stop listening: every connection is refused (DNS or network down), and the
        open ones are cut."""
        self._run(self._refuse())

    def serve(self) -> None:
        """Listen again on the same port."""
        self._run(self._serve())

    def drop_gateway(self) -> None:
        """Cut every gateway connection without a close frame (a network blip)."""
        self._run(self._drop())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run on the stand-in's loop without blocking the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record])
        api = "/api/v10"
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get(f"{api}/gateway/bot", self._gateway_bot)
        app.router.add_get(f"{api}/users/@me", self._me)
        app.router.add_get(f"{api}/oauth2/applications/@me", self._application)
        app.router.add_route("*", f"{api}/applications/{{app}}/commands", self._commands)
        app.router.add_route("*", f"{api}/applications/{{app}}/guilds/{{guild}}/commands",
                             self._commands)
        app.router.add_delete(f"{api}/applications/{{app}}/commands/{{cid}}", self._delete)
        app.router.add_post(f"{api}/interactions/{{iid}}/{{token}}/callback", self._callback)
        app.router.add_post(f"{api}/webhooks/{{app}}/{{token}}", self._followup)
        app.router.add_patch(f"{api}/webhooks/{{app}}/{{token}}/messages/{{mid}}", self._edit)
        app.router.add_post(f"{api}/channels/{{cid}}/messages", self._message)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await self._serve()

    async def _serve(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()

    async def _refuse(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None
        await self._drop()
        # Kept-alive REST connections die with the network too (discord.py would reuse
        # one for its next websocket handshake).
        assert self._runner is not None and self._runner.server is not None
        for handler in self._runner.server.connections:
            if handler.transport is not None:
                handler.transport.abort()

    async def _drop(self) -> None:
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.abort()
        self._sessions.clear()

    async def _cleanup(self) -> None:
        await self._drop()
        assert self._runner is not None
        await self._runner.cleanup()

    # -- REST ----------------------------------------------------------------------

    @staticmethod
    def _json(payload: Any, status: int = 200) -> web.Response:
        # Exactly application/json: discord.py reads anything else as text.
        return web.Response(body=json.dumps(payload).encode(), status=status,
                            headers={"Content-Type": "application/json"})

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = None
        if request.can_read_body and request.content_type == "application/json":
            body = await request.json()
        elif request.can_read_body:  # multipart (a payload_json part)
            body = await _payload_json(request)
        request[_BODY] = body
        self.calls.append(Call(request.method, request.path, body))
        if request.path.startswith("/api/") and \
                request.headers.get("Authorization") != f"Bot {self.token}" and \
                "/interactions/" not in request.path and "/webhooks/" not in request.path:
            return self._json({"message": "401: Unauthorized", "code": 0}, 401)
        response: web.StreamResponse = await handler(request)
        return response

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        return self._json({"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}})

    async def _me(self, request: web.Request) -> web.Response:
        return self._json(BOT_USER)

    async def _application(self, request: web.Request) -> web.Response:
        return self._json({
            "id": str(APP_ID), "name": "gpuwarden", "description": "", "icon": None,
            "bot_public": False, "bot_require_code_grant": False, "owner": OWNER,
            "verify_key": "0" * 64, "flags": 0, "summary": "", "team": None,
            "interactions_endpoint_url": None, "bot": BOT_USER})

    async def _commands(self, request: web.Request) -> web.Response:
        guild = int(request.match_info["guild"]) if "guild" in request.match_info else None
        if request.method == "GET":
            return self._json(self.commands.get(guild, []))
        if self.sync_error is not None:
            status, payload = self.sync_error
            return self._json(payload, status)
        stored = []
        for cmd in request[_BODY] or []:
            stored.append({**cmd, "id": str(next(self._ids)), "application_id": str(APP_ID),
                           "version": str(next(self._ids)),
                           **({"guild_id": str(guild)} if guild else {})})
        self.commands[guild] = stored
        return self._json(stored)

    async def _delete(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        self.commands[None] = [c for c in self.commands.get(None, []) if c["id"] != cid]
        return web.Response(status=204)

    def _message_doc(self, channel_id: int, body: dict[str, Any]) -> dict[str, Any]:
        return {"id": str(next(self._ids)), "channel_id": str(channel_id), "type": 0,
                "content": body.get("content") or "", "author": BOT_USER,
                "embeds": body.get("embeds") or [], "attachments": [], "mentions": [],
                "mention_roles": [], "mention_everyone": False, "pinned": False,
                "tts": False, "timestamp": datetime.now(tz=UTC).isoformat(),
                "edited_timestamp": None, "flags": body.get("flags") or 0, "components": []}

    async def _callback(self, request: web.Request) -> web.Response:
        sent = self.interactions.get(int(request.match_info["iid"]))
        if sent is None or sent.token != request.match_info["token"]:
            return self._json({"message": "Unknown interaction", "code": 10062}, 404)
        if sent.callbacks:
            return self._json({"message": "Interaction has already been acknowledged.",
                               "code": 40060}, 400)
        body = request[_BODY] or {}
        sent.callbacks.append({**body, "at": time.monotonic()})
        message = self._message_doc(CHANNEL_ID, body.get("data") or {})
        resource: dict[str, Any] = {"type": body.get("type")}
        if body.get("type") in (4, 5):
            resource["message"] = message
        return self._json({"interaction": {
            "id": str(sent.id), "type": 2, "response_message_id": message["id"],
            "response_message_loading": body.get("type") == 5,
            "response_message_ephemeral": bool((body.get("data") or {}).get("flags", 0) & 64)},
            "resource": resource})

    async def _followup(self, request: web.Request) -> web.Response:
        return self._on_webhook(request, "followups")

    async def _edit(self, request: web.Request) -> web.Response:
        return self._on_webhook(request, "edits")

    def _on_webhook(self, request: web.Request, kind: str) -> web.Response:
        """A follow-up or an edit of the reply: noted on its interaction, as a message."""
        sent = self.by_token.get(request.match_info["token"])
        if sent is None:
            return self._json({"message": "Unknown Webhook", "code": 10015}, 404)
        body = request[_BODY] or {}
        getattr(sent, kind).append({**body, "at": time.monotonic()})
        return self._json(self._message_doc(CHANNEL_ID, body))

    async def _message(self, request: web.Request) -> web.StreamResponse:
        if self.reset_messages > 0:
            self.reset_messages -= 1
            assert request.transport is not None
            request.transport.abort()  # the network fails mid-request: no answer at all
            return web.Response(status=500)
        body = request[_BODY] or {}
        if len(body.get("embeds") or []) > 10 or len(body.get("content") or "") > 2000:
            return self._json({"message": "Invalid Form Body", "code": 50035}, 400)
        doc = self._message_doc(int(request.match_info["cid"]), body)
        self.messages.append({**body, "at": time.monotonic()})
        return self._json(doc)

    # -- the gateway ---------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session = _Session(ws, request.transport)
        self._sessions.append(session)
        compressed = request.query.get("compress") == "zlib-stream"
        await self._send(session, {"op": HELLO, "d": {"heartbeat_interval": 41250}},
                         compressed)
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                await self._on_op(session, json.loads(msg.data), compressed)
        except ConnectionResetError:
            pass  # the client went away while it was being answered
        finally:
            if session in self._sessions:
                self._sessions.remove(session)
            if session.id:
                self._resumable_sessions[session.id] = session.seq
        return ws

    async def _send(self, session: _Session, payload: dict[str, Any], compressed: bool
                    ) -> None:
        data = json.dumps(payload)
        if compressed:
            chunk = session.deflate.compress(data.encode()) + \
                session.deflate.flush(zlib.Z_SYNC_FLUSH)  # ends in 00 00 ff ff
            await session.ws.send_bytes(chunk)
        else:
            await session.ws.send_str(data)

    async def _dispatch(self, session: _Session, event: str, data: dict[str, Any],
                        compressed: bool = True) -> None:
        session.seq += 1
        await self._send(session, {"op": DISPATCH, "t": event, "s": session.seq, "d": data},
                         compressed)

    async def _on_op(self, session: _Session, msg: dict[str, Any], compressed: bool) -> None:
        op, d = msg.get("op"), msg.get("d")
        if op == HEARTBEAT:
            await self._send(session, {"op": HEARTBEAT_ACK, "d": None}, compressed)
        elif op == IDENTIFY:
            if d.get("token") != self.token:
                await session.ws.close(code=4004, message=b"Authentication failed.")
                return
            self.identifies += 1
            session.id = f"session-{next(self._ids)}"
            await self._dispatch(session, "READY", {
                "v": 10, "user": BOT_USER, "guilds": [{"id": str(GUILD_ID),
                                                      "unavailable": True}],
                "session_id": session.id, "resume_gateway_url": self.gateway_url,
                "application": {"id": str(APP_ID), "flags": 0}, "shard": [0, 1]},
                compressed)
            if self.send_guild:
                await self._dispatch(session, "GUILD_CREATE", _guild(), compressed)
            session.identified.set()
        elif op == RESUME:
            last = self._resumable_sessions.pop(d.get("session_id"), None)
            if last is None or not self.resumable:
                await self._send(session, {"op": INVALID_SESSION, "d": False}, compressed)
                return
            self.resumes += 1
            session.id, session.seq = d["session_id"], last
            await self._dispatch(session, "RESUMED", {}, compressed)
            session.identified.set()

    # -- interactions (called from the test, on its loop) ----------------------------

    async def a_wait_connected(self, timeout: float = 30) -> None:
        """Until a gateway session is identified or resumed."""
        deadline = time.monotonic() + timeout
        while not any(s.identified.is_set() for s in list(self._sessions)):
            assert time.monotonic() < deadline, "the bot never connected to the gateway"
            await asyncio.sleep(0.02)

    async def a_interact(self, sub: str, options: dict[str, Any] | None = None, *,
                         user_id: int = 1001, roles: list[int] | None = None,
                         guild_id: int = GUILD_ID) -> Sent:
        """`/gpu <sub> [options]` from a member, as INTERACTION_CREATE."""
        await self.a_wait_connected()
        return await self._call(self._interact(sub, options or {}, user_id, roles or [],
                                               guild_id))

    async def _interact(self, sub: str, options: dict[str, Any], user_id: int,
                        roles: list[int], guild_id: int) -> Sent:
        session = next(s for s in self._sessions if s.identified.is_set())
        # A guild command carries its guild's id in the data (discord.py looks it up there).
        cmd = next((c for cmds in self.commands.values() for c in cmds if c["name"] == "gpu"),
                   {"id": str(next(self._ids)), "guild_id": str(guild_id)})
        sub_options = [{"name": k, "type": _option_type(v), "value": v}
                       for k, v in options.items()]
        sent = Sent(next(self._ids), f"itoken-{next(self._ids)}", time.monotonic())
        self.interactions[sent.id] = sent
        self.by_token[sent.token] = sent
        user = {"id": str(user_id), "username": f"user{user_id}", "discriminator": "0",
                "global_name": None, "avatar": None}
        await self._dispatch(session, "INTERACTION_CREATE", {
            "id": str(sent.id), "application_id": str(APP_ID), "type": 2,
            "token": sent.token, "version": 1, "guild_id": str(guild_id),
            "channel_id": str(CHANNEL_ID),
            "channel": {"id": str(CHANNEL_ID), "type": 0, "guild_id": str(guild_id),
                        "name": "gpu", "position": 0, "permission_overwrites": []},
            "app_permissions": "2147483647", "locale": "en-US", "guild_locale": "en-US",
            "attachment_size_limit": 10_485_760, "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id)}, "context": 0,
            "member": {"user": user, "roles": [str(r) for r in roles], "permissions": "0",
                       "joined_at": "2026-01-01T00:00:00+00:00", "deaf": False,
                       "mute": False, "flags": 0},
            "data": {"id": cmd["id"], "name": "gpu", "type": 1,
                     **({"guild_id": cmd["guild_id"]} if "guild_id" in cmd else {}),
                     "options": [{"name": sub, "type": 1, "options": sub_options}]}},
            compressed=True)
        return sent

    async def a_send_guild(self) -> None:
        """GUILD_CREATE now, on every identified session (the guild became available)."""
        self.send_guild = True

        async def send() -> None:
            for session in self._sessions:
                if session.identified.is_set():
                    await self._dispatch(session, "GUILD_CREATE", _guild())
        await self._call(send())

    async def a_wait(self, predicate: Callable[[], Any], timeout: float = 30,
                     what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
            await asyncio.sleep(0.02)

    def paths(self, method: str | None = None) -> list[str]:
        return [c.path for c in self.calls if method is None or c.method == method]


def _option_type(value: Any) -> int:
    if isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return 4
    return 3


def _guild() -> dict[str, Any]:
    role = {"id": str(GUILD_ID), "name": "@everyone", "color": 0, "hoist": False,
            "position": 0, "permissions": "0", "managed": False, "mentionable": False,
            "flags": 0}
    roles = [role] + [{**role, "id": str(r), "name": f"role{r}", "position": 1}
                      for r in (4242, 1)]
    return {"id": str(GUILD_ID), "name": "homelab", "icon": None, "owner_id": OWNER["id"],
            "roles": roles, "emojis": [], "stickers": [], "features": [],
            "member_count": 3, "members": [], "voice_states": [], "presences": [],
            "threads": [], "stage_instances": [], "guild_scheduled_events": [],
            "channels": [{"id": str(CHANNEL_ID), "type": 0, "name": "gpu", "position": 0,
                          "permission_overwrites": [], "guild_id": str(GUILD_ID)}],
            "unavailable": False, "large": False, "verification_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0,
            "mfa_level": 0, "nsfw_level": 0, "premium_tier": 0, "system_channel_flags": 0,
            "preferred_locale": "en-US", "afk_timeout": 300, "joined_at":
            "2026-01-01T00:00:00+00:00"}


async def _payload_json(request: web.Request) -> Any:
    if not request.content_type.startswith("multipart/"):
        return None
    reader = await request.multipart()
    async for part in reader:
        if getattr(part, "name", None) == "payload_json":
            return json.loads(await part.text())  # type: ignore[union-attr]
    return None
