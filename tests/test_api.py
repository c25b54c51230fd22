"""The HTTP API on a real loopback listener, driven by httpx."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from .conftest import SimNode, hold_argv, two_process_modes
from .standins import free_port

TOKEN = "n8n-token-" + "x" * 30
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode()


def api_config(node: SimNode, port: int, **extra: Any) -> Path:
    # Tests that send wrong credentials on purpose lift the per-address limit on
    # failed attempts; test_failed_authentications_are_limited keeps the default.
    api = {"listen": f"127.0.0.1:{port}", "signing_secret": SECRET, "max_body_bytes": 2048,
           "auth_failure_burst": 100_000, **extra.pop("api", {})}
    extra.setdefault("api.tokens.n8n", {"token": TOKEN})
    return node.write(**two_process_modes(node, api=api, **extra))


@pytest.fixture
def api(node: SimNode, start_daemon) -> Any:
    port = free_port()
    config = api_config(node, port)
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    yield daemon, client
    client.close()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def signed(body: bytes, *, secret: str = SECRET, msg_id: str | None = None,
           when: datetime | None = None, method: str = "POST",
           target: str = "/v1/mode") -> dict[str, str]:
    """Headers signing one request: id.timestamp.METHOD.target.body (README)."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    stamp = int((when or datetime.now(tz=UTC)).timestamp())
    to_sign = f"{msg_id}.{stamp}.{method}.{target}.".encode() + body
    key = base64.b64decode(secret.removeprefix("whsec_"))
    sig = base64.b64encode(hmac.new(key, to_sign, hashlib.sha256).digest()).decode()
    return {"webhook-id": msg_id, "webhook-timestamp": str(stamp),
            "webhook-signature": f"v1,{sig}", "content-type": "application/json"}


def switches(daemon: Any) -> int:
    return len(daemon.events("mode.switch.started"))


def test_every_endpoint(api: Any) -> None:
    daemon, client = api
    assert client.get("/healthz").json() == {"ok": True}
    status = client.get("/v1/status", headers=auth())
    assert status.status_code == 200 and status.json()["gpus"][0]["mode"] == "llm"
    modes = client.get("/v1/mode", headers=auth()).json()
    assert modes["gpus"][0]["mode"] == "llm" and "image" in modes["gpus"][0]["modes"]

    done = client.post("/v1/mode", json={"mode": "image"}, headers=auth())
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["ok"] and body["from"] == "llm" and body["to"] == "image"
    assert set(body["timings"]) >= {"stop_s", "release_s", "start_s", "total_s"}
    completed = daemon.wait_event("mode.switch.completed", to="image")[0]
    assert completed["requested_by"] == "api:n8n"

    pending = client.post("/v1/mode", params={"wait": "false"}, json={"mode": "llm"},
                          headers=auth())
    assert pending.status_code == 202 and pending.json()["id"]
    daemon.wait_mode("llm")

    events = client.get("/v1/events", params={"since": 0}, headers=auth()).json()["events"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(ids) > 5
    later = client.get("/v1/events", params={"since": ids[-3]}, headers=auth()).json()
    assert [e["id"] for e in later["events"]] == ids[-2:]

    unblock = client.post("/v1/workloads/comfyui/unblock", headers=auth())
    # Process workloads do not restart on their own: none is ever blocked.
    assert unblock.status_code == 409 and "is not blocked" in unblock.json()["error"]
    unknown = client.post("/v1/workloads/nosuch/unblock", headers=auth())
    assert unknown.status_code == 404 and "unknown workload 'nosuch'" in unknown.json()["error"]

    spec = client.get("/v1/openapi.json", headers=auth()).json()
    assert spec["openapi"].startswith("3.1")
    assert {"/v1/status", "/v1/mode", "/v1/events", "/v1/workloads/{name}/unblock",
            "/healthz", "/metrics"} <= set(spec["paths"])

    deadline = time.monotonic() + 10
    while True:  # the next sample after the switch back to llm
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
        used = list(families["gpuwarden_gpu_memory_used_bytes"].samples)
        if used[0].value == 6000 * 1024 * 1024:
            break
        assert time.monotonic() < deadline, used
        time.sleep(0.1)
    assert used[0].labels["gpu"] == "0"
    assert families["gpuwarden_gpu_memory_total_bytes"].samples[0].value == 20480 * 2**20
    mode = {s.labels["mode"]: s.value for s in families["gpuwarden_gpu_mode"].samples}
    assert mode["llm"] == 1 and mode["image"] == 0
    switch = families["gpuwarden_mode_switch_duration_seconds"]
    count = next(s for s in switch.samples if s.name.endswith("_count"))
    assert count.value >= 2
    assert "gpuwarden_release_verify_duration_seconds" in families
    running = {s.labels["workload"]: s.value
               for s in families["gpuwarden_workload_running"].samples}
    assert running == {"ollama": 1, "comfyui": 0}
    assert "gpuwarden_events" in families and "gpuwarden_gpu_vram_tier" in families


def test_auth_tokens_and_signatures(api: Any) -> None:
    daemon, client = api
    before = switches(daemon)
    assert client.get("/v1/status").status_code == 401
    assert client.get("/v1/status", headers={"Authorization": "Bearer wrong"}).status_code \
        == 401
    assert client.get("/v1/status", headers={"Authorization": "Basic abc"}).status_code == 401

    body = json.dumps({"mode": "image"}).encode()
    ok = client.post("/v1/mode", content=body, headers=signed(body))
    assert ok.status_code == 200, ok.text
    assert daemon.wait_event("mode.switch.completed", to="image")[0]["requested_by"] == \
        "api:webhook"

    body = json.dumps({"mode": "llm"}).encode()
    other = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    cases = {
        "wrong secret": (body, signed(body, secret=other)),
        "stale timestamp": (body, signed(body, when=datetime.now(tz=UTC)
                                         - timedelta(minutes=6))),
        "tampered body": (json.dumps({"mode": "idle"}).encode(), signed(body)),
        "garbage signature": (body, {**signed(body), "webhook-signature": "v1,!!!"}),
        "no comma": (body, {**signed(body), "webhook-signature": "nonsense"}),
    }
    for why, (content, headers) in cases.items():
        resp = client.post("/v1/mode", content=content, headers=headers)
        assert resp.status_code == 401, why
        assert "error" in resp.json(), why
    replay_headers = signed(body)
    assert client.post("/v1/mode", content=body, headers=replay_headers).status_code == 200
    replay = client.post("/v1/mode", content=body, headers=replay_headers)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]
    assert switches(daemon) == before + 2


def test_bad_input_gets_a_clear_error_and_changes_nothing(api: Any) -> None:
    daemon, client = api
    before = switches(daemon)

    def state() -> tuple[str, int]:
        doc = client.get("/v1/status", headers=auth()).json()
        return doc["gpus"][0]["mode"], switches(daemon)

    start = state()
    cases = [
        (413, {"content": b'{"mode": "' + b"x" * 4000 + b'"}'}),
        (400, {"content": b'{"mode": '}),
        (400, {"content": b"\xff\xfe"}),
        (422, {"json": {}}),
        (422, {"json": {"mode": "image", "gpu": "0"}}),
        (422, {"json": {"mode": "image", "force": "yes"}}),
        (422, {"json": {"mode": "image", "extra": 1}}),
        (422, {"json": ["image"]}),
        (404, {"json": {"mode": "warp-drive"}}),
        (404, {"json": {"mode": "image", "gpu": 3}}),
    ]
    for expected, kwargs in cases:
        resp = client.post("/v1/mode", headers={**auth(), "content-type": "application/json"},
                           **kwargs)
        assert resp.status_code == expected, (kwargs, resp.text)
        doc = resp.json()
        assert doc["error"] and "detail" in doc
    missing = client.post("/v1/mode", headers=auth(), json={"gpu": 0}).json()
    assert "mode" in missing["error"]
    assert client.get("/v1/nope", headers=auth()).status_code == 404
    assert client.delete("/v1/mode", headers=auth()).status_code == 405
    bad_since = client.get("/v1/events", params={"since": "x"}, headers=auth())
    assert bad_since.status_code == 422 and bad_since.json()["detail"][0]["field"] == "since"
    assert client.post("/v1/workloads/ghost/unblock", headers=auth()).status_code == 404
    assert state() == start
    assert switches(daemon) == before


def test_a_running_switch_is_409_with_its_id(node: SimNode, start_daemon) -> None:
    from .standins import ComfyStandIn

    comfy = ComfyStandIn().start()
    comfy.delay["/system_stats"] = 1.0
    try:
        port = free_port()
        config = api_config(node, port, **{
            "workloads.comfyui": {"kind": "process",
                                  "command": hold_argv(node.ledger, "comfyui", 8000),
                                  "release": "comfyui", "url": comfy.url}})
        daemon = start_daemon(config, node.socket)
        daemon.wait_mode("llm")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            first = client.post("/v1/mode", params={"wait": "false"}, json={"mode": "image"},
                                headers=auth())
            assert first.status_code == 202
            conflict = client.post("/v1/mode", json={"mode": "idle"}, headers=auth())
            assert conflict.status_code == 409
            assert conflict.json()["detail"]["id"] == first.json()["id"]
        daemon.wait_mode("image")
    finally:
        comfy.stop()


def test_open_read_and_metrics_auth(node: SimNode, start_daemon) -> None:
    port = free_port()
    config = api_config(node, port, api={"open_read": True, "metrics_auth": True})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        assert client.get("/v1/status").status_code == 200
        assert client.get("/v1/events").status_code == 200
        assert client.post("/v1/mode", json={"mode": "image"}).status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=auth()).status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)
bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"mode": st.sampled_from(["llm", "image", "idle", "",
                                                                  "x" * 70]) | json_values,
                                        "gpu": st.integers(-2, 70) | json_values,
                                        "force": st.booleans() | json_values}),
    json_values,
)


def test_fuzz_finds_no_5xx(api: Any) -> None:
    daemon, client = api
    problems: list[str] = []

    @settings(max_examples=2500, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
        path=st.sampled_from(["/v1/mode", "/v1/status", "/v1/events", "/v1/openapi.json",
                              "/v1/workloads/comfyui/unblock", "/v1/workloads/%00/unblock",
                              "/healthz", "/metrics", "/v1/", "/v1/mode/.."]),
        body=bodies,
        raw=st.none() | st.binary(max_size=64),
        query=st.dictionaries(st.sampled_from(["since", "limit", "wait"]),
                              st.text(max_size=6), max_size=2),
        authed=st.sampled_from(["token", "none", "bad", "signed"]),
    )
    def one(method: str, path: str, body: Any, raw: bytes | None, query: dict[str, str],
            authed: str) -> None:
        content = raw if raw is not None else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if authed == "token":
            headers.update(auth())
        elif authed == "bad":
            headers["Authorization"] = "Bearer " + "y" * 10
        elif authed == "signed":
            headers.update(signed(content))
        resp = client.request(method, path, content=content, params=query, headers=headers)
        if resp.status_code >= 500:
            problems.append(f"{method} {path} {query} {content[:80]!r} -> "
                            f"{resp.status_code} {resp.text[:200]}")
        if resp.status_code >= 400 and path != "/metrics":
            assert "error" in resp.json()

    one()
    assert problems == []
    assert daemon.proc.poll() is None
    # After the storm the daemon still answers and holds a consistent state.
    doc = client.get("/v1/status", headers=auth()).json()
    assert doc["gpus"][0]["mode"] in {"llm", "image", "idle"}
    time.sleep(0.1)


def test_cli_over_tcp_with_a_token(api: Any) -> None:
    from .conftest import run_cli

    daemon, client = api
    url = str(client.base_url).rstrip("/")
    ok = run_cli("status", "--json", "--url", url, "--token", TOKEN)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["gpus"][0]["mode"] == "llm"
    bad = run_cli("status", "--url", url, "--token", "nope")
    assert bad.returncode == 1 and "invalid bearer token" in bad.stderr
    bad = run_cli("mode", "--url", url, "--token", "nope")
    assert bad.returncode == 1 and "invalid bearer token" in bad.stderr, bad.stderr
    switched = run_cli("mode", "image", "--json", "--url", url,
                       env={"GPUWARDEN_TOKEN": TOKEN})
    assert switched.returncode == 0, switched.stdout
    assert daemon.wait_event("mode.switch.completed", to="image")[0]["requested_by"] == \
        "api:n8n"
    down = run_cli("status", "--url", "http://127.0.0.1:9", "--token", TOKEN)
    assert down.returncode == 3
