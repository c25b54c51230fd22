#!/usr/bin/env python3
"""The node page's cost: the daemon's CPU with nobody watching, and with one page open.

    .venv/bin/python bench/node_page.py [--seconds 60] [--rounds 3]

The demo's node (a 20 GiB simulated GPU, the Ollama and ComfyUI stand-ins behind their
demand proxies, a sample each second) runs as a real daemon with its API on loopback.
Its own CPU time (user + system, its process alone: the stand-ins are apart) is read
over `--seconds` with no page open, then with one page open in Debian's headless
chromium (its state read every 2 s, the event stream open), alternated `--rounds`
times. Also measured: the bytes of the page's first load, and how long after a CLI
switch returns the page shows the new mode.

Figures go to stdout and `node_page.json` in `--out` (default bench/out, or `$OUT`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DaemonUnderTest, write_report

from gpuwarden.demo import DemoPorts, demo_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def cpu_percent(proc: psutil.Process, seconds: float) -> float:
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return round(100 * used / seconds, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT", Path(__file__).parent / "out")))
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    folder = Path(tempfile.mkdtemp(prefix="gpuwarden-bench-ui-"))
    ports = DemoPorts.free()
    base = f"http://127.0.0.1:{ports.api}"
    report: dict[str, Any] = {}
    try:
        with DaemonUnderTest(folder, demo_config(folder, ports),
                             socket=folder / "gpuwarden.sock") as daemon:
            proc = psutil.Process(daemon.proc.pid)
            cli = [sys.executable, "-m", "gpuwarden.cli", "--config", str(daemon.config)]
            subprocess.run([*cli, "mode", "llm"], check=True, capture_output=True)
            idle: list[float] = []
            watched: list[float] = []
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
                for _ in range(args.rounds):
                    idle.append(cpu_percent(proc, args.seconds))
                    context = browser.new_context(viewport={"width": 1280, "height": 900})
                    page = context.new_page()
                    sizes: list[int] = []
                    page.on("response", lambda r, sizes=sizes: sizes.append(len(r.body()))
                            if "/ui/api/events" not in r.url else None)
                    page.goto(f"{base}/ui")
                    expect(page.locator("#live")).to_have_text("(live)", timeout=30_000)
                    page.wait_for_load_state("networkidle")
                    report["first_load_bytes"] = sum(sizes)
                    watched.append(cpu_percent(proc, args.seconds))
                    shown = []
                    for mode in ("image", "llm"):
                        subprocess.run([*cli, "mode", mode], check=True, capture_output=True)
                        t0 = time.monotonic()
                        expect(page.locator("#mode-0")).to_have_text(mode, timeout=10_000)
                        shown.append(time.monotonic() - t0)
                    report.setdefault("cli_switch_to_page_s", []).extend(
                        round(s, 3) for s in shown)
                    context.close()
                browser.close()
            report["daemon_cpu_idle_pct"] = idle
            report["daemon_cpu_one_page_pct"] = watched
            report["daemon_cpu_idle_median_pct"] = statistics.median(idle)
            report["daemon_cpu_one_page_median_pct"] = statistics.median(watched)
            report["cli_switch_to_page_median_s"] = statistics.median(
                report["cli_switch_to_page_s"])
            report["seconds_per_measure"] = args.seconds
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_report(args.out, "node_page", report)


if __name__ == "__main__":
    main()
