"""A person's day in Open WebUI, in a real browser, through gpuwarden's proxies.

Open WebUI 0.12 from PyPI (scripts/open-webui.sh installs it once into a cache outside
the clone), offline, and Debian's chromium driven by Playwright's Python package,
against a real daemon whose Ollama and ComfyUI are the stand-ins behind demand
proxies. The person opens Open WebUI while `image` is active and sees the models; a
chat switches the GPU to `llm` and its answer appears; an image asked for in `llm`
switches to `image` and appears; a second chat sent while that image job runs waits
for it and gets its answer, and no job is interrupted. A screenshot of each step is
kept under test-artifacts/open-webui/ (or $GPUWARDEN_ARTIFACTS), and the figures are
printed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .browser import cached_program, launch, only_loopback
from .conftest import SimNode, run_cli
from .standins import free_port
from .test_proxy import ProxiedNode

ROOT = Path(__file__).resolve().parent.parent
MODEL = "standin:7b"
# Which inputs of Open WebUI's built-in ComfyUI workflow it fills in (node ids of that
# workflow); a random seed, as a person's, so ComfyUI's cache does not answer.
WORKFLOW_NODES = [
    {"type": "prompt", "key": "text", "node_ids": ["6"]},
    {"type": "model", "key": "ckpt_name", "node_ids": ["4"]},
    {"type": "width", "key": "width", "node_ids": ["5"]},
    {"type": "height", "key": "height", "node_ids": ["5"]},
    {"type": "steps", "key": "steps", "node_ids": ["3"]},
    {"type": "seed", "key": "seed", "node_ids": ["3"]},
]

pytestmark = pytest.mark.timeout(900)


def _open_webui() -> str:
    return cached_program("open-webui.sh", "GPUWARDEN_REQUIRE_OPEN_WEBUI", "a real Open WebUI",
                          needs_browser=True)


def open_webui_env(data: Path, port: int, ollama: str, comfy: str) -> dict[str, str]:
    """Open WebUI offline, without login, on the proxies. Each setting is documented
    in the README ("Open WebUI and AnythingLLM"); they are written into its database
    at its first start, so every run gets a fresh DATA_DIR."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ") if k in os.environ}
    return {
        **keep,
        "DATA_DIR": str(data / "data"), "STATIC_DIR": str(data / "static"),
        "WEBUI_SECRET_KEY": "gpuwarden-test-not-a-secret", "WEBUI_AUTH": "False",
        "OFFLINE_MODE": "True", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "ENABLE_VERSION_UPDATE_CHECK": "False", "RAG_EMBEDDING_MODEL": "",
        "ENABLE_OLLAMA_API": "True", "OLLAMA_BASE_URL": ollama,
        "ENABLE_OPENAI_API": "False",
        "ENABLE_IMAGE_GENERATION": "True", "IMAGE_GENERATION_ENGINE": "comfyui",
        "COMFYUI_BASE_URL": comfy, "IMAGE_GENERATION_MODEL": "model.safetensors",
        "COMFYUI_WORKFLOW_NODES": json.dumps(WORKFLOW_NODES),
        "IMAGE_SIZE": "512x512", "IMAGE_STEPS": "20",
        "ENABLE_IMAGE_PROMPT_GENERATION": "False",
        "DEFAULT_MODEL_PARAMS": json.dumps({"function_calling": "legacy"}),
        "ENABLE_TITLE_GENERATION": "False", "ENABLE_TAGS_GENERATION": "False",
        "ENABLE_FOLLOW_UP_GENERATION": "False", "ENABLE_COMMUNITY_SHARING": "False",
        "CORS_ALLOW_ORIGIN": f"http://127.0.0.1:{port}",
    }


@pytest.fixture
def webui(node: SimNode, start_daemon: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    binary = _open_webui()
    proxied = ProxiedNode(node, start_daemon)
    daemon = proxied.start(default_mode="llm", job_seconds=8.0)
    # The person used Ollama before: the proxy kept its model list and version.
    for path in ("/api/tags", "/api/version"):
        assert httpx.get(proxied.ollama + path, timeout=30).status_code == 200
    switched = run_cli("--config", str(node.config_path), "mode", "image", "--timeout", "60")
    assert switched.returncode == 0, switched
    port = free_port()
    log = open(tmp_path / "open-webui.log", "wb")  # noqa: SIM115 - closed below
    (tmp_path / "owui").mkdir()
    proc = subprocess.Popen(
        [binary, "serve", "--host", "127.0.0.1", "--port", str(port)], stdout=log,
        stderr=subprocess.STDOUT, cwd=tmp_path / "owui", start_new_session=True,
        env=open_webui_env(tmp_path / "owui", port, proxied.ollama, proxied.comfy))
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "open-webui.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Open WebUI did not start"
            time.sleep(0.2)
        yield {"url": url, "proxied": proxied, "daemon": daemon,
               "start_s": time.monotonic() - t0, "log": tmp_path / "open-webui.log"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def test_a_persons_day_in_open_webui(webui: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    proxied: ProxiedNode = webui["proxied"]
    daemon = webui["daemon"]
    shots = Path(os.environ.get("GPUWARDEN_ARTIFACTS", ROOT / "test-artifacts")) / "open-webui"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    figures = [f"Open WebUI answered {webui['start_s']:.1f} s after its start"]

    def mode() -> str:
        gpu = daemon.status()["gpus"][0]
        return str(gpu["mode"]) + (" (switching)" if gpu["transition"] else "")

    def comfy_jobs() -> dict[str, Any]:
        """ComfyUI's own queue (nothing while it is stopped)."""
        try:
            doc: dict[str, Any] = httpx.get(f"{proxied.comfy_direct}/queue",
                                            timeout=10).json()
        except httpx.ConnectError:
            return {"queue_running": [], "queue_pending": []}
        return doc

    outside: list[str] = []
    with sync_playwright() as pw:
        browser = launch(pw)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(120_000)
        only_loopback(context, ("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:"),
                      outside)
        page = context.new_page()

        def shot(name: str, on: Any = page) -> None:
            on.screenshot(path=str(shots / f"{len(list(shots.iterdir())) + 1:02d}-{name}.png"))

        def open_chat(on: Any) -> None:
            on.goto(webui["url"] + "/")
            on.locator("#chat-input").wait_for(state="visible")
            okay = on.get_by_role("button", name="Okay, Let's Go!")
            try:  # a new user's first visit shows What's New
                okay.wait_for(state="visible", timeout=15_000)
                okay.click()
                okay.wait_for(state="hidden")
            except Exception:  # not shown on a later visit
                pass

        def answers(on: Any) -> Any:
            return on.locator("div[id^='message-']").filter(
                has=on.locator(".chat-assistant"))

        # 1. image is active, Ollama stopped: the models are listed all the same.
        assert mode() == "image"
        open_chat(page)
        selector = page.locator("#model-selector-model-button")
        selector.click()
        option = page.locator(f'#model-selector-list [data-value="{MODEL}"]')
        option.wait_for(state="visible")
        shot("models-listed-while-image-is-active")
        option.click()
        assert mode() == "image"

        # 2. A chat: the GPU switches to llm and the answer appears.
        page.locator("#chat-input").fill("Hello, who are you?")
        before = answers(page).count()
        t0 = time.monotonic()
        page.locator("#send-message-button").click()
        first = answers(page).nth(before)
        first.locator(".chat-assistant", has_text="tok0").wait_for(state="visible")
        figures.append(f"chat sent while image was active: first token shown after "
                       f"{time.monotonic() - t0:.2f} s")
        first.locator(".regenerate-response-button").first.wait_for(state="attached")
        shot("chat-answered-after-switching-to-llm")
        assert mode() == "llm"

        # A second tab, ready with a chat to send while the image job will run.
        second = context.new_page()
        open_chat(second)
        second.locator("#chat-input").fill("And now, while the image is drawn?")

        # 3. An image, asked for in llm: the GPU switches to image and it appears.
        page.bring_to_front()
        page.locator("#integration-menu-button").click()
        switch = page.get_by_role("menuitemcheckbox", name="Image")
        switch.click()
        page.keyboard.press("Escape")
        page.locator('button[aria-label="Image"][aria-pressed="true"]').wait_for(
            state="visible")
        page.locator("#chat-input").fill("A red fox in the snow")
        before = answers(page).count()
        t0 = time.monotonic()
        page.locator("#send-message-button").click()
        image_turn = answers(page).nth(before)
        # 4. While the image job runs, a second chat, in another tab.
        deadline = time.monotonic() + 120
        while not comfy_jobs()["queue_running"]:
            assert time.monotonic() < deadline, "the image job never ran"
            time.sleep(0.05)
        job = comfy_jobs()["queue_running"][0][1]
        t_second, sent_at = time.monotonic(), time.time()
        second.locator("#send-message-button").click()
        shot("second-chat-waits-for-the-image-job", second)
        page.wait_for_function(
            """el => { const i = el.querySelector('img[data-cy="image"]');
                       return i && i.complete && i.naturalWidth > 0; }""",
            arg=image_turn.element_handle())
        figures.append(f"image asked for while llm was active: shown after "
                       f"{time.monotonic() - t0:.2f} s (an 8 s job)")
        shot("image-shown-after-switching-to-image")
        reply = answers(second).nth(0)
        reply.locator(".chat-assistant", has_text="tok0").wait_for(state="visible")
        answered_at = time.time()
        figures.append(f"second chat, sent during the job: first token after "
                       f"{time.monotonic() - t_second:.2f} s")
        shot("second-chat-answered-after-the-job", second)
        browser.close()

    # ComfyUI has stopped since (the second chat switched back to llm); its log says
    # how each job ended.
    ended = [json.loads(line) for line in
             (proxied.node.state_dir / "logs" / "comfyui.log").read_text().splitlines()
             if line.startswith('{"job"')]
    [mine] = [e for e in ended if e["job"] == job]
    assert mine["status"] == "success"  # not interrupted
    assert sent_at < mine["finished_at"] <= answered_at  # sent during it, answered after
    assert all(e["status"] == "success" for e in ended), ended
    assert outside == [], outside  # the page asked nothing of any other host
    log = webui["log"].read_text(errors="replace")
    assert "huggingface.co" not in log and "api.openai.com" not in log
    print("\n" + "\n".join(figures) + f"\nscreenshots: {shots}")
