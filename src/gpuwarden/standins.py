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
`options.standin_token_delay` between them),
`keep_alive: 0` unload (gives the model's VRAM back; the next request loads it),
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
import ipaddress
import json
import os
import signal
import socket
import time
import uuid
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
        self.path = ledger / f"{name}-{os.getpid()}.mib"
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
    return await handler(request)


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


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def ollama_app(vram: Vram, tokens: int, token_delay: float) -> web.Application:
    stats: dict[str, Any] = {"unloads": 0, "requests": []}
    routes = web.RouteTableDef()

    async def record(request: web.Request) -> None:
        stats["requests"].append(f"{request.method} {request.path}")

    @routes.get("/")
    async def root(request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    @routes.get("/api/version")
    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.3"})

    @routes.get("/api/tags")
    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{
            "name": MODEL, "model": MODEL, "modified_at": "2026-11-01T00:00:00Z",
            "size": vram.mib << 20, "digest": "0" * 64,
            "details": {"format": "gguf", "family": "llama", "parameter_size": "7B",
                        "quantization_level": "Q4_K_M"}}]})

    @routes.post("/api/show")
    async def show(request: web.Request) -> web.Response:
        doc = await request.json()
        return web.json_response({"modelfile": f"FROM {doc.get('model')}",
                                  "details": {"family": "llama"}, "capabilities": ["completion"]})

    @routes.get("/api/ps")
    async def ps(request: web.Request) -> web.Response:
        models = [] if vram.fd is None else [{"name": MODEL, "model": MODEL,
                                              "size_vram": vram.mib << 20}]
        return web.json_response({"models": models})

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        await record(request)
        doc = await request.json()
        if doc.get("keep_alive") in (0, "0") and not doc.get("prompt") and \
                not doc.get("messages"):
            vram.unload()
            stats["unloads"] += 1
            return web.json_response({"model": doc.get("model"), "created_at": now_iso(),
                                      "response": "", "done": True, "done_reason": "unload"})
        vram.load()
        options = doc.get("options") or {}
        count = int(options.get("num_predict", tokens))
        delay = float(options.get("standin_token_delay", token_delay))
        prefill = float(options.get("standin_first_delay", 0.0))
        if prefill:
            await asyncio.sleep(prefill)  # the prompt's evaluation, before the first token

        def chunk(i: int, done: bool) -> dict[str, Any]:
            text = "" if done else f"tok{i} "
            body: dict[str, Any] = {"model": doc.get("model", MODEL), "created_at": now_iso(),
                                    "done": done}
            if chat:
                body["message"] = {"role": "assistant", "content": text}
            else:
                body["response"] = text
            if done:
                body.update(done_reason="stop", eval_count=count, total_duration=1)
            return body

        if doc.get("stream") is False:
            text = "".join(f"tok{i} " for i in range(count))
            last = chunk(count, True)
            if chat:
                last["message"]["content"] = text
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

    @routes.post("/api/generate")
    async def api_generate(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=False)

    @routes.post("/api/chat")
    async def api_chat(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=True)

    @routes.post("/api/embed")
    async def embed(request: web.Request) -> web.Response:
        await record(request)
        vram.load()
        return web.json_response({"model": MODEL, "embeddings": [[0.1, 0.2, 0.3]]})

    @routes.get("/v1/models")
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "library"}]})

    @routes.post("/v1/chat/completions")
    async def completions(request: web.Request) -> web.StreamResponse:
        await record(request)
        doc = await request.json()
        vram.load()
        ident = f"chatcmpl-{uuid.uuid4().hex[:8]}"
        if not doc.get("stream"):
            return web.json_response({
                "id": ident, "object": "chat.completion", "created": int(time.time()),
                "model": doc.get("model"), "choices": [{
                    "index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant",
                        "content": "".join(f"tok{i} " for i in range(tokens))}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(tokens):
            event = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": doc.get("model"), "choices": [{
                         "index": 0, "delta": {"role": "assistant", "content": f"tok{i} "},
                         "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            await asyncio.sleep(token_delay)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @routes.post("/api/blobs/{digest}")
    async def blobs(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        async for part in request.content.iter_any():
            digest.update(part)
        expected = request.match_info["digest"].removeprefix("sha256:")
        return web.Response(status=201 if digest.hexdigest() == expected else 400)

    @routes.get("/standin/stats")
    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response({**stats, "loaded": vram.fd is not None})

    app = web.Application(client_max_size=1 << 30, middlewares=[ollama_guard])
    app.add_routes(routes)
    return app


class Comfy:
    def __init__(self, vram: Vram, job_seconds: float) -> None:
        self.vram = vram
        self.job_seconds = job_seconds
        self.pending: list[dict[str, Any]] = []
        self.running: dict[str, Any] | None = None
        self.history: dict[str, Any] = {}
        self.number = 0
        self.sockets: set[web.WebSocketResponse] = set()
        self.interrupt = asyncio.Event()
        self.wake = asyncio.Event()
        self.stats = {"jobs_done": 0, "interrupted": 0, "frees": 0}

    def queue_doc(self) -> dict[str, Any]:
        def row(job: dict[str, Any]) -> list[Any]:
            return [job["number"], job["id"], job["prompt"], {}, []]
        return {"queue_running": [row(self.running)] if self.running else [],
                "queue_pending": [row(j) for j in self.pending]}

    async def broadcast(self, doc: dict[str, Any]) -> None:
        for ws in list(self.sockets):
            try:
                await ws.send_json(doc)
            except ConnectionError:
                self.sockets.discard(ws)

    def status_msg(self) -> dict[str, Any]:
        remaining = len(self.pending) + (1 if self.running else 0)
        return {"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": remaining}}}}

    async def worker(self) -> None:
        while True:
            while not self.pending:
                self.wake.clear()
                await self.wake.wait()
            job = self.pending.pop(0)
            self.running = job
            job["started_at"] = time.time()
            self.interrupt.clear()
            self.vram.load()
            await self.broadcast({"type": "executing", "data": {"prompt_id": job["id"],
                                                                "node": "3"}})
            seconds = float(job["extra"].get("job_seconds", self.job_seconds))
            steps = 10
            interrupted = False
            for step in range(steps):
                try:
                    await asyncio.wait_for(self.interrupt.wait(), seconds / steps)
                    interrupted = True
                    break
                except TimeoutError:
                    await self.broadcast({"type": "progress", "data": {
                        "value": step + 1, "max": steps, "prompt_id": job["id"]}})
            status = "error" if interrupted else "success"
            self.stats["interrupted" if interrupted else "jobs_done"] += 1
            self.history[job["id"]] = {"prompt": [job["number"], job["id"], job["prompt"]],
                                       "outputs": {} if interrupted else {"9": {"images": [
                                           {"filename": f"{job['id']}.png", "type": "output"}]}},
                                       "status": {"status_str": status, "completed":
                                                  not interrupted},
                                       "started_at": job["started_at"],
                                       "finished_at": time.time()}
            self.running = None
            await self.broadcast({"type": "executing", "data": {"prompt_id": job["id"],
                                                                "node": None}})
            await self.broadcast(self.status_msg())

    def app(self) -> web.Application:
        routes = web.RouteTableDef()

        @routes.get("/")
        async def page(request: web.Request) -> web.Response:
            return web.Response(text="<!doctype html><title>ComfyUI</title><div id=app></div>",
                                content_type="text/html")

        @routes.get("/system_stats")
        async def system_stats(request: web.Request) -> web.Response:
            return web.json_response({"system": {"os": "posix", "comfyui_version": "0.3.60"},
                                      "devices": [{"name": "cuda:0", "type": "cuda"}]})

        @routes.get("/object_info")
        async def object_info(request: web.Request) -> web.Response:
            return web.json_response({"KSampler": {"input": {}, "output": ["LATENT"]}})

        @routes.post("/prompt")
        async def prompt(request: web.Request) -> web.Response:
            doc = await request.json()
            self.number += 1
            job = {"id": str(uuid.uuid4()), "number": self.number, "prompt": doc.get("prompt"),
                   "extra": doc.get("extra_data") or {}}
            self.pending.append(job)
            self.wake.set()
            await self.broadcast(self.status_msg())
            return web.json_response({"prompt_id": job["id"], "number": job["number"],
                                      "node_errors": {}})

        @routes.get("/queue")
        async def queue(request: web.Request) -> web.Response:
            return web.json_response(self.queue_doc())

        @routes.get("/history")
        async def history(request: web.Request) -> web.Response:
            return web.json_response(self.history)

        @routes.get("/history/{prompt_id}")
        async def history_one(request: web.Request) -> web.Response:
            pid = request.match_info["prompt_id"]
            return web.json_response({pid: self.history[pid]} if pid in self.history else {})

        @routes.post("/interrupt")
        async def interrupt(request: web.Request) -> web.Response:
            self.interrupt.set()
            return web.Response()

        @routes.post("/free")
        async def free(request: web.Request) -> web.Response:
            self.stats["frees"] += 1
            if self.running is None:
                self.vram.unload()
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
            size = int(request.query.get("size", "1024"))
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
            self.sockets.add(sock)
            await sock.send_json({**self.status_msg(), "data": {
                **self.status_msg()["data"], "sid": request.query.get("clientId", "x")}})
            async for msg in sock:
                if msg.type == WSMsgType.TEXT:
                    await sock.send_str(f"echo:{msg.data}")
            self.sockets.discard(sock)
            return sock

        @routes.get("/standin/stats")
        async def get_stats(request: web.Request) -> web.Response:
            return web.json_response({**self.stats, "loaded": self.vram.fd is not None,
                                      "sockets": len(self.sockets)})

        app = web.Application(client_max_size=1 << 30, middlewares=[comfyui_guard])
        app.add_routes(routes)
        return app


async def serve(args: argparse.Namespace) -> None:
    vram = Vram(args.ledger, args.kind, args.mib)
    vram.load()  # a model loaded at start, as after a warm-up
    await asyncio.sleep(args.start_delay)
    background: list[asyncio.Task[None]] = []
    if args.kind == "ollama":
        app = ollama_app(vram, args.tokens, args.token_delay)
    else:
        comfy = Comfy(vram, args.job_seconds)
        app = comfy.app()
        background.append(asyncio.get_running_loop().create_task(comfy.worker()))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(f"{args.kind} stand-in on 127.0.0.1:{args.port} (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.sleep(args.stop_delay)
    for task in background:
        task.cancel()
    await runner.cleanup()
    vram.unload()


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
