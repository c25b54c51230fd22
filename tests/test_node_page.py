"""The node page (/ui) on a real daemon over the sim GPU: its rules over plain HTTP, then
a person's visit in Debian's chromium driven by Playwright: the mode and VRAM shown, a
CLI switch appearing, a switch from the page audited as ui:<token>, a refusal's
reason, a token-less action refused. Screenshots at desktop and phone widths are kept
under test-artifacts/node-page/ (or $GPUWARDEN_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .browser import browser_missing, launch, only_loopback
from .conftest import SimNode, run_cli, two_process_modes, wait_for
from .standins import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "ops-token-" + "x" * 32
OTHER = "other-token-" + "y" * 32


def node_with_page(node: SimNode, **extra: dict[str, Any]) -> tuple[Path, str]:
    port = free_port()
    tables = two_process_modes(node, **{
        "api": {"listen": f"127.0.0.1:{port}"},
        "api.tokens.ops": {"token": TOKEN},
        "api.tokens.other": {"token": OTHER},
        "workloads.comfyui": {"expected_mib": 8000}, **extra})
    return node.write(**tables), f"http://127.0.0.1:{port}"


def sign_in(client: httpx.Client, base: str, token: str = TOKEN) -> httpx.Response:
    return client.post(f"{base}/ui/api/session", json={"token": token},
                       headers={"Origin": base})


def test_the_page_reads_on_loopback_and_acts_only_signed_in_from_itself(
        node: SimNode, start_daemon) -> None:
    config, base = node_with_page(node)
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    with httpx.Client(timeout=30) as client:
        page = client.get(f"{base}/ui")
        assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert TOKEN not in page.text
        state = client.get(f"{base}/ui/api/state").json()  # open on loopback
        assert state["status"]["gpus"][0]["mode"] == "llm" and state["signed_in"] is None
        assert state["history"]["0"] and state["thresholds"]["warn"] == 0.8

        # Acting without a session, from another site, without Origin, by GET: refused.
        body = {"mode": "image"}
        assert client.post(f"{base}/ui/api/mode", json=body,
                           headers={"Origin": base}).status_code == 401
        assert client.get(f"{base}/ui/api/mode").status_code == 405
        assert sign_in(client, base, "wrong-" + "z" * 32).status_code == 401
        signed = sign_in(client, base)
        assert signed.status_code == 200 and signed.json()["signed_in"] == "ops"
        cookie = signed.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
        assert TOKEN not in cookie and TOKEN[:12] not in cookie
        for headers in ({"Origin": "http://evil.example"}, {},
                        {"Origin": base, "Host": "evil.example"}):
            refused = client.post(f"{base}/ui/api/mode", json=body, headers=headers)
            assert refused.status_code == 403, (headers, refused.text)
        # DNS rebinding: a foreign Host is refused for reading too.
        assert client.get(f"{base}/ui/api/state",
                          headers={"Host": "evil.example"}).status_code == 403
        assert client.post(f"{base}/ui/api/mode", content=b"mode=image",
                           headers={"Origin": base,
                                    "Content-Type": "application/x-www-form-urlencoded"}
                           ).status_code == 415
        assert daemon.events("mode.switch.started") == [] or all(
            e["to"] != "image" for e in daemon.events("mode.switch.started"))

        accepted = client.post(f"{base}/ui/api/mode", json=body, headers={"Origin": base})
        assert accepted.status_code == 202, accepted.text
        done = daemon.wait_event("mode.switch.completed", to="image")[0]
        assert done["requested_by"] == "ui:ops"
        assert client.get(f"{base}/ui/api/switches/{accepted.json()['id']}").json()["done"]

        # A reload that changes the token ends the sessions it granted.
        tables = two_process_modes(node, **{
            "api": {"listen": base.removeprefix("http://")},
            "api.tokens.ops": {"token": TOKEN[::-1]},
            "api.tokens.other": {"token": OTHER},
            "workloads.comfyui": {"expected_mib": 8000}})
        node.write(**tables)
        assert run_cli("--config", str(config), "reload").returncode == 0
        assert client.post(f"{base}/ui/api/mode", json={"mode": "llm"},
                           headers={"Origin": base}).status_code == 401


def test_a_person_watches_and_acts_from_the_page_in_chromium(
        node: SimNode, start_daemon) -> None:
    if missing := browser_missing():
        pytest.fail(missing)  # scripts/test.sh installs both: never skipped
    from playwright.sync_api import expect, sync_playwright

    config, base = node_with_page(node, **{"modes.image": {"lease": "1h"}})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    daemon.wait_used(6000)
    shots = Path(os.environ.get("GPUWARDEN_ARTIFACTS", ROOT / "test-artifacts")) / "node-page"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    figures: list[str] = []
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = launch(pw)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.set_default_timeout(30_000)
        only_loopback(context, (base, "data:"), outside)
        page = context.new_page()
        weight: list[int] = []
        page.on("response", lambda r: weight.append(len(r.body()))
                if r.url.startswith(base) and "/ui/api/events" not in r.url else None)
        page.goto(f"{base}/ui")
        expect(page.locator("#mode-0")).to_have_text("llm")
        expect(page.locator("#used-0")).to_contain_text("6,000 MiB")
        expect(page.locator("[data-gpu='0'] .tier")).to_contain_text("OK")
        expect(page.locator("#live")).to_have_text("(live)")
        page.wait_for_load_state("networkidle")
        figures.append(f"first load: {sum(weight):,} bytes in {len(weight)} responses")

        # Token-less: the buttons are off, and the action itself is refused.
        expect(page.locator("[data-mode='image']")).to_be_disabled()
        status = page.evaluate("""async () => (await fetch('/ui/api/mode', {method: 'POST',
            headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({mode: 'image'})})).status""")
        assert status == 401

        # A switch made with the CLI shows up by itself.
        result = run_cli("--config", str(config), "mode", "image")
        assert result.returncode == 0, result
        t0 = time.monotonic()
        expect(page.locator("#mode-0")).to_have_text("image", timeout=2_000)
        figures.append(f"CLI switch shown on the page {time.monotonic() - t0:.2f} s after "
                       "the CLI returned")
        # Its lease, counting down (the default mode, llm, has none).
        expect(page.locator("#lease-0")).to_contain_text(
            "lease: given back after 60 min without demand; ")
        expect(page.locator("#lease-0")).to_contain_text(" min left")

        # A wrong token says so, and the next reads do not wipe it.
        page.fill("#token", "wrong-" + "w" * 32)
        page.click("#sign-in button")
        expect(page.locator("#banner")).to_contain_text("sign-in refused: not a token")
        page.wait_for_timeout(2500)  # a read of the state comes every 2 s
        expect(page.locator("#banner")).to_contain_text("sign-in refused")
        # Sign in, and switch from the page.
        page.fill("#token", TOKEN)
        page.click("#sign-in button")
        expect(page.locator("#signed-in")).to_have_text("signed in as ops")
        expect(page.locator("#banner")).to_be_hidden()
        page.click("[data-mode='llm']")
        expect(page.locator("#progress-0")).to_contain_text("llm is running", timeout=60_000)
        expect(page.locator("#mode-0")).to_have_text("llm")
        expect(page.locator("#lease-0")).to_have_count(0)
        done = daemon.wait_event("mode.switch.completed", to="llm")[-1]
        assert done["requested_by"] == "ui:ops"
        expect(page.locator("#events")).to_contain_text("ui:ops")
        page.screenshot(path=str(shots / "01-desktop.png"), full_page=True)

        # A refusal shows its reason: 13,000 MiB nobody owns leave no room for image.
        stray = node.hold("stray", 13000)
        try:
            wait_for(lambda: page.locator("#used-0").inner_text().startswith("19,000"),
                     "the stray holder on the page")
            expect(page.locator("[data-gpu='0'] .tier")).to_contain_text("ALERT")
            page.click("[data-mode='image']")
            expect(page.locator("#progress-0")).to_contain_text("refused:")
            reason = page.locator("#progress-0").inner_text()
            assert "8000" in reason.replace(",", "") or "fit" in reason, reason
            expect(page.locator("#alerts")).to_contain_text("ok -> alert")
            expect(page.locator("#alerts")).to_contain_text("no workload owns")  # a leak
            page.screenshot(path=str(shots / "02-desktop-refused.png"), full_page=True)

            phone = browser.new_context(viewport={"width": 390, "height": 844},
                                        device_scale_factor=2, is_mobile=True,
                                        has_touch=True)
            only_loopback(phone, (base, "data:"), outside)
            small = phone.new_page()
            small.goto(f"{base}/ui")
            expect(small.locator("#mode-0")).to_have_text("llm")
            small.wait_for_load_state("networkidle")
            width = small.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the page scrolls sideways on a phone ({width} px)"
            small.screenshot(path=str(shots / "03-phone.png"), full_page=True)
            phone.close()
        finally:
            stray.terminate()
            stray.wait(10)
        browser.close()
    assert outside == []
    print("\n" + "\n".join(figures) + f"\nscreenshots: {shots}")


def test_ui_read_token_closes_reading_to_loopback_too(node: SimNode, start_daemon) -> None:
    """Behind a reverse proxy on the same host every visitor looks local."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = node.write(**two_process_modes(node, **{
        "api": {"listen": f"127.0.0.1:{port}", "ui_read": "token"},
        "api.tokens.ops": {"token": TOKEN}}))
    start_daemon(config, node.socket)
    with httpx.Client(timeout=30) as client:
        refused = client.get(f"{base}/ui/api/state")
        assert refused.status_code == 401 and refused.json()["detail"] == {"sign_in": True}
        assert client.get(f"{base}/ui/api/events").status_code == 401
        assert client.get(f"{base}/ui").status_code == 200  # the page, to sign in on
        assert sign_in(client, base).status_code == 200
        assert client.get(f"{base}/ui/api/state").json()["signed_in"] == "ops"
