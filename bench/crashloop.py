#!/usr/bin/env python3
"""Benchmark: crash-loop containment over induced loops, against an unprotected baseline.

    .venv/bin/python bench/crashloop.py [--loops 20] [--baseline-s 30] [--out bench/out]

A busybox container under `unless-stopped` leaks a fresh 1000 MiB simulated claim on
every start and crashes (exit 1) 0.3 s later. With the guard (max_restarts = 3) it is
blocked; the leak is cleared and it is unblocked, which starts the next loop. Reported:
restarts beyond the threshold (target 0), time from the crash that crossed the
threshold to the restart policy reading `no` (median, max), VRAM leaked per loop;
and for the baseline, the same container with no guard, stopped after 30 s.
Writes crashloop.json.
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

LEAK_MIB = 1000
MAX_RESTARTS = 3


def claims(ledger: Path) -> list[Path]:
    return sorted(ledger.glob("crashy-*.mib"))


def wait_event(client: httpx.Client, name: str, since: int, timeout: float = 60
               ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in client.get("/v1/events", params={"since": since}).json()["events"]:
            if event["event"] == name:
                return dict(event)
        time.sleep(0.05)
    raise SystemExit(f"no {name} within {timeout}s")


def guarded(engine: PrivateDockerd, folder: Path, loops: int) -> list[dict[str, Any]]:
    ledger = folder / "ledger"
    ledger.mkdir()
    dc = engine.client()
    container = dc.containers.create(
        IMAGE, ["sh", "-c", holder_script("crashy", LEAK_MIB, leak=True, exit_after=0.3)],
        name="bench-crashy", network_mode="none", restart_policy={"Name": "unless-stopped"},
        volumes={str(ledger): {"bind": "/ledger", "mode": "rw"}})
    config = base_config(folder, ledger, default_mode="image", docker_host=engine.host) + f"""
[crashloop]
max_restarts = {MAX_RESTARTS}
window = 120
[workloads.comfyui]
kind = "docker"
container = "bench-crashy"
stop_timeout = 2
restart_policy = "unless-stopped"
[modes.image]
workloads = ["comfyui"]
"""
    results = []
    try:
        with DaemonUnderTest(folder, config) as daemon:
            client = daemon.client
            since = 0
            for _ in range(loops):
                blocked = wait_event(client, "crashloop.blocked", since)
                since = blocked["id"]
                time.sleep(2)  # anything that would still restart, would by now
                container.reload()
                starts = len(claims(ledger))
                results.append({
                    "restarts": starts - 1,
                    "restarts_beyond_threshold": max(0, starts - 1 - MAX_RESTARTS),
                    "docker_restart_count": container.attrs["RestartCount"],
                    "policy_after": container.attrs["HostConfig"]["RestartPolicy"]["Name"],
                    "crash_to_policy_no_s": blocked["policy_no_at"] - blocked["crash_times"][-1],
                    "leaked_mib": starts * LEAK_MIB,
                })
                for claim in claims(ledger):
                    claim.unlink()
                resp = client.post("/v1/workloads/comfyui/unblock")
                if resp.status_code != 200:
                    raise SystemExit(f"unblock refused: {resp.text}")
    finally:
        container.remove(force=True)
        dc.close()
    return results


def baseline(engine: PrivateDockerd, folder: Path, seconds: float) -> dict[str, Any]:
    ledger = folder / "ledger-baseline"
    ledger.mkdir()
    dc = engine.client()
    container = dc.containers.run(
        IMAGE, ["sh", "-c", holder_script("crashy", LEAK_MIB, leak=True, exit_after=0.3)],
        name="bench-baseline", network_mode="none", detach=True,
        restart_policy={"Name": "unless-stopped"},
        volumes={str(ledger): {"bind": "/ledger", "mode": "rw"}})
    time.sleep(seconds)
    container.stop(timeout=2)
    container.reload()
    starts = len(claims(ledger))
    result = {"seconds": seconds, "restarts": starts - 1, "leaked_mib": starts * LEAK_MIB,
              "docker_restart_count": container.attrs["RestartCount"]}
    container.remove(force=True)
    dc.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, default=20)
    parser.add_argument("--baseline-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    engine = PrivateDockerd()
    engine.start()
    engine.import_busybox()
    folder = Path(tempfile.mkdtemp(prefix="gw-bench-crash-"))
    try:
        loops = guarded(engine, folder, args.loops)
        base = baseline(engine, folder, args.baseline_s)
    finally:
        engine.cleanup()
    latency = [r["crash_to_policy_no_s"] for r in loops]
    leaked = [r["leaked_mib"] for r in loops]
    report = {
        "loops": len(loops),
        "max_restarts": MAX_RESTARTS,
        "restarts_beyond_threshold_total": sum(r["restarts_beyond_threshold"] for r in loops),
        "policy_no_after_all_loops": all(r["policy_after"] == "no" for r in loops),
        "crash_to_policy_no_s_median": round(statistics.median(latency), 4),
        "crash_to_policy_no_s_max": round(max(latency), 4),
        "leaked_mib_per_loop_median": statistics.median(leaked),
        "leaked_mib_per_loop_max": max(leaked),
        "baseline": base,
        "raw": loops,
    }
    write_report(args.out, "crashloop", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
