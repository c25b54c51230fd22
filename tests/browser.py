"""Debian's chromium, headless, driven by Playwright's Python package (never a browser
of Playwright's own), for the tests that look at pages; and the real programs some
tests install once into a cache outside the clone."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "browser_missing", "cached_program", "launch",
           "only_loopback"]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, and quiet: without the background-networking flags chromium calls Google.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser_missing() -> str:
    """Why there is no browser to drive here ("" when there is)."""
    if not Path(CHROMIUM).exists():
        return "no chromium (scripts/test.sh installs Debian's)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "no playwright (the test extra installs it)"
    return ""


def launch(pw: Any) -> Any:
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def only_loopback(on: Any, allowed: tuple[str, ...], outside: list[str] | None = None) -> None:
    """Let a page or context reach only URLs starting with `allowed`; every other
    request is aborted (and noted in `outside`): a test sends nothing off this host."""
    def route(request_route: Any) -> None:
        if request_route.request.url.startswith(allowed):
            request_route.continue_()
        else:
            if outside is not None:
                outside.append(request_route.request.url)
            request_route.abort()
    on.route("**/*", route)


def cached_program(script: str, required_env: str, what: str, *, needs_browser: bool = False
                   ) -> str:
    """The path scripts/`script` prints once it has installed its program into the
    cache (or found it there). Where that cannot be had the test is skipped, or failed
    when `required_env` is 1 (CI)."""
    why = browser_missing() if needs_browser else ""
    if not why:
        done = subprocess.run([str(ROOT / "scripts" / script)], capture_output=True,
                              text=True, timeout=1800)
        if done.returncode == 0:
            return done.stdout.strip().splitlines()[-1]
        why = f"scripts/{script} failed: {done.stderr[-2000:]}"
    if os.environ.get(required_env) == "1":
        pytest.fail(f"{what} is required here: {why}")
    pytest.skip(f"no {what}: {why}")
