"""The OpenAPI 3.1 document of the HTTP API (GET /v1/openapi.json)."""

from __future__ import annotations

from typing import Any

from .config import Config

__all__ = ["openapi_document"]

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "malformed JSON", 401: "missing or bad authentication",
            404: "unknown mode, workload, switch or path", 409: "conflicts with the current state",
            413: "body too large", 422: "the body or parameters do not fit the schema"}
    return {str(c): _json(_ERROR, text[c]) for c in codes}


def openapi_document(config: Config) -> dict[str, Any]:
    modes = sorted(config.all_modes())
    workloads = sorted(config.workloads)
    secured: list[dict[str, list[str]]] = [{"bearer": []}, {"standardWebhooks": []}]
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
                                 "examples": modes},
                        "gpu": {"type": ["integer", "null"], "minimum": 0, "maximum": 63},
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
                                   "error": {"type": "string"}, "pending": {"type": "boolean"}},
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
                                 "responses": {"200": _json({"type": "object"}, "alive")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "security": secured if config.api.metrics_auth else [],
                                 "responses": {"200": {"description": "text exposition",
                                                       "content": {"text/plain": {}}},
                                               **_errors(401)}}},
            "/v1/status": {"get": {
                "summary": "GPUs, tiers, modes, workloads, blocks", "security": secured,
                "responses": {"200": _json({"$ref": "#/components/schemas/Status"}, "status"),
                              **_errors(401)}}},
            "/v1/mode": {
                "get": {"summary": "each GPU's mode", "security": secured,
                        "responses": {"200": _json({"type": "object"}, "modes"),
                                      **_errors(401)}},
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
                        **_errors(400, 401, 404, 409, 413, 422)},
                },
            },
            "/v1/switches/{id}": {"get": {
                "summary": "a switch by the id POST /v1/mode gave: under way, or its result",
                "security": secured,
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json({"$ref": "#/components/schemas/SwitchState"},
                                           "the switch"),
                              **_errors(401, 404)}}},
            "/v1/workloads/{name}/unblock": {"post": {
                "summary": "lift a crash-loop block (409 unless VRAM is clear)",
                "security": secured,
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "examples": workloads}}],
                "responses": {"200": _json({"type": "object"}, "unblocked"),
                              **_errors(401, 404, 409)}}},
            "/v1/events": {"get": {
                "summary": "recent events (bounded ring), oldest first", "security": secured,
                "parameters": [
                    {"name": "since", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 0}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
                "responses": {"200": _json({"type": "object"}, "events"),
                              **_errors(400, 401, 422)}}},
            "/v1/openapi.json": {"get": {"summary": "this document", "security": secured,
                                         "responses": {"200": _json({"type": "object"},
                                                                    "OpenAPI 3.1")}}},
        },
    }
