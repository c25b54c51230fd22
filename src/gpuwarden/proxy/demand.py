"""Which requests need the GPU: demand switches the mode, traffic does not.

llama-swap counts every request, so ComfyUI's websocket or a model list held a mode
(its issues #707, #1001). Here only work counts: a generation, a chat, an embedding
or a model load for Ollama, a queued prompt for ComfyUI. Everything else is answered
by the upstream while it runs, and while it does not, from the last answer seen
(reads a client needs before it can send demand, such as Open WebUI's model list), by
a local answer that is true of a stopped upstream (nothing loaded, nothing queued),
or with a 503 that says which mode is active.
"""

from __future__ import annotations

import enum
import json
import time
from typing import Any

__all__ = ["Kind", "classify", "local_answer", "reads_body"]


class Kind(enum.Enum):
    DEMAND = "demand"  # needs the GPU: waits for its mode
    READ = "read"  # the upstream's answer while it runs, else the last one seen
    LOCAL = "local"  # the upstream's answer while it runs, else one made here
    OTHER = "other"  # the upstream's answer while it runs, else 503


_OLLAMA_DEMAND = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
})
_OLLAMA_READ_GET = frozenset({"/", "/api/tags", "/api/version", "/v1/models"})
# ComfyUI serves its API both at the root and under /api (its newer frontend).
_COMFY_PROMPT = frozenset({"/prompt", "/api/prompt"})
_COMFY_QUEUE = frozenset({"/queue", "/api/queue"})
_COMFY_NOT_CACHED = frozenset({"/ws", "/api/ws"}) | _COMFY_QUEUE
# Bodies read before classifying (Ollama's small JSON requests); others stream.
_OLLAMA_BODY = frozenset({"/api/generate", "/api/chat", "/api/show"})


def reads_body(api: str, method: str, path: str) -> bool:
    """Whether the request's body decides its kind, or, for a ComfyUI prompt, names the
    page socket its progress goes to (read it before classifying)."""
    if method != "POST":
        return False
    return path in _OLLAMA_BODY if api == "ollama" else path in ("/prompt", "/api/prompt")


def _is_unload(body: Any) -> bool:
    """`keep_alive: 0` with nothing to generate: Ollama unloads the model."""
    if not isinstance(body, dict):
        return False
    keep_alive = body.get("keep_alive")
    if keep_alive not in (0, "0", "0s", "0m"):
        return False
    return not body.get("prompt") and not body.get("messages")


def _json(body: bytes | None) -> Any:
    try:
        return json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None


def classify(api: str, method: str, path: str, body: bytes | None = None) -> Kind:
    """The kind of one request to an Ollama (`api = "ollama"`) or ComfyUI upstream."""
    if api == "ollama":
        if method == "POST" and path in _OLLAMA_DEMAND:
            if path in ("/api/generate", "/api/chat") and _is_unload(_json(body)):
                return Kind.LOCAL
            return Kind.DEMAND
        if method in ("GET", "HEAD") and (path in _OLLAMA_READ_GET
                                          or path.startswith("/v1/models/")):
            return Kind.READ
        if method == "POST" and path == "/api/show":
            return Kind.READ
        if method in ("GET", "HEAD") and path == "/api/ps":
            return Kind.LOCAL
        return Kind.OTHER
    if method == "POST" and path in _COMFY_PROMPT:
        return Kind.DEMAND
    if method in ("GET", "HEAD") and path in _COMFY_QUEUE:
        return Kind.LOCAL
    if method in ("GET", "HEAD") and path not in _COMFY_NOT_CACHED:
        return Kind.READ  # the page, its assets, /object_info, /history, ...
    return Kind.OTHER


def local_answer(api: str, path: str, body: bytes | None) -> dict[str, Any]:
    """What the upstream would answer while stopped: no model loaded, no job queued,
    an unload of a model that is not loaded done."""
    if api == "comfyui":
        return {"queue_running": [], "queue_pending": []}
    if path == "/api/ps":
        return {"models": []}
    doc = _json(body)
    model = doc.get("model", "") if isinstance(doc, dict) else ""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if path == "/api/chat":
        return {"model": model, "created_at": now, "message": {"role": "assistant",
                                                               "content": ""},
                "done_reason": "unload", "done": True}
    return {"model": model, "created_at": now, "response": "", "done": True,
            "done_reason": "unload"}
