"""No chat is cut: a switch that would stop a workload with demand requests in flight
through its proxy is refused, naming them, unless forced; a forced one ends each
answer with an error in that answer's own format, and says what it cut and which
ComfyUI jobs its stop dropped."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from .conftest import SimNode, run_cli
from .test_proxy import ProxiedNode, in_thread, prompt


@pytest.fixture
def proxied(node: SimNode, start_daemon: Any) -> ProxiedNode:
    return ProxiedNode(node, start_daemon)


def slow_generate(base: str, tokens: int = 200) -> list[str]:
    body = {"model": "standin:7b", "prompt": "tell me a long story", "stream": True,
            "options": {"num_predict": tokens, "standin_token_delay": 0.05}}
    with httpx.stream("POST", f"{base}/api/generate", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        return [line for line in resp.iter_lines() if line]


def slow_completion(base: str, tokens: int = 200) -> list[str]:
    body = {"model": "standin:7b", "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "a long answer"}],
            "options": {"standin_token_delay": 0.05}}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body,
                      timeout=120) as resp:
        assert resp.status_code == 200
        return [line for line in resp.iter_lines() if line]


def test_a_chat_in_flight_refuses_a_switch_and_a_forced_one_ends_it_cleanly(
        proxied: ProxiedNode) -> None:
    daemon = proxied.start(default_mode="llm")
    config = str(proxied.node.config_path)

    thread, out = in_thread(slow_generate, proxied.ollama)
    proxied.wait_proxy("ollama", in_flight=1)
    refused = run_cli("--config", config, "mode", "image", "--json")
    assert refused.returncode == 1, refused
    doc = json.loads(refused.stdout)
    assert "in flight" in doc["error"] and "POST /api/generate from 127.0.0.1" in doc["error"]
    assert "--force" in doc["error"]
    [busy] = doc["detail"]["in_flight"]
    assert busy["workload"] == "ollama" and busy["client"] == "127.0.0.1"
    event = daemon.wait_event("mode.switch.refused", to="image")[0]
    assert "in flight" in event["reason"]
    thread.join(120)
    lines = out["result"]
    assert json.loads(lines[-1])["done"] is True and len(lines) == 201  # untouched

    # Forced: the NDJSON stream ends with Ollama's own error line, not a cut connection.
    thread, out = in_thread(slow_generate, proxied.ollama)
    proxied.wait_proxy("ollama", in_flight=1)
    forced = run_cli("--config", config, "mode", "image", "--force", "--json")
    assert forced.returncode == 0, forced
    result = json.loads(forced.stdout)
    assert [r["request"] for r in result["cut_requests"]] == ["POST /api/generate"]
    thread.join(120)
    lines = out["result"]
    last = json.loads(lines[-1])
    assert "error" in last and "forced by cli:" in last["error"], lines[-3:]
    assert len(lines) < 201
    done = daemon.wait_event("mode.switch.completed", to="image")[-1]
    assert done["cut_requests"][0]["client"] == "127.0.0.1"
    print(f"\nthe forced stream's last line: {lines[-1]}")

    # The OpenAI stream ends with an error event.
    run_cli("--config", config, "mode", "llm", "--timeout", "60")
    daemon.wait_mode("llm", timeout=60)
    thread, out = in_thread(slow_completion, proxied.ollama)
    proxied.wait_proxy("ollama", in_flight=1)
    assert run_cli("--config", config, "mode", "idle", "--force").returncode == 0
    thread.join(120)
    last = out["result"][-1]
    assert last.startswith("data: ") and "gpuwarden_switch" in last, out["result"][-3:]


def test_a_forced_switch_away_from_comfyui_says_which_jobs_it_drops(
        proxied: ProxiedNode) -> None:
    daemon = proxied.start(default_mode="image", job_seconds=30.0)
    for _ in range(3):
        prompt(proxied.comfy)
    # Status shows ComfyUI's jobs (its queue, read at each sample).
    deadline = time.monotonic() + 30
    while next(w for w in daemon.status()["workloads"] if w["name"] == "comfyui")[
            "jobs"] != {"running": 1, "pending": 2, "error": None}:
        assert time.monotonic() < deadline, daemon.status()["workloads"]
        time.sleep(0.1)
    plain = run_cli("--config", str(proxied.node.config_path), "status")
    assert "jobs: 1 running, 2 queued" in plain.stdout, plain.stdout
    forced = run_cli("--config", str(proxied.node.config_path), "mode", "llm", "--force",
                     "--json")
    assert forced.returncode == 0, forced
    assert json.loads(forced.stdout)["dropped_jobs"] == {"comfyui": 2}
