"""The OpenAPI 3.1 document of the HTTP API (GET /v1/openapi.json)."""

from __future__ import annotations

from typing import Any

from .config import Config

__all__ = ["openapi_document"]

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR_TEXT = {
    400: "malformed request (JSON, or more than one Authorization header)",
    401: "missing or bad authentication", 404: "unknown mode, workload, switch or path",
    408: "the body did not arrive within [api] body_timeout",
    409: "refused: conflicts with the current state (figures in detail)",
    413: "body larger than [api] max_body_bytes", 415: "the body is not application/json",
    422: "the body or parameters do not fit the schema",
    429: "too many failed authentications from this address (see Retry-After)",
    503: "the door's connection budget is full, or a webhook-id cannot be recorded",
}


def _errors(*codes: int, secured: bool = True) -> dict[str, Any]:
    """The error answers of a route: its own, plus what any route behind auth, or any
    route at all (a full connection budget), can answer."""
    every = {*codes, 503} | ({400, 401, 429} if secured else set())
    return {str(c): _json(_ERROR, _ERROR_TEXT[c]) for c in sorted(every)}


def openapi_document(config: Config) -> dict[str, Any]:
    modes = sorted(config.all_modes())
    workloads = sorted(config.workloads)
    secured: list[dict[str, list[str]]] = [{"bearer": []}, {"standardWebhooks": []}]
    metrics_auth = config.api.metrics_need_auth()
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpuwarden", "version": "1",
                 "description": "Owns a shared GPU node: exclusive GPU modes with verified "
                                "VRAM release, VRAM alerts, crash-loop guard."},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "standardWebhooks": {"type": "apiKey", "in": "header",
                                     "name": "webhook-signature",
                                     "description": "v1,<base64 HMAC-SHA256 of "
                                                    "webhook-id.webhook-timestamp.body>"},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}, "detail": {}}},
                "SwitchRequest": {
                    "type": "object", "required": ["mode"], "additionalProperties": False,
                    "properties": {
                        "mode": {"type": "string", "minLength": 1, "maxLength": 64,
                                 "enum": modes},
                        "gpu": {"type": ["integer", "null"], "minimum": 0, "maximum": 63,
                                "description": "default: the GPU the mode is defined on"},
                        "force": {"type": "boolean", "default": False},
                    },
                },
                "SwitchResult": {
                    "type": "object", "required": ["ok"],
                    "properties": {"ok": {"type": "boolean"}, "gpu": {"type": "integer"},
                                   "from": {"type": ["string", "null"]},
                                   "to": {"type": "string"}, "id": {"type": "string"},
                                   "timings": {"type": "object"},
                                   "started": {"type": "array", "items": {"type": "string"}},
                                   "stopped": {"type": "array", "items": {"type": "string"}},
                                   "error": {"type": "string"}, "pending": {"type": "boolean"},
                                   "limit_s": {
                                       "type": ["number", "null"],
                                       "description": "pending: the longest the switch may "
                                       "take if every step uses its whole timeout"}},
                },
                "SwitchState": {
                    "type": "object", "required": ["done", "id"],
                    "description": "done=false: under way, with its step; done=true: the "
                                   "SwitchResult fields",
                    "properties": {"done": {"type": "boolean"}, "id": {"type": "string"},
                                   "step": {"type": "string"}, "ok": {"type": "boolean"}},
                },
                "Status": {"type": "object", "required": ["gpus", "workloads", "modes"],
                           "properties": {"gpus": {"type": "array"},
                                          "workloads": {"type": "array"},
                                          "modes": {"type": "object"}}},
            },
        },
        "paths": {
            "/healthz": {"get": {"summary": "liveness", "security": [],
                                 "responses": {"200": _json({"type": "object"}, "alive"),
                                               **_errors(secured=False)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "security": secured if metrics_auth else [],
                                 "responses": {"200": {"description": "text exposition",
                                                       "content": {"text/plain": {}}},
                                               **_errors(secured=metrics_auth)}}},
            "/v1/status": {"get": {
                "summary": "GPUs, tiers, modes, workloads, blocks", "security": secured,
                "responses": {"200": _json({"$ref": "#/components/schemas/Status"}, "status"),
                              **_errors()}}},
            "/v1/mode": {
                "get": {"summary": "each GPU's mode", "security": secured,
                        "responses": {"200": _json({"type": "object"}, "modes"),
                                      **_errors()}},
                "post": {
                    "summary": "switch a GPU's mode", "security": secured,
                    "parameters": [{"name": "wait", "in": "query", "required": False,
                                    "schema": {"type": "boolean", "default": True}}],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/SwitchRequest"}}}},
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/SwitchResult"}, "done"),
                        "202": _json({"$ref": "#/components/schemas/SwitchResult"},
                                     "under way (wait=false)"),
                        **_errors(404, 408, 409, 413, 415, 422)},
                },
            },
            "/v1/switches/{id}": {"get": {
                "summary": "a switch by the id POST /v1/mode gave: under way, or its result",
                "security": secured,
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json({"$ref": "#/components/schemas/SwitchState"},
                                           "the switch"),
                              **_errors(404)}}},
            "/v1/reload": {"post": {
                "summary": "read the config file again: thresholds, API tokens and Discord "
                           "allowlists change live; other changes are named as needing a "
                           "restart (409 when the file has problems: nothing changes)",
                "security": secured,
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "additionalProperties": False}}}},
                "responses": {"200": _json({"type": "object", "properties": {
                    "ok": {"type": "boolean"},
                    "applied": {"type": "array", "items": {"type": "string"}},
                    "needs_restart": {"type": "array", "items": {"type": "string"}},
                    "message": {"type": "string"}}}, "reloaded"),
                    **_errors(409, 413, 415, 422)}}},
            "/v1/workloads/{name}/unblock": {"post": {
                "summary": "lift a crash-loop block (409 unless VRAM is clear)",
                "security": secured,
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": workloads}}],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "additionalProperties": False,
                               "maxProperties": 0}}}},
                "responses": {"200": _json({"type": "object"}, "unblocked"),
                              **_errors(404, 408, 409, 413, 415, 422)}}},
            "/v1/events": {"get": {
                "summary": "recent events (bounded ring), oldest first, or followed live",
                "security": secured,
                "parameters": [
                    {"name": "since", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 0}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
                "responses": {"200": {
                    "description": "events; with Accept: text/event-stream, a stream of "
                                   "them (after `since`, or from now without it) as they "
                                   "are published, with a comment line every 15 s",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
                              **_errors(422)}}},
            "/v1/openapi.json": {"get": {"summary": "this document", "security": secured,
                                         "responses": {"200": _json({"type": "object"},
                                                                    "OpenAPI 3.1"),
                                                       **_errors()}}},
        },
    }
