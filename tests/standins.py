"""Local HTTP servers that implement the documented Ollama and ComfyUI endpoints.

Real servers on loopback (aiohttp in a thread), recording every call, so the release
calls gpuwarden makes can be checked. Shapes follow ../shared/reference.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now on 127.0.0.1, never one this process was given before: the
    kernel may offer a closed port again at once, and two addresses of one config
    (two proxies, say) must differ."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class StandIn:
    """Base: runs an aiohttp app on 127.0.0.1:<port> in a thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.calls: list[tuple[str, str, Any]] = []
        self.delay: dict[str, float] = {}  # path -> seconds to wait before answering
        self.up = True  # False: every request fails with 503
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def start(self) -> StandIn:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record])
        self.routes(app)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.calls.append((request.method, request.path, body))
        if request.path in self.delay:
            await asyncio.sleep(self.delay[request.path])
        if not self.up:
            return web.json_response({"error": "down"}, status=503)
        response: web.StreamResponse = await handler(request)
        return response

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.calls if method is None or m == method]

    def stop(self) -> None:
        claims = getattr(self, "claims", None)
        if claims is not None:
            claims.release_all()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class ClaimHolder:
    """Holds simulated VRAM from this process, like a server holding a loaded model."""

    def __init__(self, ledger: Path | None) -> None:
        self.ledger = ledger
        self.fds: dict[str, int] = {}

    def hold(self, name: str, mib: int) -> None:
        if self.ledger is None or name in self.fds:
            return
        self.ledger.mkdir(parents=True, exist_ok=True)
        path = self.ledger / f"{name}.mib"
        path.write_text(f"{mib}\n")
        self.fds[name] = os.open(path, os.O_RDONLY)

    def release(self, name: str) -> None:
        fd = self.fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def release_all(self) -> None:
        for name in list(self.fds):
            self.release(name)


class OllamaStandIn(StandIn):
    """With a ledger, each loaded model holds `model_mib` of simulated VRAM until unloaded."""

    def __init__(self, models: list[str] | None = None, *, ledger: Path | None = None,
                 model_mib: int = 0) -> None:
        super().__init__()
        self.loaded = list(models or ["llama3.2:latest"])
        self.claims = ClaimHolder(ledger)
        for model in self.loaded:
            self.claims.hold(f"ollama-model-{model.replace(':', '_')}", model_mib)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/generate", self._generate)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.5.1"})

    async def _ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"name": m, "model": m, "size": 5137025024, "size_vram": 5137025024,
             "expires_at": "2024-06-04T14:38:31.83753-07:00", "details": {}}
            for m in self.loaded]})

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("keep_alive") == 0 and body.get("model") in self.loaded:
            self.loaded.remove(body["model"])
            self.claims.release(f"ollama-model-{body['model'].replace(':', '_')}")
        return web.json_response({"model": body.get("model"), "created_at": time.time(),
                                  "response": "", "done": True, "done_reason": "unload"})


class ComfyStandIn(StandIn):
    """With a ledger, its model cache holds `cache_mib` of simulated VRAM until /free."""

    def __init__(self, *, ledger: Path | None = None, cache_mib: int = 0) -> None:
        super().__init__()
        self.running: list[Any] = []
        self.pending: list[Any] = []
        self.claims = ClaimHolder(ledger)
        self.claims.hold("comfy-cache", cache_mib)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/queue", self._queue)
        app.router.add_post("/free", self._free)
        app.router.add_post("/interrupt", self._interrupt)
        app.router.add_get("/system_stats", self._stats)

    async def _queue(self, request: web.Request) -> web.Response:
        return web.json_response({"queue_running": self.running, "queue_pending": self.pending})

    async def _free(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("unload_models") or body.get("free_memory"):
            self.claims.release_all()
        return web.Response(status=200)

    async def _interrupt(self, request: web.Request) -> web.Response:
        self.running.clear()
        return web.Response(status=200)

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"system": {"os": "posix", "comfyui_version": "0.3"},
                                  "devices": [{"name": "cuda:0", "type": "cuda", "index": 0,
                                               "vram_total": 21474836480,
                                               "vram_free": 21474836480}]})
