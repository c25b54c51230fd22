#!/usr/bin/env python3
"""Benchmark: switch overhead over real Docker containers, 150 ms simulated release delay.

    .venv/bin/python bench/switch.py [--switches 12] [--out bench/out]

Starts a private Docker engine (as the tests do), two busybox containers holding
simulated VRAM, and the real daemon; switches llm <-> image N times through the
control socket. Overhead = total switch time - Docker's stop - Docker's start (+
readiness), i.e. what gpuwarden adds: bookkeeping, the write-ahead state, and the
wait until the release is *proven* (which includes the 150 ms the sim takes to
free VRAM, as an H200 did). Writes switch.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import DaemonUnderTest, base_config, write_report  # noqa: E402
from tests.dockerd import IMAGE, PrivateDockerd, holder_script  # noqa: E402


def wait_status(client: httpx.Client, mode: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            doc = client.get("/v1/status").json()
            if doc["gpus"] and doc["gpus"][0]["mode"] == mode and \
                    doc["gpus"][0]["transition"] is None:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"daemon never reached {mode}")


def run(switches: int, release_delay: float) -> dict[str, Any]:
    engine = PrivateDockerd()
    engine.start()
    engine.import_busybox()
    folder = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    ledger = folder / "ledger"
    ledger.mkdir()
    dc = engine.client()
    for name, mib in (("bench-ollama", 6000), ("bench-comfy", 8000)):
        dc.containers.create(IMAGE, ["sh", "-c", holder_script(name, mib)], name=name,
                             network_mode="none",
                             volumes={str(ledger): {"bind": "/ledger", "mode": "rw"}})
    config = base_config(folder, ledger, default_mode="llm", docker_host=engine.host) + f"""
release_delay = {release_delay}
[workloads.ollama]
kind = "docker"
container = "bench-ollama"
stop_timeout = 5
[workloads.comfyui]
kind = "docker"
container = "bench-comfy"
stop_timeout = 5
[modes.llm]
workloads = ["ollama"]
[modes.image]
workloads = ["comfyui"]
"""
    results: list[dict[str, float]] = []
    try:
        with DaemonUnderTest(folder, config) as daemon:
            wait_status(daemon.client, "llm")
            for i in range(switches):
                target = "image" if i % 2 == 0 else "llm"
                t = time.monotonic()
                resp = daemon.client.post("/v1/mode", json={"mode": target})
                wall = time.monotonic() - t
                body = resp.json()
                if resp.status_code != 200:
                    raise SystemExit(f"switch failed: {body}")
                results.append({**body["timings"], "client_wall_s": wall})
    finally:
        for name in ("bench-ollama", "bench-comfy"):
            dc.containers.get(name).remove(force=True)
        dc.close()
        engine.cleanup()
    overhead = [t["total_s"] - t["stop_s"] - t["start_s"] for t in results]
    med = statistics.median
    return {
        "switches": switches,
        "release_delay_s": release_delay,
        "total_s_median": round(med(t["total_s"] for t in results), 4),
        # The request as a client sees it, planning and the status refresh included.
        "client_wall_s_median": round(med(t["client_wall_s"] for t in results), 4),
        "docker_stop_s_median": round(med(t["stop_s"] for t in results), 4),
        "docker_start_s_median": round(med(t["start_s"] for t in results), 4),
        "release_verified_s_median": round(med(t["release_s"] for t in results), 4),
        "overhead_s_median": round(med(overhead), 4),
        "overhead_s_max": round(max(overhead), 4),
        "target_overhead_s": 0.3,
        "raw": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switches", type=int, default=12)
    parser.add_argument("--release-delay", type=float, default=0.15)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    report = run(args.switches, args.release_delay)
    write_report(args.out, "switch", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
