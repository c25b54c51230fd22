"""The facts gpuwarden relies on about ComfyUI and Ollama, checked against the
stand-ins and, when given, against the real programs.

Point the real-program cases at an install:

    GPUWARDEN_TEST_COMFYUI=http://127.0.0.1:8188          # a running ComfyUI
    GPUWARDEN_TEST_COMFYUI="/opt/comfy/start.sh {port}"   # or a command that starts one
    GPUWARDEN_TEST_OLLAMA=http://127.0.0.1:11434          # likewise for Ollama
    GPUWARDEN_TEST_OLLAMA_MODEL=tiny                       # a small model it has

Without them those cases skip, saying so. A case that signals the process (SIGTERM,
its children) needs the command form, where the test owns the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import pytest

from .conftest import wait_for
from .standins import free_port


@dataclass
class Upstream:
    url: str
    port: int
    which: str  # "stand-in" or "real"
    proc: subprocess.Popen[bytes] | None  # None: a running install the test does not own
    model: str = ""

    def owned(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            pytest.skip("this case signals the process: give a command, not a URL")
        return self.proc


def _wait_ready(url: str, path: str, proc: subprocess.Popen[bytes] | None,
                timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{url} exited {proc.returncode} before answering")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{url}{path} did not answer within {timeout} s")


def _start(argv: list[str], port: int, ready: str, which: str, log: Path,
           model: str = "") -> Iterator[Upstream]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, ready, proc)
        yield Upstream(url, port, which, proc, model)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _upstream(kind: str, which: str, tmp_path: Path) -> Iterator[Upstream]:
    ready = "/system_stats" if kind == "comfyui" else "/api/version"
    model = "standin:7b"
    if which == "stand-in":
        port = free_port()
        argv = [sys.executable, "-m", "gpuwarden.standins", kind, "--port", str(port),
                "--ledger", str(tmp_path / "ledger"), "--mib", "100"]
        if kind == "comfyui":
            argv += ["--job-seconds", "2"]
        yield from _start(argv, port, ready, which, tmp_path / f"{kind}.log", model)
        return
    variable = f"GPUWARDEN_TEST_{kind.upper()}"
    value = os.environ.get(variable, "")
    if not value:
        pytest.skip(f"{variable} names no real {kind} (a URL of a running one, or a command "
                    "with {port} that starts one)")
    if kind == "ollama":
        model = os.environ.get("GPUWARDEN_TEST_OLLAMA_MODEL", "tiny")
    if value.startswith(("http://", "https://")):
        _wait_ready(value.rstrip("/"), ready, None, timeout=10)
        port = int(value.rstrip("/").rsplit(":", 1)[1])
        yield Upstream(value.rstrip("/"), port, which, None, model)
        return
    port = free_port()
    yield from _start(shlex.split(value.replace("{port}", str(port))), port, ready, which,
                      tmp_path / f"{kind}.log", model)


@pytest.fixture(params=["stand-in", "real"])
def comfyui(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Upstream]:
    yield from _upstream("comfyui", request.param, tmp_path)


@pytest.fixture(params=["stand-in", "real"])
def ollama(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Upstream]:
    yield from _upstream("ollama", request.param, tmp_path)


# -- ComfyUI ------------------------------------------------------------------------------

def quick_workflow(seed: int) -> dict[str, Any]:
    """EmptyImage -> SaveImage: about 0.01 s, no model. The colour makes it unique."""
    return {"1": {"class_type": "EmptyImage", "inputs": {
                "width": 64, "height": 64, "batch_size": 1, "color": seed % 0xFFFFFF}},
            "2": {"class_type": "SaveImage", "inputs": {
                "images": ["1", 0], "filename_prefix": "gpuwarden-contract"}}}


def slow_workflow(seed: int, steps: int = 8) -> dict[str, Any]:
    """A 2048x2048 image through `steps` blurs and sharpens: seconds per node on a CPU."""
    flow: dict[str, Any] = {"1": {"class_type": "EmptyImage", "inputs": {
        "width": 2048, "height": 2048, "batch_size": 1, "color": seed % 0xFFFFFF}}}
    last = "1"
    for i in range(steps):
        node = str(10 + i)
        if i % 2 == 0:
            flow[node] = {"class_type": "ImageBlur", "inputs": {
                "image": [last, 0], "blur_radius": 31, "sigma": 10.0}}
        else:
            flow[node] = {"class_type": "ImageSharpen", "inputs": {
                "image": [last, 0], "sharpen_radius": 31, "sigma": 10.0, "alpha": 1.0}}
        last = node
    flow["2"] = {"class_type": "SaveImage", "inputs": {
        "images": [last, 0], "filename_prefix": "gpuwarden-contract"}}
    return flow


_SEEDS = iter(range(int(time.time()) % 100000 * 1000, 10**12))


def post_prompt(up: Upstream, flow: dict[str, Any], *, seconds: float = 0.05,
                **extra: Any) -> dict[str, Any]:
    """POST /prompt (the stand-in takes its job's length from extra_data)."""
    resp = httpx.post(f"{up.url}/prompt", timeout=30, json={
        "prompt": flow, "extra_data": {"job_seconds": seconds}, **extra})
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def queue(up: Upstream) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{up.url}/queue", timeout=10).json()
    return doc


def running_id(up: Upstream) -> str | None:
    rows = queue(up)["queue_running"]
    return str(rows[0][1]) if rows else None


def history_of(up: Upstream, prompt_id: str) -> dict[str, Any] | None:
    doc = httpx.get(f"{up.url}/history/{prompt_id}", timeout=10).json()
    entry: dict[str, Any] | None = doc.get(prompt_id)
    return entry


def start_slow(up: Upstream) -> str:
    """A job that runs for many seconds (the stand-in: 60), running once this returns."""
    pid = post_prompt(up, slow_workflow(next(_SEEDS)), seconds=60.0)["prompt_id"]
    wait_for(lambda: running_id(up) == pid, "the slow job running", 120)
    return str(pid)


def empty_queue(up: Upstream) -> None:
    httpx.post(f"{up.url}/queue", json={"clear": True}, timeout=10)
    httpx.post(f"{up.url}/interrupt", json={}, timeout=10)
    wait_for(lambda: queue(up) == {"queue_running": [], "queue_pending": []},
             "an empty queue", 120)


def test_comfyui_refuses_a_foreign_origin_on_a_loopback_host(comfyui: Upstream) -> None:
    other = f"http://127.0.0.1:{comfyui.port + 1}"
    own = f"http://127.0.0.1:{comfyui.port}"
    foreign = httpx.get(f"{comfyui.url}/queue", headers={"Origin": other}, timeout=10)
    assert foreign.status_code == 403 and foreign.content == b""
    assert httpx.get(f"{comfyui.url}/queue", headers={"Origin": own},
                     timeout=10).status_code == 200
    assert httpx.get(f"{comfyui.url}/queue", timeout=10).status_code == 200

    async def upgrade(origin: str) -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"{comfyui.url}/ws?clientId=o",
                                              headers={"Origin": origin}):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status
    assert asyncio.run(upgrade(other)) == 403
    assert asyncio.run(upgrade(own)) == 101


def test_comfyui_queue_rows_are_arrays_and_pending_is_a_heap(comfyui: Upstream) -> None:
    start_slow(comfyui)
    try:
        posted = []
        for i in range(3):
            posted.append(post_prompt(comfyui, quick_workflow(next(_SEEDS)),
                                      prompt_id=f"gw-own-{i}-{next(_SEEDS)}"))
        posted.append(post_prompt(comfyui, quick_workflow(next(_SEEDS)), number=2.5))
        posted.append(post_prompt(comfyui, quick_workflow(next(_SEEDS)), front=True))
        heap: list[tuple[float, str]] = []
        for doc in posted:
            heapq.heappush(heap, (doc["number"], doc["prompt_id"]))
        pending = queue(comfyui)["queue_pending"]
        assert [row[1] for row in pending] == [pid for _, pid in heap]  # heap order
        assert [row[1] for row in pending] != \
            [pid for _, pid in sorted(heap)], "a heap this shape is not sorted"
        assert posted[4]["number"] < 0  # front: a negative number
        row = pending[0]
        assert len(row) == 5 and isinstance(row[2], dict) and isinstance(row[4], list)
        assert "create_time" in row[3]
    finally:
        empty_queue(comfyui)


def test_comfyui_interrupt_acts_only_on_the_running_job(comfyui: Upstream) -> None:
    running = start_slow(comfyui)
    waiting = post_prompt(comfyui, slow_workflow(next(_SEEDS)), seconds=60.0)["prompt_id"]
    try:
        resp = httpx.post(f"{comfyui.url}/interrupt", json={"prompt_id": waiting}, timeout=10)
        assert resp.status_code == 200 and resp.content == b""
        # A pending id is ignored: the queue is as it was, at once and a moment later.
        for _ in range(2):
            doc = queue(comfyui)
            assert doc["queue_running"][0][1] == running
            assert [r[1] for r in doc["queue_pending"]] == [waiting]
            time.sleep(0.5)
        # Without an id: the running job ends, interrupted; the pending one starts.
        assert httpx.post(f"{comfyui.url}/interrupt", timeout=10).status_code == 200
        wait_for(lambda: running_id(comfyui) == waiting, "the pending job started", 60)
        entry = wait_for(lambda: history_of(comfyui, running),
                         "the interrupted job's history", 120)
        assert entry["status"]["status_str"] == "error"
        assert entry["status"]["completed"] is False
    finally:
        empty_queue(comfyui)


def test_comfyui_free_only_sets_flags_and_never_interrupts(comfyui: Upstream) -> None:
    pid = post_prompt(comfyui, slow_workflow(next(_SEEDS), steps=2), seconds=2.0)["prompt_id"]
    wait_for(lambda: running_id(comfyui) == pid, "the job running", 120)
    resp = httpx.post(f"{comfyui.url}/free", json={"unload_models": True, "free_memory": True},
                      timeout=10)
    assert resp.status_code == 200 and resp.content == b""
    entry = wait_for(lambda: history_of(comfyui, pid), "the job's end", 120)
    assert entry["status"]["status_str"] == "success"  # it ran to its end
    assert httpx.post(f"{comfyui.url}/free", content=b"", timeout=10).status_code == 500


async def _frames(url: str, client_id: str, until: asyncio.Event,
                  out: list[dict[str, Any]], ready: threading.Event) -> None:
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        out.append(await ws.receive_json(timeout=10))
        ready.set()
        while not until.is_set():
            try:
                message = await ws.receive(timeout=0.2)
            except TimeoutError:
                continue
            if message.type == aiohttp.WSMsgType.TEXT:
                out.append(json.loads(message.data))
            elif message.type != aiohttp.WSMsgType.BINARY:
                return


def _listen(url: str, client_ids: list[str]) -> tuple[Any, asyncio.Event,
                                                     dict[str, list[dict[str, Any]]]]:
    """Sockets with these clientIds, collecting frames in a thread of their own."""
    frames: dict[str, list[dict[str, Any]]] = {c: [] for c in client_ids}
    loop = asyncio.new_event_loop()
    until = asyncio.Event()
    readies = {c: threading.Event() for c in client_ids}

    async def all_of() -> None:
        await asyncio.gather(*(_frames(url, c, until, frames[c], readies[c])
                               for c in client_ids))
    thread = threading.Thread(target=loop.run_until_complete, args=(all_of(),), daemon=True)
    thread.start()
    for ready in readies.values():
        assert ready.wait(20)

    def stop() -> None:
        loop.call_soon_threadsafe(until.set)
        thread.join(20)
        loop.close()
    return stop, until, frames


def test_comfyui_sends_a_prompts_progress_only_to_its_socket(comfyui: Upstream) -> None:
    stop, _, frames = _listen(comfyui.url, ["gw-a", "gw-b"])
    try:
        assert frames["gw-a"][0]["data"]["sid"] == "gw-a"
        pid = post_prompt(comfyui, quick_workflow(next(_SEEDS)), client_id="gw-a")["prompt_id"]
        wait_for(lambda: any(f["type"] == "executing" and f["data"].get("node") is None
                             and f["data"].get("prompt_id") == pid for f in frames["gw-a"]),
                 "the prompt's end marker on its socket", 60)
    finally:
        stop()
    mine = [f["type"] for f in frames["gw-a"] if (f.get("data") or {}).get("prompt_id") == pid]
    assert mine[0] == "execution_start" and "executed" in mine and "execution_success" in mine
    others = [f["type"] for f in frames["gw-b"]
              if (f.get("data") or {}).get("prompt_id") == pid]
    assert others == [], others  # only status frames reach the other socket


def test_comfyui_answers_an_identical_prompt_from_its_cache(comfyui: Upstream) -> None:
    stop, _, frames = _listen(comfyui.url, ["gw-cache"])
    flow = quick_workflow(next(_SEEDS))
    try:
        ids = []
        for _ in range(2):
            pid = post_prompt(comfyui, flow, client_id="gw-cache")["prompt_id"]
            wait_for(lambda pid=pid: history_of(comfyui, pid), "the prompt's end", 60)
            ids.append(pid)
    finally:
        stop()

    def cached_nodes(pid: str) -> list[str]:
        found = [f["data"]["nodes"] for f in frames["gw-cache"]
                 if f["type"] == "execution_cached" and f["data"].get("prompt_id") == pid]
        return list(found[0]) if found else []
    assert cached_nodes(ids[0]) == []
    assert sorted(cached_nodes(ids[1])) == sorted(flow)  # nothing ran the second time


def test_comfyui_dies_at_once_on_sigterm_with_its_job(comfyui: Upstream) -> None:
    proc = comfyui.owned()
    start_slow(comfyui)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait(10)
    assert code == -signal.SIGTERM, code
    assert time.monotonic() - t0 < 2.0


# -- Ollama -------------------------------------------------------------------------------

def generate(up: Upstream, **body: Any) -> httpx.Response:
    return httpx.post(f"{up.url}/api/generate", json={"model": up.model, **body}, timeout=60)


def loaded(up: Upstream) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = httpx.get(f"{up.url}/api/ps", timeout=10).json()["models"]
    return models


def test_ollama_unload_is_answered_at_once_and_done_after(ollama: Upstream) -> None:
    assert generate(ollama).json()["done_reason"] == "load"
    [entry] = loaded(ollama)
    for key in ("name", "model", "size", "digest", "details", "expires_at", "size_vram"):
        assert key in entry, entry
    answer = generate(ollama, keep_alive=0)
    assert answer.status_code == 200
    doc = answer.json()
    assert doc["done"] is True and doc["done_reason"] == "unload" and doc["response"] == ""
    wait_for(lambda: loaded(ollama) == [], "/api/ps empty after the unload", 10)


def test_ollama_keeps_a_busy_model_until_its_request_ends(ollama: Upstream) -> None:
    options = {"num_predict": 3000} if ollama.which == "real" else \
        {"num_predict": 60, "standin_token_delay": 0.05}
    lines: list[dict[str, Any]] = []

    def stream() -> None:
        with httpx.stream("POST", f"{ollama.url}/api/generate", timeout=300, json={
                "model": ollama.model, "prompt": "count", "options": options}) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(json.loads(line))
    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    wait_for(lambda: len(lines) >= 3, "the stream under way", 60)
    answer = generate(ollama, keep_alive=0).json()
    assert answer["done_reason"] == "unload"  # answered at once...
    if thread.is_alive():
        assert loaded(ollama), "unloaded while its request still ran"  # ...done later
    thread.join(300)
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] in ("length", "stop")
    wait_for(lambda: loaded(ollama) == [], "/api/ps empty once the request ended", 10)


def test_ollama_reads_keep_alive_as_it_does(ollama: Upstream) -> None:
    for value, message in (("-1", "missing unit"), (True, "Unsupported type"),
                           ("abc", "invalid duration")):
        resp = generate(ollama, keep_alive=value)
        assert resp.status_code == 400 and message in resp.json()["error"], (value, resp.text)
    assert generate(ollama, keep_alive="10s").json()["done_reason"] == "load"
    assert generate(ollama, keep_alive="0s").json()["done_reason"] == "unload"
    wait_for(lambda: loaded(ollama) == [], "unloaded by keep_alive '0s'", 10)


def test_ollama_error_shapes(ollama: Upstream) -> None:
    missing = httpx.post(f"{ollama.url}/api/generate", timeout=30,
                         json={"model": "gpuwarden-nope", "prompt": "x"})
    assert missing.status_code == 404
    assert missing.json() == {"error": "model 'gpuwarden-nope' not found"}
    openai = httpx.post(f"{ollama.url}/v1/chat/completions", timeout=30, json={
        "model": "gpuwarden-nope", "messages": [{"role": "user", "content": "x"}]})
    assert openai.status_code == 404 and openai.json()["error"]["type"] == "not_found_error"
    bad = httpx.post(f"{ollama.url}/api/generate", content=b"{nope", timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()
    method = httpx.get(f"{ollama.url}/api/generate", timeout=30)
    assert method.status_code == 405 and method.text == "405 method not allowed"
    unknown = httpx.get(f"{ollama.url}/api/gpuwarden-nope", timeout=30)
    assert unknown.status_code == 404 and unknown.text == "404 page not found"


def test_ollama_holds_a_model_in_a_runner_child(ollama: Upstream) -> None:
    proc = ollama.owned()
    server = psutil.Process(proc.pid)
    assert generate(ollama).json()["done_reason"] == "load"
    wait_for(lambda: server.children(recursive=True), "a runner child", 30)
    generate(ollama, keep_alive=0)
    wait_for(lambda: not [c for c in server.children(recursive=True) if c.is_running()
                          and c.status() != psutil.STATUS_ZOMBIE], "the runner gone", 10)
