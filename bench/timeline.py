#!/usr/bin/env python3
"""VRAM over time through a mode switch and through a crash loop, plotted (PNG).

    .venv/bin/python bench/timeline.py [--out bench/out]

On the simulated 20 GiB node with a private Docker engine: the real daemon switches
llm -> image -> llm, then a crash-looping container (each start leaks 1500 MiB, as in
the field report) is started with the guard on; then the same container runs
unguarded for as long. VRAM is read from the ledger at 20 Hz by the sim backend.
Writes timeline.json and timeline.png with the warn/alert/critical lines drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.harness import DaemonUnderTest, base_config  # noqa: E402
from gpuwarden.gpu.sim import SimBackend  # noqa: E402
from tests.dockerd import IMAGE, PrivateDockerd, holder_script  # noqa: E402

TOTAL = 20480
LEAK = 1500


class Recorder(threading.Thread):
    def __init__(self, ledger: Path) -> None:
        super().__init__(daemon=True)
        self.sim = SimBackend(ledger, total_mib=TOTAL)
        self.points: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.halt.is_set():
            gpu = self.sim.sample().gpus[0]
            self.points.append((time.monotonic() - self.t0, gpu.used_mib))
            self.halt.wait(0.05)

    def mark(self, label: str) -> None:
        self.marks.append((time.monotonic() - self.t0, label))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--unguarded-s", type=float, default=20.0)
    args = parser.parse_args()
    engine = PrivateDockerd()
    engine.start()
    engine.import_busybox()
    folder = Path(tempfile.mkdtemp(prefix="gw-timeline-"))
    ledger = folder / "ledger"
    ledger.mkdir()
    dc = engine.client()
    vol = {str(ledger): {"bind": "/ledger", "mode": "rw"}}
    dc.containers.create(IMAGE, ["sh", "-c", holder_script("ollama", 6000)], name="tl-ollama",
                         network_mode="none", volumes=vol)
    dc.containers.create(IMAGE, ["sh", "-c", holder_script("comfy", 9000)], name="tl-comfy",
                         network_mode="none", volumes=vol)
    crash = ["sh", "-c", holder_script("crashy", LEAK, leak=True, exit_after=0.3)]
    dc.containers.create(IMAGE, crash, name="tl-crashy", network_mode="none", volumes=vol,
                         restart_policy={"Name": "unless-stopped"})
    config = base_config(folder, ledger, default_mode="llm", docker_host=engine.host,
                         sample_interval=0.5) + f"""
total_mib = {TOTAL}
[crashloop]
max_restarts = 3
[workloads.ollama]
kind = "docker"
container = "tl-ollama"
stop_timeout = 5
[workloads.comfyui]
kind = "docker"
container = "tl-comfy"
stop_timeout = 5
[workloads.crashy]
kind = "docker"
container = "tl-crashy"
stop_timeout = 2
restart_policy = "unless-stopped"
[modes.llm]
workloads = ["ollama"]
[modes.image]
workloads = ["comfyui"]
[modes.broken]
workloads = ["crashy"]
"""
    recorder = Recorder(ledger)
    with DaemonUnderTest(folder, config) as daemon:
        client = daemon.client
        deadline = time.monotonic() + 30
        while not client.get("/v1/status").json()["gpus"][0]["used_mib"]:
            if time.monotonic() > deadline:
                raise SystemExit("llm never held VRAM")
            time.sleep(0.1)
        recorder.start()
        time.sleep(1.5)
        start = time.monotonic() - recorder.t0
        for mode in ("image", "llm"):
            recorder.mark(f"switch to {mode}")
            client.post("/v1/mode", json={"mode": mode})
            time.sleep(1.5)
        switch_window = (start - 1.0, time.monotonic() - recorder.t0)
        recorder.mark("switch to broken (crash loop, guard on)")
        crash_start = time.monotonic() - recorder.t0
        client.post("/v1/mode", json={"mode": "broken"})
        deadline = time.monotonic() + 60
        while not any(e["event"] == "crashloop.blocked"
                      for e in client.get("/v1/events").json()["events"]):
            if time.monotonic() > deadline:
                raise SystemExit("no crash-loop block")
            time.sleep(0.1)
        recorder.mark("blocked")
        time.sleep(2)
        guarded_end = time.monotonic() - recorder.t0
    points = list(recorder.points)
    switch = [(t, u) for t, u in points if switch_window[0] <= t <= switch_window[1]]
    guarded = [(t - crash_start, u) for t, u in points if crash_start <= t <= guarded_end]
    marks = list(recorder.marks)
    # The unguarded baseline: the same container under Docker's policy alone.
    for claim in ledger.glob("crashy-*.mib"):
        claim.unlink()
    recorder.t0, recorder.points = time.monotonic(), []  # the sampling thread follows
    crashy = dc.containers.get("tl-crashy")
    crashy.update(restart_policy={"Name": "unless-stopped"})
    crashy.start()
    time.sleep(args.unguarded_s)
    crashy.stop(timeout=2)
    recorder.halt.set()
    recorder.join(5)
    unguarded = list(recorder.points)
    for name in ("tl-ollama", "tl-comfy", "tl-crashy"):
        dc.containers.get(name).remove(force=True)
    dc.close()
    engine.cleanup()
    report: dict[str, Any] = {
        "total_mib": TOTAL,
        "switch": [(round(t, 3), u) for t, u in switch],
        "crashloop_guarded": [(round(t, 3), u) for t, u in guarded],
        "crashloop_unguarded": [(round(t, 3), u) for t, u in unguarded],
        "marks": marks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timeline.json").write_text(json.dumps(report))
    plot(report, args.out / "timeline.png")
    print(f"peak VRAM, crash loop with guard: {max(u for _, u in guarded)} MiB; "
          f"without: {max(u for _, u in unguarded)} MiB")
    print(f"PNG: {args.out / 'timeline.png'}")
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    total = report["total_mib"]
    for ax in (left, right):
        for frac, colour, label in ((0.80, "#f1c40f", "warn 80 %"), (0.90, "#e67e22",
                                    "alert 90 %"), (0.95, "#e74c3c", "critical 95 %")):
            ax.axhline(frac * total / 1024, color=colour, linestyle="--", linewidth=1,
                       label=label)
        ax.set_ylim(0, total / 1024 * 1.02)
        ax.set_ylabel("VRAM used (GiB)")
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
    ts, us = zip(*report["switch"], strict=True) if report["switch"] else ((), ())
    left.plot(ts, [u / 1024 for u in us], color="#2c3e50", linewidth=1.5, label="VRAM")
    left.set_title("llm -> image -> llm: release verified before each start")
    for t, label in report["marks"][:2]:
        left.axvline(t, color="grey", linewidth=0.8)
        left.text(t, total / 1024 * 0.05, label, rotation=90, fontsize=8, va="bottom")
    g = report["crashloop_guarded"]
    u = report["crashloop_unguarded"]
    right.plot([t for t, _ in u], [m / 1024 for _, m in u], color="#c0392b", linewidth=1.5,
               label="unguarded (Docker unless-stopped)")
    right.plot([t for t, _ in g], [m / 1024 for _, m in g], color="#27ae60", linewidth=2,
               label="gpuwarden crash-loop guard")
    right.set_title("crash loop leaking 1.5 GiB per start")
    left.legend(loc="upper right", fontsize=8)
    right.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
