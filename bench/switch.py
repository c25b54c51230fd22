#!/usr/bin/env python3
"""Benchmark: switch overhead, 150 ms simulated release delay.

    .venv/bin/python bench/switch.py [--switches 12] [--out bench/out]
    .venv/bin/python bench/switch.py --kind systemd [--switches 12]

`--kind docker` (the default) starts a private Docker engine (as the tests do), two
busybox containers holding simulated VRAM, and the real daemon; switches llm <->
image N times through the control socket. Writes switch.json.

`--kind systemd` installs gpuwarden on a real systemd (PID 1 in a container, as
tests/test_systemd_units.py does) with two service units and two process workloads
(transient units) holding the same simulated VRAM, and in one run switches between
the two units and between the two processes, N times each, interleaved in rounds.
Writes switch-systemd.json with both kinds' figures and their ratio.

Overhead = total switch time - the workload's stop - its start (+ readiness), i.e.
what gpuwarden adds: bookkeeping, the write-ahead state, and the wait until the
release is *proven* (which includes the 150 ms the sim takes to free VRAM, as an
H200 did).
"""

from __future__ import annotations

import argparse
import json
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


HOLD = "/opt/gpuwarden/venv/bin/python -m gpuwarden.gpu.hold --ledger /srv/ledger"


def _unit(name: str, mib: int) -> str:
    return (f"[Service]\nUser=nobody\nExecStart={HOLD} --name {name} --mib {mib}\n")


def _systemd_config(release_delay: float) -> str:
    workloads = []
    for name in ("ua", "ub"):
        workloads.append(f'[workloads.{name}]\nkind = "systemd"\n'
                         f'unit = "bench-{name}.service"\n')
    for name, mib in (("pa", 6000), ("pb", 8000)):
        argv = [*HOLD.split(), "--name", name, "--mib", str(mib)]
        workloads.append(f'[workloads.{name}]\nkind = "process"\n'
                         f'command = {json.dumps(argv)}\nuser = "nobody"\n')
    modes = "".join(f'[modes.{n}]\nworkloads = ["{n}"]\n' for n in ("ua", "ub", "pa", "pb"))
    return (f'[daemon]\nsample_interval = 0.5\ndefault_mode = "ua"\n[gpu]\nbackend = "sim"\n'
            f'[gpu.sim]\nledger_dir = "/srv/ledger"\nrelease_delay = {release_delay}\n'
            + "".join(workloads) + modes)


def _summary(results: list[dict[str, float]]) -> dict[str, float]:
    med = statistics.median
    overhead = [t["total_s"] - t["stop_s"] - t["start_s"] for t in results]
    return {"total_s_median": round(med(t["total_s"] for t in results), 4),
            "stop_s_median": round(med(t["stop_s"] for t in results), 4),
            "start_s_median": round(med(t["start_s"] for t in results), 4),
            "release_verified_s_median": round(med(t["release_s"] for t in results), 4),
            "overhead_s_median": round(med(overhead), 4),
            "overhead_s_max": round(max(overhead), 4)}


def run_systemd(switches: int, release_delay: float) -> dict[str, Any]:
    from tests.systemd_host import GW, systemd_host

    engine = PrivateDockerd()
    engine.start()
    folder = Path(tempfile.mkdtemp(prefix="gw-bench-systemd-"))
    raw: dict[str, list[dict[str, float]]] = {"systemd": [], "process": []}
    try:
        with systemd_host(engine.host, folder) as host:
            host.run("install -d -m 1777 /srv/ledger")
            for name, mib in (("ua", 6000), ("ub", 8000)):
                host.write(f"/etc/systemd/system/bench-{name}.service", _unit(name, mib))
            host.write("/etc/gpuwarden/config.toml", _systemd_config(release_delay))
            host.run("/src/scripts/install.sh --wheelhouse /wheels", timeout=600)

            def switch(mode: str) -> dict[str, float]:
                doc = json.loads(host.run(f"{GW} mode {mode} --json").stdout)
                if not doc.get("ok"):
                    raise SystemExit(f"switch to {mode} failed: {doc}")
                return dict(doc["timings"])

            host.wait("ua running", lambda: host.status()["gpus"][0]["mode"] == "ua")
            # Rounds of [ub, ua] for units then [pb, pa] for processes, so that drift
            # on a busy machine falls on both kinds alike. The switch into each pair
            # (from the other kind) is not counted.
            for _ in range(max(1, switches // 2)):
                switch("ua")
                raw["systemd"] += [switch("ub"), switch("ua")]
                switch("pa")
                raw["process"] += [switch("pb"), switch("pa")]
    finally:
        engine.cleanup()
    units, process = _summary(raw["systemd"]), _summary(raw["process"])
    return {
        "switches_per_kind": len(raw["systemd"]),
        "release_delay_s": release_delay,
        "systemd": units,
        "process": process,
        "total_ratio_systemd_to_process": round(
            units["total_s_median"] / process["total_s_median"], 3),
        "overhead_ratio_systemd_to_process": round(
            units["overhead_s_median"] / process["overhead_s_median"], 3),
        "raw": raw,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["docker", "systemd"], default="docker",
                        help="docker: containers; systemd: units against process "
                             "workloads on a real systemd, in one run")
    parser.add_argument("--switches", type=int, default=12)
    parser.add_argument("--release-delay", type=float, default=0.15)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    if args.kind == "systemd":
        write_report(args.out, "switch-systemd", run_systemd(args.switches,
                                                             args.release_delay))
    else:
        write_report(args.out, "switch", run(args.switches, args.release_delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
