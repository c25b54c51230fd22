"""The real ComfyUI behind gpuwarden, end to end: as a process workload holding
simulated VRAM (a `gpuwarden.gpu.hold` claim beside it), behind its demand proxy, with
the Ollama stand-in in the other mode; its own page in headless chromium through the
proxy. Runs when GPUWARDEN_TEST_COMFYUI is a command
that starts ComfyUI on `{port}` (test_upstream_contract.py's variable), and prints the
figures the README quotes; skips otherwise, saying why.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from .conftest import SimNode, run_cli, write_toml
from .standins import free_port
from .test_upstream_contract import quick_workflow

COMMAND = os.environ.get("GPUWARDEN_TEST_COMFYUI", "")
pytestmark = pytest.mark.skipif(
    not COMMAND or COMMAND.startswith(("http://", "https://")),
    reason="GPUWARDEN_TEST_COMFYUI names no command that starts a real ComfyUI on {port}")


def test_real_comfyui_through_its_proxy(node: SimNode, start_daemon: Any) -> None:
    comfy_port, comfy_proxy = free_port(), free_port()
    ollama_port, ollama_proxy = free_port(), free_port()
    hold = [sys.executable, "-m", "gpuwarden.gpu.hold", "--ledger", str(node.ledger),
            "--name", "comfyui", "--mib", "8000"]
    # The claim is held by a child of the workload's shell, in its process group: the
    # stop that ends ComfyUI ends it too, as a CUDA context goes with its process.
    start = f"{shlex.join(hold)} & exec {COMMAND.replace('{port}', str(comfy_port))}"
    tables = node.tables(
        daemon={"default_mode": "llm"},
        workloads__ollama={
            "kind": "process", "stop_timeout": 2, "release": "ollama",
            "url": f"http://127.0.0.1:{ollama_port}", "ready_timeout": 20,
            "command": [sys.executable, "-m", "gpuwarden.standins", "ollama", "--port",
                        str(ollama_port), "--ledger", str(node.ledger), "--mib", "6000"]},
        workloads__comfyui={
            "kind": "process", "stop_timeout": 10, "release": "comfyui",
            "url": f"http://127.0.0.1:{comfy_port}", "ready_timeout": 120,
            "command": ["sh", "-c", start]},
        modes__llm={"workloads": ["ollama"]},
        modes__image={"workloads": ["comfyui"]},
        proxy__ollama={"listen": f"127.0.0.1:{ollama_proxy}", "min_dwell": 0},
        proxy__comfyui={"listen": f"127.0.0.1:{comfy_proxy}", "min_dwell": 0},
    )
    config = write_toml(node.config_path, tables)
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm", timeout=60)
    proxy = f"http://127.0.0.1:{comfy_proxy}"
    figures = []

    # Switches llm -> image -> llm, with the real ComfyUI's start to ready.
    for target in ("image", "llm"):
        result = run_cli("--config", str(config), "mode", target, "--json", timeout=300)
        assert result.returncode == 0, result
        t = json.loads(result.stdout)["timings"]
        figures.append(f"switch to {target}: {t['total_s']:.2f} s (start to ready "
                       f"{t['start_s']:.2f} s)")

    # Open WebUI's image sequence, started in llm: its socket, then its prompt.
    frames: list[dict[str, Any]] = []
    ready, done = threading.Event(), threading.Event()

    async def socket() -> None:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{proxy}/ws?clientId=owui",
                                   headers={"Origin": proxy}) as ws:
            frames.append(await ws.receive_json(timeout=10))
            ready.set()
            while not done.is_set():
                try:
                    message = await ws.receive(timeout=0.2)
                except TimeoutError:
                    continue
                if message.type == aiohttp.WSMsgType.TEXT:
                    doc = json.loads(message.data)
                    frames.append(doc)
                    if doc["type"] == "execution_success":
                        done.set()
                elif message.type != aiohttp.WSMsgType.BINARY:
                    return
    thread = threading.Thread(target=asyncio.run, args=(socket(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    t0 = time.monotonic()
    resp = httpx.post(f"{proxy}/prompt", timeout=300, headers={"Origin": proxy}, json={
        "prompt": quick_workflow(int(time.time())), "client_id": "owui"})
    assert resp.status_code == 200, resp.text
    assert done.wait(300), frames
    took = time.monotonic() - t0
    thread.join(10)
    switch = daemon.wait_event("mode.switch.completed", to="image", count=2)[-1]
    figures.append(f"Open WebUI's image sequence from llm: the image after {took:.2f} s, "
                   f"of which the switch {switch['timings']['total_s']:.2f} s")

    # Browser-shaped requests: through the proxy as straight to ComfyUI.
    direct = f"http://127.0.0.1:{comfy_port}"
    for where, base in (("proxy", proxy), ("direct", direct)):
        page = httpx.get(f"{base}/", headers={"Origin": base}, timeout=30)
        queue = httpx.get(f"{base}/queue", headers={"Origin": base}, timeout=30)
        post = httpx.post(f"{base}/prompt", headers={"Origin": base}, timeout=60, json={
            "prompt": quick_workflow(int(time.time()) + 7)})
        figures.append(f"{where}: page {page.status_code}, /queue {queue.status_code}, "
                       f"/prompt {post.status_code} with the page's own Origin")
        assert (page.status_code, queue.status_code, post.status_code) == (200, 200, 200)

    # ComfyUI's own page through the proxy, in a browser: it loads, queues a workflow
    # (Run) and shows the result on its canvas.
    figures.append(_page_in_a_browser(proxy, node.root / "comfyui-page.png"))
    print("\n" + "\n".join(figures))


def _page_in_a_browser(proxy: str, screenshot: Path) -> str:
    from playwright.sync_api import sync_playwright

    from .browser import launch, only_loopback

    flow = quick_workflow(int(time.time()) + 11)
    with sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # Only loopback: the page's calls to other hosts (ComfyUI's own services) fail.
        only_loopback(page, ("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:"))
        t0 = time.monotonic()
        page.goto(proxy + "/")
        page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
        loaded = time.monotonic() - t0
        page.evaluate("(flow) => window.app.loadApiJson(flow, 'gpuwarden.json')", flow)
        t0 = time.monotonic()
        page.get_by_role("button", name="Run", exact=True).click()
        page.wait_for_function(
            """() => (window.app.graph._nodes || window.app.graph.nodes).some(
                   n => n.imgs && n.imgs.length && n.imgs[0].complete
                        && n.imgs[0].naturalWidth > 0)""", timeout=120_000)
        shown = time.monotonic() - t0
        page.screenshot(path=str(screenshot))
        browser.close()
    return (f"ComfyUI's page through the proxy: loaded in {loaded:.1f} s, Run to the "
            f"result on its canvas {shown:.2f} s (screenshot {screenshot})")
