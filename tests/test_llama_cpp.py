"""The model router in front of a real engine: llama.cpp's OpenAI server
(llama-cpp-python's `python -m llama_cpp.server`, from PyPI, built once by
scripts/llama-cpp.sh into a cache outside the clone) serving two tiny GGUF models this
repository writes (tests/tiny_gguf.py), one per mode, each engine holding simulated
VRAM for as long as it runs (`python -m gpuwarden.gpu.hold ... -- ENGINE`).

Needs cmake and g++ the first time (scripts/test.sh installs them);
GPUWARDEN_REQUIRE_LLAMA_CPP=1 (CI) fails instead of skipping when it cannot be had."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from .browser import cached_program
from .conftest import PYTHON, DaemonProcess, SimNode, run_cli
from .standins import free_port
from .tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"a": "tiny-a", "b": "tiny-b"}
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def engine_python() -> str:
    return cached_program("llama-cpp.sh", "GPUWARDEN_REQUIRE_LLAMA_CPP",
                          "a real llama.cpp server")


class EngineNode:
    def __init__(self, node: SimNode, start_daemon: Any, engine_python: str) -> None:
        self.node = node
        self.ports = {name: free_port() for name in MODELS}
        self.router = f"http://127.0.0.1:{free_port()}"
        models = node.root / "models"
        models.mkdir()
        tables: dict[str, dict[str, Any]] = {}
        for seed, (name, model) in enumerate(MODELS.items(), start=1):
            gguf = write_tiny_gguf(models / f"{model}.gguf", seed)
            port = self.ports[name]
            tables[f"workloads__{name}"] = {
                "kind": "process", "stop_timeout": 5, "release": "openai",
                "url": f"http://127.0.0.1:{port}", "models": [model], "ready_timeout": 60,
                "command": [PYTHON, "-m", "gpuwarden.gpu.hold", "--ledger", str(node.ledger),
                            "--name", f"engine-{name}", "--mib", "5000", "--",
                            engine_python, "-m", "llama_cpp.server", "--model", str(gguf),
                            "--model_alias", model, "--host", "127.0.0.1", "--port", str(port),
                            "--n_ctx", "256", "--n_threads", "1", "--embedding", "true"]}
        tables["modes__one"] = {"workloads": ["a"]}
        tables["modes__two"] = {"workloads": ["b"]}
        tables["router"] = {"listen": self.router.removeprefix("http://"), "min_dwell": 0,
                            "max_wait": 120}
        self.config = node.write(**tables)
        self.daemon: DaemonProcess = start_daemon(self.config, node.socket)
        self.daemon.wait_mode("idle")

    def engines(self) -> list[psutil.Process]:
        """The engine processes themselves (not their VRAM-holding parents)."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            line = " ".join(proc.info["cmdline"] or ())
            if "llama_cpp.server" in line and str(self.node.root) in line and \
                    "gpuwarden.gpu.hold" not in line:
                found.append(proc)
        return found


@pytest.fixture
def engines(node: SimNode, start_daemon: Any, engine_python: str) -> EngineNode:
    return EngineNode(node, start_daemon, engine_python)


def chat(base: str, model: str, *, stream: bool = True, max_tokens: int = 8,
         content_type: str = "application/json") -> dict[str, Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}],
                       "stream": stream, "max_tokens": max_tokens})
    t0 = time.monotonic()
    first = None
    with httpx.stream("POST", f"{base}/v1/chat/completions", content=body,
                      headers={"Content-Type": content_type}, timeout=180) as resp:
        lines = []
        for line in resp.iter_lines():
            if line and first is None:
                first = time.monotonic() - t0
            if line:
                lines.append(line)
    return {"model": model, "status": resp.status_code, "lines": lines, "first_s": first,
            "s": time.monotonic() - t0, "ended": time.time()}


def test_models_listed_while_both_engines_are_stopped(engines: EngineNode) -> None:
    listed = httpx.get(f"{engines.router}/v1/models", timeout=10).json()
    assert sorted(m["id"] for m in listed["data"]) == sorted(MODELS.values())
    assert engines.engines() == []  # answered by gpuwarden: nothing started
    assert engines.daemon.status()["gpus"][0]["used_mib"] == 0


def test_routing_by_model_across_a_switch_and_the_memory_returned(
        engines: EngineNode) -> None:
    daemon = engines.daemon
    first = chat(engines.router, "tiny-a", content_type="text/plain")
    assert first["status"] == 200 and first["lines"][-1] == "data: [DONE]", first
    switched = daemon.wait_event("mode.switch.completed", to="one")[0]
    assert switched["requested_by"].startswith("router:")
    (engine_a,) = engines.engines()
    pid_a = engine_a.pid
    daemon.wait_used(5000)
    second = chat(engines.router, "tiny-b", stream=False)
    assert second["status"] == 200, second
    reply = json.loads(second["lines"][0])
    assert reply["model"] == "tiny-b" and reply["choices"][0]["message"]["role"] == "assistant"
    to_two = daemon.wait_event("mode.switch.completed", to="two")[0]
    # The stop is the release: engine a's process is gone and its VRAM back, proven.
    assert not psutil.pid_exists(pid_a) or psutil.Process(pid_a).status() == "zombie"
    verified = next(e for e in daemon.events("release.verified")
                    if e.get("transition_id") == to_two["transition_id"])
    assert verified["graceful"] == {"a": []} and verified["used_mib"] == 0
    embed = httpx.post(f"{engines.router}/v1/embeddings",
                       json={"model": "tiny-b", "input": "hello"}, timeout=60)
    assert embed.status_code == 200 and embed.json()["data"][0]["embedding"]
    print(f"\nswitch idle -> one: total {switched['timings']['total_s']:.2f} s, start "
          f"(engine start to ready) {switched['timings']['start_s']:.2f} s; one -> two: "
          f"total {to_two['timings']['total_s']:.2f} s, start "
          f"{to_two['timings']['start_s']:.2f} s")


def test_sixteen_streams_and_a_chat_in_flight_not_cut_by_a_switch(
        engines: EngineNode) -> None:
    daemon = engines.daemon
    warm = chat(engines.router, "tiny-a")
    assert warm["status"] == 200
    results: list[dict[str, Any]] = []

    def client(model: str, tokens: int) -> None:
        results.append(chat(engines.router, model, max_tokens=tokens))

    threads = [threading.Thread(target=client, args=("tiny-a", 8)) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(results) == 16, results
    assert all(r["status"] == 200 and r["lines"][-1] == "data: [DONE]" for r in results)
    # Through the router and straight to the engine, one after the other.
    direct = f"http://127.0.0.1:{engines.ports['a']}"
    via, straight = [], []
    for _ in range(5):
        via.append(chat(engines.router, "tiny-a", max_tokens=2)["first_s"])
        straight.append(chat(direct, "tiny-a", max_tokens=2)["first_s"])
    print(f"\nfirst token, median of 5: router {statistics.median(via) * 1000:.1f} ms, "
          f"direct {statistics.median(straight) * 1000:.1f} ms")
    results.clear()
    slow = threading.Thread(target=client, args=("tiny-a", 200))
    slow.start()
    deadline = time.monotonic() + 60
    while not daemon.status()["router"]["workloads"]["a"]["in_flight"]:
        assert time.monotonic() < deadline and slow.is_alive()
        time.sleep(0.01)
    other = threading.Thread(target=client, args=("tiny-b", 4))
    other.start()
    slow.join(300)
    other.join(300)
    by_model = {r["model"]: r for r in results}
    assert by_model["tiny-a"]["status"] == 200
    assert by_model["tiny-a"]["lines"][-1] == "data: [DONE]"  # whole, not cut
    assert by_model["tiny-b"]["status"] == 200
    started = daemon.wait_event("mode.switch.started", to="two")[0]
    assert started["time"] >= by_model["tiny-a"]["ended"] - 0.5
    assert run_cli("--config", str(engines.config), "status").returncode == 0
