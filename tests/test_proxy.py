"""The demand proxy over a real daemon: stand-ins of Ollama and ComfyUI speaking their
real API shapes run as process workloads holding simulated VRAM, and clients talk
to the proxies' addresses on loopback, as Open WebUI or ComfyUI's page would."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from gpuwarden.proxy.demand import Kind, classify

from .conftest import PYTHON, DaemonProcess, SimNode, run_cli, write_toml
from .standins import free_port

STANDIN = [PYTHON, "-m", "gpuwarden.standins"]



class ProxiedNode:
    """A sim node whose llm (Ollama stand-in) and image (ComfyUI stand-in) modes sit
    behind demand proxies."""

    def __init__(self, node: SimNode, start_daemon: Any) -> None:
        self.node = node
        self._start = start_daemon
        self.ollama_port, self.comfy_port = free_port(), free_port()
        self.ollama_proxy, self.comfy_proxy = free_port(), free_port()
        self.ollama = f"http://127.0.0.1:{self.ollama_proxy}"
        self.comfy = f"http://127.0.0.1:{self.comfy_proxy}"
        self.comfy_direct = f"http://127.0.0.1:{self.comfy_port}"
        self.daemon: DaemonProcess | None = None

    def config(self, *, default_mode: str = "image", job_seconds: float = 2.0,
               ollama_proxy: dict[str, Any] | None = None,
               comfy_proxy: dict[str, Any] | None = None,
               ollama: dict[str, Any] | None = None) -> Path:
        node = self.node
        tables = node.tables(
            daemon={"default_mode": default_mode},
            workloads__ollama={
                "kind": "process", "stop_timeout": 2, "release": "ollama",
                "url": f"http://127.0.0.1:{self.ollama_port}", "ready_timeout": 20,
                "command": [*STANDIN, "ollama", "--port", str(self.ollama_port),
                            "--ledger", str(node.ledger), "--mib", "6000"], **(ollama or {})},
            workloads__comfyui={
                "kind": "process", "stop_timeout": 2, "release": "comfyui",
                "url": self.comfy_direct, "ready_timeout": 20,
                "command": [*STANDIN, "comfyui", "--port", str(self.comfy_port),
                            "--ledger", str(node.ledger), "--mib", "8000",
                            "--job-seconds", str(job_seconds)]},
            modes__llm={"workloads": ["ollama"]},
            modes__image={"workloads": ["comfyui"]},
            proxy__ollama={"listen": f"127.0.0.1:{self.ollama_proxy}", "min_dwell": 0,
                           "max_wait": 60, **(ollama_proxy or {})},
            proxy__comfyui={"listen": f"127.0.0.1:{self.comfy_proxy}", "min_dwell": 0,
                            "max_wait": 60, **(comfy_proxy or {})},
        )
        return write_toml(node.config_path, tables)

    def start(self, **config: Any) -> DaemonProcess:
        self.daemon = self._start(self.config(**config), self.node.socket)
        self.daemon.wait_mode(config.get("default_mode", "image"), timeout=60)
        return self.daemon

    def proxy_status(self, name: str) -> dict[str, Any]:
        assert self.daemon is not None
        found: dict[str, Any] = next(p for p in self.daemon.status()["proxies"]
                                     if p["workload"] == name)
        return found

    def wait_proxy(self, name: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.proxy_status(name)
            if all(doc.get(k) == v for k, v in match.items()):
                return doc
            assert time.monotonic() < deadline, f"proxy {name} never had {match}: {doc}"
            time.sleep(0.05)


@pytest.fixture
def proxied(node: SimNode, start_daemon: Any) -> Iterator[ProxiedNode]:
    yield ProxiedNode(node, start_daemon)


def chat(base: str, *, stream: bool = True, timeout: float = 120) -> dict[str, Any]:
    """A streamed /api/chat through `base`: its lines, status, headers and timings."""
    t0 = time.monotonic()
    body = {"model": "standin:7b", "messages": [{"role": "user", "content": "hi"}],
            "stream": stream}
    with httpx.stream("POST", f"{base}/api/chat", json=body, timeout=timeout) as resp:
        first = None
        lines = []
        for line in resp.iter_lines():
            if first is None:
                first = time.monotonic() - t0
            if line:
                lines.append(line)
        return {"status": resp.status_code, "headers": dict(resp.headers),
                "lines": lines, "first_s": first, "total_s": time.monotonic() - t0}


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as exc:  # reported by the test that reads it
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def prompt(base: str, seconds: float | None = None) -> str:
    extra = {} if seconds is None else {"job_seconds": seconds}
    # A fresh seed each time: ComfyUI answers an identical prompt from its cache in 0 s.
    seed = time.monotonic_ns()
    resp = httpx.post(f"{base}/prompt", json={"prompt": {"3": {"class_type": "KSampler",
                                                               "inputs": {"seed": seed}}},
                                              "extra_data": extra}, timeout=120)
    assert resp.status_code == 200, resp.text
    prompt_id: str = resp.json()["prompt_id"]
    return prompt_id


def job_end(node: SimNode, prompt_id: str, timeout: float = 60) -> dict[str, Any]:
    """How a job ended, from the ComfyUI stand-in's log ({"status", "finished_at"}):
    a switch may stop ComfyUI the moment its last job ends, and its history with it."""
    log = node.state_dir / "logs" / "comfyui.log"
    deadline = time.monotonic() + timeout
    while True:
        for line in log.read_text().splitlines() if log.exists() else []:
            if line.startswith("{") and json.loads(line).get("job") == prompt_id:
                found: dict[str, Any] = json.loads(line)
                return found
        assert time.monotonic() < deadline, f"job {prompt_id} not done in {timeout}s"
        time.sleep(0.05)


def wait_job(base: str, prompt_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = httpx.get(f"{base}/history/{prompt_id}", timeout=10).json()
        if prompt_id in doc:
            job: dict[str, Any] = doc[prompt_id]
            return job
        assert time.monotonic() < deadline, f"job {prompt_id} not done in {timeout}s"
        time.sleep(0.05)


def test_what_is_demand() -> None:
    assert classify("ollama", "POST", "/api/chat", b'{"model":"m","messages":[]}') \
        is Kind.DEMAND
    assert classify("ollama", "POST", "/v1/chat/completions") is Kind.DEMAND
    assert classify("ollama", "POST", "/api/embed") is Kind.DEMAND
    assert classify("ollama", "POST", "/api/generate", b'{"model":"m"}') is Kind.DEMAND  # a load
    assert classify("ollama", "POST", "/api/generate",
                    b'{"model":"m","keep_alive":0}') is Kind.LOCAL  # an unload
    for path in ("/api/tags", "/api/version", "/v1/models", "/v1/models/m", "/"):
        assert classify("ollama", "GET", path) is Kind.READ, path
    assert classify("ollama", "POST", "/api/show", b'{"model":"m"}') is Kind.READ
    assert classify("ollama", "GET", "/api/ps") is Kind.LOCAL
    assert classify("ollama", "POST", "/api/pull") is Kind.OTHER
    assert classify("comfyui", "POST", "/prompt") is Kind.DEMAND
    assert classify("comfyui", "POST", "/api/prompt") is Kind.DEMAND
    assert classify("comfyui", "GET", "/queue") is Kind.LOCAL
    assert classify("comfyui", "GET", "/ws") is Kind.OTHER
    for path in ("/", "/history", "/object_info", "/assets/index.js"):
        assert classify("comfyui", "GET", path) is Kind.READ, path
    assert classify("comfyui", "POST", "/upload/image") is Kind.OTHER


def test_bad_proxy_config_is_named(node: SimNode, tmp_path: Path) -> None:
    port, other = free_port(), free_port()
    config = write_toml(tmp_path / "bad.toml", node.tables(
        workloads__ollama={"kind": "process", "command": ["true"], "release": "ollama",
                           "url": f"http://127.0.0.1:{port}"},
        workloads__tool={"kind": "process", "command": ["true"],
                         "url": f"http://127.0.0.1:{other}"},
        workloads__comfyui={"kind": "process", "command": ["true"], "release": "comfyui",
                            "url": "http://127.0.0.1:1"},
        modes__llm={"workloads": ["ollama", "tool"]},
        modes__both={"workloads": ["ollama"]},
        modes__image={"workloads": ["comfyui"]},
        proxy__ollama={"listen": f"localhost:{port}"},
        proxy__tool={"listen": "somewhere:80"},
        proxy__comfyui={"listen": f"0.0.0.0:{other}"},
        proxy__ghost={"listen": "127.0.0.1:9"},
    ))
    result = run_cli("check-config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "proxy.ollama.mode: workload 'ollama' is in modes llm, both" in out, out
    # The same port under another name, or a wildcard over it, is still the same socket.
    assert f"proxy.ollama.listen: localhost:{port} is the workload's own url" in out, out
    assert f"proxy.comfyui.listen: 0.0.0.0:{other} is the url of workload 'tool'" in out, out
    assert "proxy.tool.api" in out, out
    assert "proxy.tool.listen: expected host:port" in out, out
    assert "proxy.ghost: no workload named 'ghost'" in out, out
    config.write_text(config.read_text().replace(f'"localhost:{port}"', '"127.0.0.1:65536"'))
    result = run_cli("check-config", str(config))
    assert "proxy.ollama.listen: port 65536 is out of range (1-65535)" in result.stderr + \
        result.stdout


def test_risky_proxy_config_is_warned_about(node: SimNode, tmp_path: Path) -> None:
    config = write_toml(tmp_path / "risky.toml", node.tables(
        workloads__ollama={"kind": "process", "command": ["true"], "release": "ollama",
                           "url": "http://127.0.0.1:11435"},
        workloads__comfyui={"kind": "process", "command": ["true"], "release": "comfyui",
                            "url": "http://127.0.0.1:8189"},
        modes__llm={"workloads": ["ollama"]},
        modes__image={"workloads": ["comfyui"]},
        proxy__ollama={"listen": "0.0.0.0:11434", "preempt": True},
        proxy__comfyui={"listen": "127.0.0.1:8188"},
    ))
    result = run_cli("check-config", str(config))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out  # valid, but said
    assert "proxy.ollama.listen: 0.0.0.0:11434 is reachable from other hosts" in out, out
    assert "proxy.ollama.preempt: true, but mode 'llm' (priority 0" in out, out


def test_chat_during_idle_image_mode_switches_and_streams_intact(proxied: ProxiedNode) -> None:
    daemon = proxied.start(default_mode="llm")
    # While Ollama runs, its reads are its own, and kept.
    tags = httpx.get(f"{proxied.ollama}/api/tags", timeout=10)
    assert tags.status_code == 200 and "X-Gpuwarden-Cache" not in tags.headers
    models = httpx.get(f"{proxied.ollama}/v1/models", timeout=10)
    assert models.json()["data"][0]["id"] == "standin:7b"
    assert httpx.get(f"{proxied.comfy}/", timeout=10).status_code == 503  # never seen
    assert httpx.head(f"{proxied.ollama}/api/tags", timeout=10).status_code == 200
    run_cli("--config", str(daemon.config), "mode", "image")
    daemon.wait_mode("image", timeout=60)

    # A HEAD is answered as its GET would be (the HEAD above kept no empty body).
    head = httpx.head(f"{proxied.ollama}/api/tags", timeout=10)
    assert head.status_code == 200 and head.headers["X-Gpuwarden-Cache"] == "stale"
    assert int(head.headers["Content-Length"]) > 0 and head.content == b""

    # Open WebUI's model lists still answer, from the last answer, marked as such.
    tags = httpx.get(f"{proxied.ollama}/api/tags", timeout=10)
    assert tags.status_code == 200, tags.text
    assert tags.headers["X-Gpuwarden-Cache"] == "stale"
    assert tags.json()["models"][0]["name"] == "standin:7b"
    models = httpx.get(f"{proxied.ollama}/v1/models", timeout=10)
    assert models.headers["X-Gpuwarden-Cache"] == "stale"
    assert httpx.get(f"{proxied.ollama}/api/ps", timeout=10).json() == {"models": []}
    pull = httpx.post(f"{proxied.ollama}/api/pull", json={"model": "x"}, timeout=10)
    assert pull.status_code == 503 and "mode image is active" in pull.json()["error"]
    page = httpx.get(f"{proxied.ollama}/api/pull", headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 503 and "gpuwarden mode llm" in page.text
    assert daemon.status()["gpus"][0]["mode"] == "image"  # none of that was demand

    result = chat(proxied.ollama)
    assert result["status"] == 200
    lines = [json.loads(line) for line in result["lines"]]
    assert [c["message"]["content"] for c in lines[:-1]] == [f"tok{i} " for i in range(20)]
    assert lines[-1]["done"] is True
    completed = daemon.wait_event("mode.switch.completed", to="llm")[-1]
    assert completed["requested_by"] == "proxy:127.0.0.1"
    assert completed["cause"]["request"] == "POST /api/chat"
    assert completed["cause"]["proxy"] == "ollama"
    waiting = daemon.events("proxy.waiting")[0]
    assert waiting["mode"] == "llm" and "(mode image is active)" in waiting["message"]

    # The OpenAI-compatible stream passes through as server-sent events.
    with httpx.stream("POST", f"{proxied.ollama}/v1/chat/completions", timeout=30,
                      json={"model": "standin:7b", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) == 21
    status = proxied.proxy_status("ollama")
    assert status["up"] and status["waiting"] == 0 and status["in_flight"] == 0
    assert status["forwarded"] >= 3 and status["cached"] == 3  # the HEAD too

    metrics = daemon.client.get("/metrics").text
    assert 'gpuwarden_proxy_demand_switches_total{gpu="0",mode="llm"} 1.0' in metrics
    assert 'gpuwarden_proxy_wait_seconds_count{proxy="ollama"} 1.0' in metrics
    plain = run_cli("--config", str(daemon.config), "status")
    assert "proxy ollama" in plain.stdout, plain.stdout


def test_chat_waits_for_a_running_image_job_which_finishes_untouched(
        proxied: ProxiedNode) -> None:
    daemon = proxied.start(default_mode="image", job_seconds=4)
    job = prompt(proxied.comfy)
    waiter, out = in_thread(chat, proxied.ollama)
    status = proxied.wait_proxy("ollama", waiting=1)
    assert status["oldest_wait_s"] is not None
    deadline = time.monotonic() + 30
    while "image job" not in (proxied.proxy_status("ollama")["blocker"] or ""):
        assert time.monotonic() < deadline, proxied.proxy_status("ollama")
        time.sleep(0.05)
    assert daemon.events("mode.switch.started") == [] or all(
        e["to"] != "llm" for e in daemon.events("mode.switch.started"))
    done = job_end(proxied.node, job)
    finished = done["finished_at"]
    waiter.join(120)
    assert "error" not in out, out
    assert out["result"]["status"] == 200 and json.loads(out["result"]["lines"][-1])["done"]
    assert done["status"] == "success"
    started = daemon.wait_event("mode.switch.started", to="llm")[-1]
    assert started["time"] >= finished - 1.0  # not before the job ended (1 s: the poll)
    assert daemon.events("mode.switch.refused") == []  # waited, never forced or refused
    assert started["cause"]["waited_s"] > 0


def test_max_wait_exceeded_is_503_with_retry_after(proxied: ProxiedNode) -> None:
    daemon = proxied.start(default_mode="image", job_seconds=60,
                           ollama_proxy={"max_wait": 1.5})
    prompt(proxied.comfy)
    deadline = time.monotonic() + 30
    while not httpx.get(f"{proxied.comfy_direct}/queue", timeout=5).json()["queue_running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result = chat(proxied.ollama)
    assert result["status"] == 503, result
    assert int(result["headers"]["retry-after"]) >= 1
    reason = json.loads(result["lines"][0])
    assert reason["cause"] == "max_wait" and "1 image job" in reason["error"], reason
    assert reason["active_mode"] == "image"
    rejected = daemon.wait_event("proxy.rejected")[-1]
    assert rejected["cause"] == "max_wait" and rejected["request"] == "POST /api/chat"
    stats = httpx.get(f"{proxied.comfy_direct}/standin/stats", timeout=5).json()
    assert stats["interrupted"] == 0  # the job runs on
    assert daemon.status()["gpus"][0]["mode"] == "image"
    assert 'gpuwarden_proxy_rejected_total{cause="max_wait",proxy="ollama"} 1.0' in \
        daemon.client.get("/metrics").text


def test_a_client_that_leaves_takes_its_switch_with_it(proxied: ProxiedNode) -> None:
    daemon = proxied.start(default_mode="image", job_seconds=3)
    job = prompt(proxied.comfy)
    with pytest.raises(httpx.ReadTimeout):
        chat(proxied.ollama, timeout=1.0)  # gives up while it waits
    proxied.wait_proxy("ollama", waiting=0)
    assert wait_job(proxied.comfy_direct, job)["status"]["status_str"] == "success"
    daemon.wait_samples(10)  # the scheduler looks again every 0.5 s; nobody waits
    assert daemon.status()["gpus"][0]["mode"] == "image"
    assert all(e["to"] != "llm" for e in daemon.events("mode.switch.started"))


def test_demand_on_both_sides_neither_starves_nor_ping_pongs(proxied: ProxiedNode) -> None:
    dwell = 3.0
    daemon = proxied.start(default_mode="image", job_seconds=0.3,
                           ollama_proxy={"min_dwell": dwell},
                           comfy_proxy={"min_dwell": dwell})
    stop = time.monotonic() + 20
    chats: list[tuple[int, float]] = []
    jobs: list[tuple[int, float]] = []

    def chatter() -> None:
        while time.monotonic() < stop:
            result = chat(proxied.ollama)
            chats.append((result["status"], result["total_s"]))

    def imager() -> None:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            job = prompt(proxied.comfy)
            wait_job(proxied.comfy, job)
            jobs.append((200, time.monotonic() - t0))

    threads = [threading.Thread(target=chatter), threading.Thread(target=imager)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(chats) >= 3 and len(jobs) >= 3, (chats, jobs)  # both sides served
    assert all(status == 200 for status, _ in chats + jobs), (chats, jobs)
    switches = [e for e in daemon.events("mode.switch.completed")
                if e.get("requested_by", "").startswith("proxy:")]
    # No ping-pong: each mode keeps the GPU at least its dwell while the other waits.
    assert len(switches) <= 20 / dwell + 2, len(switches)
    assert len(switches) >= 2
    # No starvation: a wait is bounded by the dwell, the other side's work and a switch.
    worst = max(seconds for _, seconds in chats + jobs)
    assert worst < dwell + 15, (chats, jobs)
    assert daemon.events("proxy.rejected") == []


async def _page_socket(url: str, opened: threading.Event, frames: list[Any],
                       until_prompt: list[str], *, echo: bool = True) -> None:
    """A ComfyUI page's (or Open WebUI's) socket: its first frame, an echo from the
    stand-in when it runs, then every frame until the prompt named in `until_prompt`
    has ended."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        frames.append(await ws.receive_json(timeout=10))
        if echo:
            await ws.send_str("hello")
            while (reply := await ws.receive(timeout=10)).data != "echo:hello":
                frames.append(json.loads(reply.data))
        opened.set()
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT or not message.data.startswith("{"):
                continue
            doc = json.loads(message.data)
            frames.append(doc)
            data = doc.get("data") or {}
            if doc["type"] == "executing" and data.get("node") is None and until_prompt \
                    and data.get("prompt_id") == until_prompt[0]:
                return


def test_a_page_socket_is_held_while_comfyui_is_down_and_gets_its_prompt(
        proxied: ProxiedNode) -> None:
    """ComfyUI's page stays connected through a switch away and back; Open WebUI's
    sequence from llm mode (a socket with its clientId, then the prompt, then that
    prompt's progress on the socket) switches to image for the prompt, not for the
    socket, and the socket gets every frame of it."""
    daemon = proxied.start(default_mode="image")
    page = httpx.get(f"{proxied.comfy}/", timeout=10)
    assert page.status_code == 200 and "ComfyUI" in page.text
    opened, frames, until = threading.Event(), [], []
    page_thread, page_out = in_thread(asyncio.run, _page_socket(
        f"ws://127.0.0.1:{proxied.comfy_proxy}/ws?clientId=page", opened, frames, until))
    assert opened.wait(20), page_out
    assert frames[0]["type"] == "status" and frames[0]["data"]["sid"] == "page"
    result = chat(proxied.ollama, timeout=60)  # the open page does not hold the GPU
    assert result["status"] == 200 and result["total_s"] < 30
    daemon.wait_event("mode.switch.completed", to="llm")
    assert page_thread.is_alive(), page_out  # held, not closed
    # The page still loads (from the last answer), and its queue reads empty.
    page = httpx.get(f"{proxied.comfy}/", timeout=10)
    assert page.status_code == 200 and page.headers["X-Gpuwarden-Cache"] == "stale"
    assert httpx.get(f"{proxied.comfy}/queue", timeout=10).json() == {
        "queue_running": [], "queue_pending": []}

    # Open WebUI: its socket first, while llm is active. An idle socket is not demand.
    opened2, frames2, until2 = threading.Event(), [], []
    webui_thread, webui_out = in_thread(asyncio.run, _page_socket(
        f"ws://127.0.0.1:{proxied.comfy_proxy}/ws?clientId=owui", opened2, frames2, until2,
        echo=False))
    assert opened2.wait(20), webui_out
    assert frames2[0] == {"type": "status", "data": {"status": {"exec_info": {
        "queue_remaining": 0}}, "sid": "owui"}}
    daemon.wait_samples(3)
    assert daemon.status()["gpus"][0]["mode"] == "llm"
    # Then its prompt, naming that socket: demand.
    t0 = time.monotonic()
    resp = httpx.post(f"{proxied.comfy}/prompt", timeout=60, json={
        "client_id": "owui", "extra_data": {"job_seconds": 0.5},
        "prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": time.monotonic_ns()}}}})
    assert resp.status_code == 200, resp.text
    until2.append(resp.json()["prompt_id"])
    webui_thread.join(60)
    took = time.monotonic() - t0
    assert "error" not in webui_out, webui_out
    kinds = [f["type"] for f in frames2 if (f.get("data") or {}).get("prompt_id") == until2[0]]
    assert kinds[0] == "execution_start" and "executed" in kinds and \
        "execution_success" in kinds, kinds
    print(f"\nOpen WebUI's image sequence from llm: the image after {took:.2f} s")
    # The page's own socket is bridged again (it sees the queue's status frames).
    deadline = time.monotonic() + 20
    while not any(f["type"] == "status" for f in frames[1:]):
        assert time.monotonic() < deadline, frames
        time.sleep(0.05)
    assert page_thread.is_alive()


def test_a_switch_that_fails_closed_answers_its_waiters_503(proxied: ProxiedNode) -> None:
    # Ollama is expected to need 15000 MiB, and a holder nobody owns takes 8000: the
    # switch cannot prove the model fits, so it does not stop ComfyUI for it.
    daemon = proxied.start(default_mode="image", ollama={"expected_mib": 15000})
    holder = proxied.node.hold("stray", 8000)
    try:
        daemon.wait_samples(2)
        results = []
        threads = [in_thread(chat, proxied.ollama) for _ in range(3)]
        for thread, out in threads:
            thread.join(60)
            results.append(out["result"])
        for result in results:
            assert result["status"] == 503, result
            reason = json.loads(result["lines"][0])
            assert reason["cause"] == "switch_failed"
            assert "needs 15000 MiB" in reason["error"], reason
        assert daemon.status()["gpus"][0]["mode"] == "image"
        refused = daemon.wait_event("mode.switch.refused")[-1]
        assert refused["requested_by"] == "proxy:127.0.0.1"
        assert refused["cause"]["request"] == "POST /api/chat"
        assert len(daemon.events("proxy.rejected")) == 3
        assert daemon.events("workload.stopped") == []
        # Asked again at once: answered with the failure, not tried again (each try
        # would stop what runs now).
        again = chat(proxied.ollama)
        assert again["status"] == 503 and 0 < int(again["headers"]["retry-after"]) <= 30
        assert "not tried again for" in json.loads(again["lines"][0])["error"]
        assert len(daemon.events("mode.switch.refused")) == 1
    finally:
        holder.terminate()
        holder.wait()


def test_a_blocked_workload_answers_its_waiters_with_the_block(proxied: ProxiedNode) -> None:
    config = proxied.config(default_mode="image")
    state = proxied.node.state_dir
    state.mkdir(parents=True, exist_ok=True)
    (state / "state.json").write_text(json.dumps({
        "version": 1, "gpus": {}, "blocks": {"ollama": {
            "workload": "ollama", "blocked_at": time.time(),
            "reason": "4 crashes in 60 s", "details": {}}}}))
    daemon = proxied._start(config, proxied.node.socket)
    daemon.wait_mode("image", timeout=60)
    result = chat(proxied.ollama)
    assert result["status"] == 503
    reason = json.loads(result["lines"][0])
    assert reason["cause"] == "blocked"
    assert "gpuwarden unblock ollama" in reason["error"], reason


def test_large_uploads_and_downloads_stream_through(proxied: ProxiedNode) -> None:
    proxied.start(default_mode="image")
    blob = bytes(range(256)) * (48 * 4096)  # 48 MiB
    resp = httpx.post(f"{proxied.comfy}/upload/image", content=iter([blob[i:i + (1 << 20)]
                      for i in range(0, len(blob), 1 << 20)]), timeout=60)
    assert resp.status_code == 200 and resp.json()["size"] == len(blob)
    size = 200 << 20
    got = 0
    with httpx.stream("GET", f"{proxied.comfy}/view?size={size}", timeout=60) as down:
        assert int(down.headers["content-length"]) == size
        for part in down.iter_raw():
            got += len(part)
    assert got == size


def test_the_proxy_address_taken_fails_the_start_clearly(proxied: ProxiedNode) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", proxied.ollama_proxy))
        taken.listen()
        proc = subprocess.run([PYTHON, "-m", "gpuwarden.cli", "daemon", "--config",
                               str(proxied.config())], capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode != 0
    assert "demand proxy cannot listen" in proc.stdout + proc.stderr


def test_preemption_needs_the_higher_priority_and_the_operators_leave(
        proxied: ProxiedNode) -> None:
    """With `preempt = true` and the higher priority, a chat interrupts a running image
    job instead of waiting for it; the switch is forced and says so."""
    config = proxied.config(default_mode="image", job_seconds=120,
                            ollama_proxy={"preempt": True}, ollama={"priority": 10})
    daemon = proxied._start(config, proxied.node.socket)
    daemon.wait_mode("image", timeout=60)
    prompt(proxied.comfy)
    deadline = time.monotonic() + 30
    while not httpx.get(f"{proxied.comfy_direct}/queue", timeout=5).json()["queue_running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result = chat(proxied.ollama, timeout=60)
    assert result["status"] == 200 and result["total_s"] < 30, result
    started = daemon.wait_event("mode.switch.started", to="llm")[-1]
    assert started["cause"]["preempted"] is True
    assert any(e["workload"] == "comfyui" for e in daemon.events("workload.stopped"))


def test_without_the_higher_priority_preempt_waits(proxied: ProxiedNode) -> None:
    daemon = proxied.start(default_mode="image", job_seconds=120,
                           ollama_proxy={"preempt": True, "max_wait": 2})
    prompt(proxied.comfy)
    result = chat(proxied.ollama)
    assert result["status"] == 503 and json.loads(result["lines"][0])["cause"] == "max_wait"
    assert daemon.status()["gpus"][0]["mode"] == "image"


def test_a_mode_demand_left_idle_does_not_hold_the_gpu_for_its_dwell(
        proxied: ProxiedNode) -> None:
    """llm's dwell is 60 s, but once its chat is answered and nothing more comes for
    5 s, an image prompt gets the GPU without waiting out the dwell."""
    daemon = proxied.start(default_mode="image", job_seconds=0.2,
                           ollama_proxy={"min_dwell": 60})
    assert chat(proxied.ollama)["status"] == 200
    daemon.wait_event("mode.switch.completed", to="llm")
    t0 = time.monotonic()
    job = prompt(proxied.comfy)  # waits for the 5 s of quiet, not the 60 s dwell
    waited = time.monotonic() - t0
    assert 3 < waited < 40, waited
    assert wait_job(proxied.comfy_direct, job)["status"]["status_str"] == "success"
    # A mode switched to by hand keeps its dwell, in use or not.
    run_cli("--config", str(daemon.config), "mode", "llm")
    daemon.wait_mode("llm")
    in_thread(prompt, proxied.comfy)  # left waiting: the fixture stops the daemon
    waiting = proxied.wait_proxy("comfyui", waiting=1)
    deadline = time.monotonic() + 10
    while "minimum dwell" not in (waiting.get("blocker") or ""):
        assert time.monotonic() < deadline, waiting
        time.sleep(0.1)
        waiting = proxied.proxy_status("comfyui")
