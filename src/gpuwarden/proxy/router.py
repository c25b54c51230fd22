"""The model router: one OpenAI-compatible address (`[router] listen`) in front of
every workload that names its `models`, as llama-swap is in front of llama.cpp.

A request's `model` picks the workload, whatever its Content-Type. A model whose mode
is active goes straight through; any other is demand, through the same scheduler,
proofs, refusals and audit as the demand proxies (`requested_by = router:<client>`).
`GET /v1/models` lists every configured model and is answered here, also while the
engines are stopped. An unknown model gets OpenAI's error shape with 404, as does
every other error here.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..api_server import ConnectionBudget, Door, serve, track_requests
from ..config import Config, parse_listen
from .browser import BrowserPolicy
from .server import BodyStalled, Overload, WorkloadProxy, continue_if_expected, read_body

if TYPE_CHECKING:
    from ..events import EventBus
    from ..metrics import Metrics

__all__ = ["ROUTED_PATHS", "ModelRouter"]

# What carries a model in a JSON body and does GPU work: routed by model, as demand.
# (A multipart upload, such as /v1/audio/transcriptions, is not.)
ROUTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                          "/v1/rerank", "/v1/audio/speech", "/v1/images/generations"})


def openai_error(status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> web.Response:
    """An error as OpenAI's API and llama.cpp's server write one."""
    return web.json_response({"error": {"message": message, "type": kind, "param": param,
                                        "code": code}}, status=status, headers=headers)


class ModelRouter:
    def __init__(self, config: Config, lanes: dict[str, WorkloadProxy], bus: EventBus,
                 metrics: Metrics | None, max_connections: int | None = None) -> None:
        """`lanes`: the way to each routed workload, by workload name."""
        router = config.router
        assert router.listen is not None, "a router needs [router] listen"
        self.listen = router.listen
        address = parse_listen(router.listen)
        assert address is not None, "checked with the config"
        self._address = address
        self.browser = BrowserPolicy(address[0], address[1],
                                     allowed_hosts=router.allowed_hosts,
                                     allowed_origins=router.allowed_origins)
        self._models = config.routed_models()
        self.lanes = lanes
        self._body_timeout = router.body_timeout
        self._idle_timeout = router.idle_timeout
        self.overload = Overload("router", bus, metrics)
        self.budget = ConnectionBudget(
            "router", max_connections or router.max_connections,
            idle_timeout=router.idle_timeout,
            on_refused=lambda door: self.overload.record("refused", self.budget.limit,
                                                         self.budget.open),
            on_cut=lambda door, why: self.overload.record(why, self.budget.limit,
                                                          self.budget.open))
        created = int(time.time())
        # Answered from memory: the list does not change while the daemon runs.
        self._model_list = json.dumps({"object": "list", "data": [
            {"id": model, "object": "model", "created": created, "owned_by": workload}
            for model, workload in self._models.items()]}).encode()
        self._model_docs = {model: json.dumps({"id": model, "object": "model",
                                               "created": created, "owned_by": workload})
                            .encode() for model, workload in self._models.items()}
        self._door: Door | None = None
        self.counts = {"routed": 0, "listed": 0, "unknown_model": 0, "forbidden": 0,
                       "bad_request": 0}

    async def start(self) -> None:
        for lane in self.lanes.values():
            lane.open_session()
        self._door = await serve(track_requests(self.budget, self._handle), self.budget,
                                 idle_timeout=2 * self._idle_timeout,
                                 host=self._address[0], port=self._address[1],
                                 handler_cancellation=True)

    async def close(self) -> None:
        if self._door is not None:
            await self._door.runner.cleanup()
        for lane in self.lanes.values():
            await lane.close()

    def status(self) -> dict[str, Any]:
        return {"listen": self.listen, "models": dict(self._models), **self.counts,
                "connections": {"open": self.budget.open, "max": self.budget.limit,
                                "refused": self.overload.refused,
                                "cut": dict(self.overload.cut)},
                "workloads": {name: {**lane.demand_state(), **lane.counts}
                              for name, lane in self.lanes.items()}}

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        verdict = self.browser.check(request.headers.get("Host"),
                                     request.headers.get("Origin"))
        if not verdict.allowed:
            self.counts["forbidden"] += 1
            return openai_error(403, f"forbidden: {verdict.reason}", code="forbidden")
        if (refused := await continue_if_expected(request)) is not None:
            return refused
        method, path = request.method, request.path
        if method in ("GET", "HEAD") and path == "/v1/models":
            self.counts["listed"] += 1
            return web.Response(body=self._model_list, content_type="application/json")
        if method in ("GET", "HEAD") and path == "/health":
            return web.Response(text="OK")  # as llama-swap answers its health checks
        if method in ("GET", "HEAD") and path.startswith("/v1/models/"):
            doc = self._model_docs.get(path.removeprefix("/v1/models/"))
            if doc is None:
                return self._unknown(path.removeprefix("/v1/models/"))
            return web.Response(body=doc, content_type="application/json")
        if method == "OPTIONS":
            return WorkloadProxy.preflight(request)
        if path not in ROUTED_PATHS:
            self.counts["bad_request"] += 1
            return openai_error(404, f"the router serves /v1/models, /health and, by model, "
                                f"{', '.join(sorted(ROUTED_PATHS))}; not {method} {path}",
                                code="unknown_route")
        if method != "POST":
            self.counts["bad_request"] += 1
            return openai_error(405, f"{path} takes POST", headers={"Allow": "POST"})
        try:
            body = await read_body(request, self._body_timeout)
        except BodyStalled:
            self.overload.record("body", self.budget.limit, self.budget.open)
            return openai_error(408, f"request body paused longer than "
                                f"{self._body_timeout:g} s (body_timeout)",
                                headers={"Connection": "close"})
        try:
            model = _model_of(body)
        except ValueError as exc:
            self.counts["bad_request"] += 1
            return openai_error(400, f"the body is not JSON ({exc}); it must be a JSON "
                                "object with a \"model\"", param="model")
        if model is None:
            self.counts["bad_request"] += 1
            return openai_error(400, "the body must be a JSON object with a \"model\" "
                                "(a string)", param="model")
        workload = self._models.get(model)
        if workload is None:
            return self._unknown(model)
        self.counts["routed"] += 1
        return await self.lanes[workload].route(request, body)

    def _unknown(self, model: str) -> web.Response:
        self.counts["unknown_model"] += 1
        known = ", ".join(sorted(self._models)) or "none"
        return openai_error(404, f"The model `{model}` does not exist (models here: "
                            f"{known})", param="model", code="model_not_found")


def _model_of(body: bytes) -> str | None:
    """The request's "model", read whatever the Content-Type (llama-swap needs
    application/json to find it). Raises ValueError: the body is not JSON."""
    doc = json.loads(body)  # UnicodeDecodeError is a ValueError too
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) and model else None
