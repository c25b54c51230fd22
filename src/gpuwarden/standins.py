"""Stand-ins of Ollama and ComfyUI that speak their real API shapes, run as process
workloads holding simulated VRAM: the demo's, the demand proxy's tests' and
bench/proxy.py's.

    python -m gpuwarden.standins ollama  --port P --ledger DIR --mib N [--tokens 20]
    python -m gpuwarden.standins comfyui --port P --ledger DIR --mib N [--job-seconds 2]
    (both) [--start-delay S] [--stop-delay S]: a model load before it answers, and a
    shutdown that takes that long after SIGTERM

Ollama: `/`, `/api/version`, `/api/tags`, `/api/show`, `/api/ps`, streaming NDJSON
`/api/generate` and `/api/chat` (or one JSON with `stream: false`), `/api/embed`,
`options.num_predict` tokens (`options.standin_first_delay` before the first and
`options.standin_token_delay` between them; `options.standin_abort` ends an answer
with `done: false`), the model's VRAM held by a runner child process, as Ollama's
`ollama runner` holds it, `keep_alive` as Ollama reads it (numbers, Go durations, 400
for `"-1"` or a bool), an unload answered at once and done a moment later or when
the requests under way end, Ollama's error shapes (404 JSON for an unknown model,
plain-text 404 and 405),
`/v1/models`, `/v1/chat/completions` (server-sent events with `stream: true`), and
`/api/blobs/{digest}` uploads. ComfyUI: its page, `/system_stats`, `/object_info`,
`/prompt`, `/queue`, `/history`, `/ws` (status and progress messages), `/interrupt`,
`/free` (gives the models' VRAM back), `/upload/image` and `/view` downloads.
`GET /standin/stats` counts what happened (jobs done, interrupted, unloads).

Both keep the real programs' browser protections on loopback (403, empty body):
Ollama's `Host` allow-list and `Origin` allow-list, ComfyUI's rule that a request's
`Origin` host:port must equal its loopback `Host`. A proxy that loosens them is caught.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import heapq
import ipaddress
import json
import os
import re
import signal
import socket
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

__all__ = ["main"]

MODEL = "standin:7b"


class Vram:
    """A claim in the sim's ledger, held by an open, flocked file while loaded."""

    def __init__(self, ledger: Path, name: str, mib: int) -> None:
        self.path = ledger / f"{name}.mib"
        self.mib = mib
        self.fd: int | None = None

    def load(self) -> None:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(f"{self.mib}\n")
            self.fd = os.open(self.path, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_SH)

    def unload(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.path.unlink(missing_ok=True)


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address((text or "").strip("[]"))
    except ValueError:
        return None


def _ollama_host_allowed(host: str) -> bool:
    """Ollama's allowedHostsMiddleware, for a server bound to loopback."""
    name = host.lower()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    ip = _ip(name)
    if ip is not None:
        return ip.is_loopback or ip.is_private or ip.is_unspecified
    return name in ("", "localhost", socket.gethostname().lower()) or \
        name.endswith((".localhost", ".local", ".internal"))


# Ollama's default OLLAMA_ORIGINS: these hosts on http and https, any port or none, and
# the desktop apps' schemes; and the same-origin case gin's CORS lets through.
_OLLAMA_ORIGIN_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0")
_OLLAMA_ORIGIN_SCHEMES = ("app", "file", "tauri", "vscode-webview", "vscode-file")


def _ollama_origin_allowed(origin: str, host: str) -> bool:
    if origin in (f"http://{host}", f"https://{host}"):
        return True
    parts = urlsplit(origin)
    if parts.scheme in _OLLAMA_ORIGIN_SCHEMES:
        return True
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.hostname in _OLLAMA_ORIGIN_HOSTS \
        and parts.path == ""


@web.middleware
async def ollama_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    host = request.headers.get("Host", "")
    origin = request.headers.get("Origin")
    if not _ollama_host_allowed(host) or (origin and not _ollama_origin_allowed(origin, host)):
        return web.Response(status=403)
    cors = {"Access-Control-Allow-Origin": origin} if origin else {}
    if request.method == "OPTIONS":  # gin's CORS answers a preflight itself
        return web.Response(status=204, headers={
            **cors, "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, HEAD, "
            "OPTIONS"})
    response = await handler(request)
    response.headers.update(cors)
    return response


@web.middleware
async def comfyui_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ComfyUI's origin_only_middleware: on a loopback Host, an Origin's host:port must
    be the Host's (ports compared only when both have one)."""
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host is not None and origin is not None:
        host_parts = urlsplit("//" + host.lower())
        origin_parts = urlsplit(origin.lower())
        host_domain: str | None = host.lower()
        origin_domain: str | None = origin_parts.netloc
        try:
            if origin_parts.port is None:
                host_domain = host_parts.hostname
            if host_parts.port is None:
                origin_domain = origin_parts.hostname
        except ValueError:
            return web.Response(status=403)
        name = host_parts.hostname
        ip = _ip(name)
        loopback = name == "localhost" or (ip is not None and ip.is_loopback)
        if loopback and host_domain and origin_domain and host_domain != origin_domain:
            return web.Response(status=403)
    return await handler(request)


def _png(width: int = 64, height: int = 64) -> bytes:
    """A small valid PNG (a gradient): what SaveImage wrote, as far as a page can tell."""
    rows = b"".join(b"\0" + b"".join(bytes((x * 4 % 256, y * 4 % 256, 160))
                                      for x in range(width)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Go's time.ParseDuration, which Ollama applies to a string keep_alive.
_GO_DURATION = re.compile(r"^[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$")
_GO_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
              "h": 3600.0}


class KeepAliveError(ValueError):
    """Ollama's 400 for a keep_alive it cannot read."""


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's keep_alive: None (unset), a number of seconds, or a Go duration
    string; negative is forever. Raises KeepAliveError as Ollama answers 400."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise KeepAliveError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise KeepAliveError(f"Unsupported type: '{type(value).__name__}'")
    if value in ("0", "+0", "-0"):
        return 0.0
    if not _GO_DURATION.match(value):
        if re.fullmatch(r"[-+]?\d+(\.\d*)?", value):
            raise KeepAliveError(f'time: missing unit in duration "{value}"')
        raise KeepAliveError(f'time: invalid duration "{value}"')
    sign = -1.0 if value.startswith("-") else 1.0
    total = sum(float(n) * _GO_UNIT_S[u] for n, _, _, u in
                re.findall(r"(\d+(\.\d*)?|\.\d+)()(ns|us|µs|ms|s|m|h)", value))
    return sign * total


class Runner:
    """The loaded model's runner: a child process holding its VRAM, as Ollama's
    `ollama runner` (0.24) or `llama-server` (0.32) is, started on the first request
    and killed on unload. An unload is answered at once and done a moment later, or,
    while a request runs, when the last one ends (Ollama's own order)."""

    def __init__(self, ledger: Path, mib: int, claim: str) -> None:
        """`claim`: the name of its VRAM claim in the sim's ledger, the same at every
        start of this workload (a killed runner cannot remove its file: the next one
        writes over it)."""
        self.ledger, self.mib, self.claim = ledger, mib, claim
        self.proc: asyncio.subprocess.Process | None = None
        self.busy = 0
        self.unload_asked_at: float | None = None
        self.keep_alive_s = 300.0
        self.expires_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def load(self, keep_alive: float | None) -> None:
        async with self._lock:
            if not self.loaded:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gpuwarden.gpu.hold", "--ledger", str(self.ledger),
                    "--name", self.claim, "--mib", str(self.mib),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                assert self.proc.stdout is not None
                await self.proc.stdout.readline()  # "holding ...": the VRAM is taken
                if keep_alive is None:
                    self.keep_alive_s = 300.0  # a fresh load without one gets 5 m
        if keep_alive is not None:
            self.keep_alive_s = keep_alive  # unset keeps the last explicit value
        self.unload_asked_at = None
        self.expires_at = time.time() + self.keep_alive_s

    def request_started(self) -> None:
        self.busy += 1

    def request_ended(self) -> None:
        self.busy -= 1
        if not self.busy and self.unload_asked_at is not None:
            asyncio.get_running_loop().call_later(0.005, self._kill)

    def unload(self) -> None:
        """Answered at once by the caller; the runner goes a few ms later, or once the
        requests under way have ended."""
        self.unload_asked_at = time.time()
        if not self.busy:
            asyncio.get_running_loop().call_later(0.005, self._kill)

    def _kill(self) -> None:
        if self.unload_asked_at is not None and not self.busy and self.loaded:
            assert self.proc is not None
            self.proc.kill()  # Ollama SIGKILLs its runner
            self.proc = None

    def ps_entry(self) -> dict[str, Any]:
        expires = self.unload_asked_at if self.unload_asked_at is not None else \
            self.expires_at
        forever = self.keep_alive_s < 0 and self.unload_asked_at is None
        return {"name": MODEL, "model": MODEL, "size": self.mib << 20, "digest": "0" * 64,
                "details": {"parent_model": "", "format": "gguf", "family": "llama",
                            "families": ["llama"], "parameter_size": "7B",
                            "quantization_level": "Q4_K_M"},
                "expires_at": "2319-03-18T16:00:00.000000000Z" if forever else
                time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime(expires)),
                "size_vram": self.mib << 20, "context_length": 4096}


_MODEL_NAMES = (MODEL, MODEL.split(":")[0], f"{MODEL.split(':')[0]}:latest")


@web.middleware
async def ollama_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Go's net/http answers: plain text 404 and 405, not JSON."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        return web.Response(status=405, text="405 method not allowed",
                            headers={"Allow": ", ".join(sorted(exc.allowed_methods))})
    except web.HTTPNotFound:
        return web.Response(status=404, text="404 page not found")


def ollama_app(runner: Runner, tokens: int, token_delay: float) -> web.Application:
    stats: dict[str, Any] = {"unloads": 0, "requests": []}
    routes = web.RouteTableDef()

    async def record(request: web.Request) -> None:
        stats["requests"].append(f"{request.method} {request.path}")

    async def body_of(request: web.Request) -> dict[str, Any]:
        try:
            doc = json.loads(await request.read())
        except ValueError as exc:
            raise web.HTTPBadRequest(text=json.dumps({"error": f"invalid character: {exc}"}),
                                     content_type="application/json") from None
        if not isinstance(doc, dict):
            raise web.HTTPBadRequest(text=json.dumps({"error": "json: cannot unmarshal"}),
                                     content_type="application/json")
        return doc

    def missing(model: Any, openai: bool = False) -> web.Response | None:
        if model in _MODEL_NAMES:
            return None
        message = f"model '{model or ''}' not found"
        if openai:
            return web.json_response({"error": {"message": message, "type": "not_found_error",
                                                "param": None, "code": None}}, status=404)
        return web.json_response({"error": message}, status=404)

    @routes.get("/")
    async def root(request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    @routes.get("/api/version")
    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.24.0"})

    @routes.get("/api/tags")
    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{
            "name": MODEL, "model": MODEL, "modified_at": "2026-11-01T00:00:00Z",
            "size": runner.mib << 20, "digest": "0" * 64,
            "details": {"format": "gguf", "family": "llama", "parameter_size": "7B",
                        "quantization_level": "Q4_K_M"}}]})

    @routes.post("/api/show")
    async def show(request: web.Request) -> web.Response:
        doc = await body_of(request)
        return missing(doc.get("model")) or web.json_response({
            "modelfile": f"FROM {doc.get('model')}", "details": {"family": "llama"},
            "capabilities": ["completion"], "model_info": {}, "tensors": []})

    @routes.get("/api/ps")
    async def ps(request: web.Request) -> web.Response:
        return web.json_response({"models": [runner.ps_entry()] if runner.loaded else []})

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        await record(request)
        doc = await body_of(request)
        if (refusal := missing(doc.get("model"))) is not None:
            return refusal
        try:
            keep_alive = keep_alive_seconds(doc.get("keep_alive"))
        except KeepAliveError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        empty = not doc.get("prompt") and not doc.get("messages")
        if keep_alive == 0 and empty:
            runner.unload()
            stats["unloads"] += 1
            answer: dict[str, Any] = {"model": doc["model"], "created_at": now_iso(),
                                      "done": True, "done_reason": "unload"}
            if chat:
                answer["message"] = {"role": "assistant", "content": ""}
            else:
                answer["response"] = ""
            return web.json_response(answer)
        await runner.load(keep_alive)
        if empty:  # a preload
            return web.json_response({"model": doc["model"], "created_at": now_iso(),
                                      "response": "", "done": True, "done_reason": "load"})
        options = doc.get("options") or {}
        count = int(options.get("num_predict", tokens))
        delay = float(options.get("standin_token_delay", token_delay))
        prefill = float(options.get("standin_first_delay", 0.0))
        runner.request_started()
        try:
            if prefill:
                await asyncio.sleep(prefill)  # the prompt's evaluation, before the first token

            def chunk(i: int, done: bool) -> dict[str, Any]:
                text = "" if done else f"tok{i} "
                body: dict[str, Any] = {"model": doc.get("model", MODEL),
                                        "created_at": now_iso(), "done": done}
                if chat:
                    body["message"] = {"role": "assistant", "content": text}
                else:
                    body["response"] = text
                if done:
                    body.update(done_reason="length" if "num_predict" in options else "stop",
                                eval_count=count, total_duration=1)
                return body

            if doc.get("stream") is False:
                text = "".join(f"tok{i} " for i in range(count))
                last = chunk(count, True)
                if options.get("standin_abort"):
                    # Ollama's answer when generation was cut (a token repeated too often)
                    last = {"model": doc["model"], "created_at": now_iso(), "done": False}
                if chat:
                    last["message"] = {"role": "assistant", "content": text}
                else:
                    last["response"] = text
                return web.json_response(last)
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            for i in range(count):
                await resp.write(json.dumps(chunk(i, False)).encode() + b"\n")
                if delay:
                    await asyncio.sleep(delay)
            await resp.write(json.dumps(chunk(count, True)).encode() + b"\n")
            await resp.write_eof()
            return resp
        finally:
            runner.request_ended()

    @routes.post("/api/generate")
    async def api_generate(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=False)

    @routes.post("/api/chat")
    async def api_chat(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=True)

    @routes.post("/api/embed")
    async def embed(request: web.Request) -> web.Response:
        await record(request)
        doc = await body_of(request)
        if (refusal := missing(doc.get("model"))) is not None:
            return refusal
        await runner.load(None)
        return web.json_response({"model": MODEL, "embeddings": [[0.1, 0.2, 0.3]]})

    @routes.get("/v1/models")
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "library"}]})

    @routes.post("/v1/chat/completions")
    async def completions(request: web.Request) -> web.StreamResponse:
        await record(request)
        doc = await body_of(request)
        if (refusal := missing(doc.get("model"), openai=True)) is not None:
            return refusal
        await runner.load(None)
        ident = f"chatcmpl-{uuid.uuid4().hex[:8]}"
        count = int(doc.get("max_tokens") or tokens)
        delay = float((doc.get("options") or {}).get("standin_token_delay", token_delay))
        if not doc.get("stream"):
            return web.json_response({
                "id": ident, "object": "chat.completion", "created": int(time.time()),
                "model": doc.get("model"), "system_fingerprint": "fp_ollama", "choices": [{
                    "index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant",
                        "content": "".join(f"tok{i} " for i in range(count))}}]})
        runner.request_started()
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(count):
                event = {"id": ident, "object": "chat.completion.chunk",
                         "created": int(time.time()), "model": doc.get("model"),
                         "system_fingerprint": "fp_ollama", "choices": [{
                             "index": 0, "delta": {"role": "assistant", "content": f"tok{i} "},
                             "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(event)}\n\n".encode())
                await asyncio.sleep(delay)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            runner.request_ended()

    @routes.post("/api/blobs/{digest}")
    async def blobs(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        async for part in request.content.iter_any():
            digest.update(part)
        expected = request.match_info["digest"].removeprefix("sha256:")
        return web.Response(status=201 if digest.hexdigest() == expected else 400)

    @routes.get("/standin/stats")
    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response({**stats, "loaded": runner.loaded,
                                  "runner_pid": runner.proc.pid if runner.proc else None})

    app = web.Application(client_max_size=1 << 30, middlewares=[ollama_guard, ollama_errors])
    app.add_routes(routes)
    return app


class Comfy:
    """ComfyUI's queue, history, websocket routing and cache, as the real one behaves
    (v0.8.0, measured): `/queue` rows are 5-element arrays and the pending list is a
    binary heap (not sorted); `/interrupt` acts only on the running job; `/free` only
    sets flags, acted on when idle or after the running job; identical prompts are
    answered from the cache in 0 s; a prompt's execution frames go only to the socket
    whose clientId it names, and a second socket with that id replaces the first."""

    def __init__(self, vram: Vram, job_seconds: float) -> None:
        self.vram = vram
        self.job_seconds = job_seconds
        self.pending: list[tuple[float, str, dict[str, Any]]] = []  # a heap, as ComfyUI's
        self.running: dict[str, Any] | None = None
        self.history: dict[str, Any] = {}
        self.number = 0
        self.sockets: dict[str, web.WebSocketResponse] = {}  # by clientId
        self.cache: set[str] = set()  # prompts whose outputs are cached
        self.free_asked: dict[str, bool] | None = None  # /free flags, acted on when idle
        self.interrupt = asyncio.Event()
        self.wake = asyncio.Event()
        self.stats = {"jobs_done": 0, "interrupted": 0, "frees": 0, "cached": 0}

    @staticmethod
    def row(job: dict[str, Any]) -> list[Any]:
        return [job["number"], job["id"], job["prompt"], job["extra"], job["outputs"]]

    def queue_doc(self) -> dict[str, Any]:
        return {"queue_running": [self.row(self.running)] if self.running else [],
                "queue_pending": [self.row(job) for _, _, job in self.pending]}

    async def send(self, doc: dict[str, Any], client_id: str | None = None) -> None:
        """To one client's socket, or (no client_id) to every socket."""
        targets = list(self.sockets.items()) if client_id is None else \
            [(client_id, self.sockets[client_id])] if client_id in self.sockets else []
        for sid, ws in targets:
            try:
                await ws.send_json(doc)
            except ConnectionError:
                if self.sockets.get(sid) is ws:
                    del self.sockets[sid]

    def status_msg(self) -> dict[str, Any]:
        remaining = len(self.pending) + (1 if self.running else 0)
        return {"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": remaining}}}}

    def act_on_free(self) -> None:
        """Between jobs: what /free asked for (ComfyUI's worker does it when idle)."""
        flags, self.free_asked = self.free_asked, None
        if flags is None:
            return
        if flags.get("unload_models") or flags.get("free_memory"):
            self.vram.unload()
        if flags.get("free_memory"):
            self.cache.clear()  # the next identical prompt runs again

    async def worker(self) -> None:
        while True:
            while not self.pending:
                self.act_on_free()
                self.wake.clear()
                await self.wake.wait()
            _, _, job = heapq.heappop(self.pending)
            self.running = job
            job["started_at"] = time.time()
            self.interrupt.clear()
            client = job["extra"].get("client_id")
            pid = job["id"]
            await self.send(self.status_msg())
            await self.send({"type": "execution_start",
                             "data": {"prompt_id": pid, "timestamp": int(time.time() * 1000)}},
                            client)
            key = json.dumps(job["prompt"], sort_keys=True)
            cached = key in self.cache
            await self.send({"type": "execution_cached", "data": {
                "nodes": list(job["prompt"] or {}) if cached else [], "prompt_id": pid}}, client)
            interrupted = False
            if cached:
                self.stats["cached"] += 1
            else:
                self.vram.load()
                await self.send({"type": "executing", "data": {
                    "node": "3", "display_node": "3", "prompt_id": pid}}, client)
                seconds = float(job["extra"].get("job_seconds", self.job_seconds))
                steps = 10
                for step in range(steps):
                    try:
                        await asyncio.wait_for(self.interrupt.wait(), seconds / steps)
                        interrupted = True
                        break
                    except TimeoutError:
                        await self.send({"type": "progress", "data": {
                            "value": step + 1, "max": steps, "prompt_id": pid, "node": "3"}},
                            client)
            images = [{"filename": f"{pid}.png", "subfolder": "", "type": "output"}]
            if interrupted:
                self.stats["interrupted"] += 1
                await self.send({"type": "execution_interrupted", "data": {
                    "prompt_id": pid, "node_id": "3", "node_type": "KSampler",
                    "executed": [], "timestamp": int(time.time() * 1000)}}, client)
            else:
                self.cache.add(key)
                self.stats["jobs_done"] += 1
                await self.send({"type": "executed", "data": {
                    "node": "9", "display_node": "9", "output": {"images": images},
                    "prompt_id": pid}}, client)
                await self.send({"type": "execution_success", "data": {
                    "prompt_id": pid, "timestamp": int(time.time() * 1000)}}, client)
            status = "error" if interrupted else "success"
            # On stdout too (the workload's log), since history dies with the process.
            print(json.dumps({"job": pid, "status": status, "finished_at": time.time()}),
                  flush=True)
            self.history[pid] = {"prompt": self.row(job),
                                 "outputs": {} if interrupted else {"9": {"images": images}},
                                 "status": {"status_str": status, "completed": not interrupted,
                                            "messages": []},
                                 "meta": {}, "started_at": job["started_at"],
                                 "finished_at": time.time()}
            self.running = None
            await self.send(self.status_msg())
            await self.send({"type": "executing", "data": {"node": None, "prompt_id": pid}},
                            client)

    def app(self) -> web.Application:
        routes = web.RouteTableDef()

        async def json_body(request: web.Request) -> Any:
            """ComfyUI's own json.loads: an empty or malformed body is a 500."""
            try:
                return json.loads(await request.read())
            except ValueError:
                raise web.HTTPInternalServerError(
                    text="500 Internal Server Error\n\nServer got itself in trouble") from None

        @routes.get("/")
        async def page(request: web.Request) -> web.Response:
            return web.Response(text="<!doctype html><title>ComfyUI</title><div id=app></div>",
                                content_type="text/html")

        @routes.get("/system_stats")
        async def system_stats(request: web.Request) -> web.Response:
            return web.json_response({"system": {"os": "posix", "comfyui_version": "0.8.0"},
                                      "devices": [{"name": "cuda:0", "type": "cuda"}]})

        @routes.get("/object_info")
        async def object_info(request: web.Request) -> web.Response:
            return web.json_response({"KSampler": {"input": {}, "output": ["LATENT"]}})

        @routes.post("/prompt")
        async def prompt(request: web.Request) -> web.Response:
            doc = await json_body(request)
            if not isinstance(doc, dict) or "prompt" not in doc:
                return web.json_response({"error": {
                    "type": "no_prompt", "message": "No prompt provided", "details": "",
                    "extra_info": {}}, "node_errors": {}}, status=400)
            self.number += 1
            number: float = self.number
            if "number" in doc:
                number = float(doc["number"])
            elif doc.get("front"):
                number = -self.number
            extra = {**(doc.get("extra_data") or {}),
                     "create_time": int(time.time() * 1000)}
            if doc.get("client_id"):
                extra["client_id"] = doc["client_id"]
            job: dict[str, Any] = {"id": str(doc.get("prompt_id") or uuid.uuid4()),
                                   "number": number,
                   "prompt": doc.get("prompt"), "extra": extra,
                   "outputs": list(doc.get("prompt") or {})[-1:]}
            heapq.heappush(self.pending, (number, job["id"], job))
            self.wake.set()
            await self.send(self.status_msg())
            return web.json_response({"prompt_id": job["id"], "number": number,
                                      "node_errors": {}})

        @routes.get("/queue")
        async def queue(request: web.Request) -> web.Response:
            return web.json_response(self.queue_doc())

        @routes.post("/queue")
        async def queue_edit(request: web.Request) -> web.Response:
            doc = await json_body(request)
            if doc.get("clear"):
                self.pending = []
            for pid in doc.get("delete") or []:
                self.pending = [entry for entry in self.pending if entry[1] != pid]
            heapq.heapify(self.pending)
            return web.Response()

        @routes.get("/history")
        async def history(request: web.Request) -> web.Response:
            return web.json_response(self.history)

        @routes.get("/history/{prompt_id}")
        async def history_one(request: web.Request) -> web.Response:
            pid = request.match_info["prompt_id"]
            return web.json_response({pid: self.history[pid]} if pid in self.history else {})

        @routes.post("/interrupt")
        async def interrupt(request: web.Request) -> web.Response:
            raw = await request.read()
            doc = json.loads(raw) if raw.strip() else {}
            wanted = doc.get("prompt_id") if isinstance(doc, dict) else None
            # Only the running job; a pending or unknown id is silently ignored.
            if self.running is not None and wanted in (None, self.running["id"]):
                self.interrupt.set()
            return web.Response()

        @routes.post("/free")
        async def free(request: web.Request) -> web.Response:
            doc = await json_body(request)
            self.stats["frees"] += 1
            if doc.get("unload_models") or doc.get("free_memory"):
                self.free_asked = {**(self.free_asked or {}), **doc}
                if self.running is None:
                    self.act_on_free()  # idle: at once; else after the running job
            return web.Response()

        @routes.post("/upload/image")
        async def upload(request: web.Request) -> web.Response:
            digest, size = hashlib.sha256(), 0
            async for part in request.content.iter_any():
                digest.update(part)
                size += len(part)
            return web.json_response({"name": "upload.png", "size": size,
                                      "sha256": digest.hexdigest()})

        @routes.get("/view")
        async def view(request: web.Request) -> web.StreamResponse:
            if "size" not in request.query:  # an image a browser can show
                return web.Response(body=_png(), content_type="image/png")
            size = int(request.query["size"])  # a download of that many bytes, for tests
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})
            resp.content_length = size
            await resp.prepare(request)
            block = bytes(range(256)) * 256  # 64 KiB
            sent = 0
            while sent < size:
                part = block[:min(len(block), size - sent)]
                await resp.write(part)
                sent += len(part)
            await resp.write_eof()
            return resp

        @routes.get("/ws")
        async def ws(request: web.Request) -> web.WebSocketResponse:
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            sid = request.query.get("clientId") or uuid.uuid4().hex
            self.sockets[sid] = sock  # replaces an earlier socket with this id
            await sock.send_json({**self.status_msg(), "data": {
                **self.status_msg()["data"], "sid": sid}})
            if self.running is not None and self.running["extra"].get("client_id") == sid:
                await sock.send_json({"type": "executing", "data": {
                    "node": "3", "display_node": "3", "prompt_id": self.running["id"]}})
            first = True
            async for msg in sock:
                if msg.type != WSMsgType.TEXT:
                    continue
                if first and '"feature_flags"' in msg.data:
                    await sock.send_json({"type": "feature_flags", "data": {
                        "supports_preview_metadata": True, "max_upload_size": 104857600}})
                else:
                    await sock.send_str(f"echo:{msg.data}")  # the stand-in's own, for tests
                first = False
            if self.sockets.get(sid) is sock:
                del self.sockets[sid]
            return sock

        @routes.get("/standin/stats")
        async def get_stats(request: web.Request) -> web.Response:
            return web.json_response({**self.stats, "loaded": self.vram.fd is not None,
                                      "sockets": len(self.sockets)})

        app = web.Application(client_max_size=1 << 30, middlewares=[comfyui_guard])
        app.add_routes(routes)
        # Every route also under /api, as ComfyUI serves them.
        for route in list(app.router.routes()):
            resource = route.resource
            if resource is not None and route.method != "HEAD" and \
                    not resource.canonical.startswith("/standin"):
                app.router.add_route(route.method, "/api" + resource.canonical.rstrip("/"),
                                     route.handler)
        return app


async def serve(args: argparse.Namespace) -> None:
    # A model loaded at start, as after a warm-up: Ollama's in a runner process of its
    # own, ComfyUI's in its one process.
    # Claims named by port: the same workload's next start writes over its last one.
    claim = f"{args.kind}-{args.port}"
    runner = Runner(args.ledger, args.mib, f"{claim}-runner") if args.kind == "ollama" \
        else None
    vram = Vram(args.ledger, claim, args.mib) if args.kind == "comfyui" else None
    background: list[asyncio.Task[None]] = []
    if runner is not None:
        await runner.load(None)
        await asyncio.sleep(args.start_delay)
        app = ollama_app(runner, args.tokens, args.token_delay)
    else:
        assert vram is not None
        vram.load()
        await asyncio.sleep(args.start_delay)
        comfy = Comfy(vram, args.job_seconds)
        app = comfy.app()
        background.append(asyncio.get_running_loop().create_task(comfy.worker()))
    web_runner = web.AppRunner(app, access_log=None)
    await web_runner.setup()
    await web.TCPSite(web_runner, "127.0.0.1", args.port).start()
    print(f"{args.kind} stand-in on 127.0.0.1:{args.port} (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # ComfyUI has no SIGTERM handler: it dies at once, a running job with it. (With a
    # --stop-delay, the stand-in plays a server that takes that long to stop.)
    signals = (signal.SIGINT,) if args.kind == "comfyui" and not args.stop_delay else \
        (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.sleep(args.stop_delay)
    for task in background:
        task.cancel()
    await web_runner.cleanup()
    if vram is not None:
        vram.unload()
    if runner is not None and runner.proc is not None and runner.proc.returncode is None:
        runner.proc.kill()
        await runner.proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("ollama", "comfyui"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--mib", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--job-seconds", type=float, default=2.0)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--stop-delay", type=float, default=0.0)
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
