#!/usr/bin/env python3
"""Benchmark: the cost of one full GPU sample, and the daemon's footprint at 1 Hz.

    .venv/bin/python bench/sample.py [--duration 60] [--out bench/out]

1. One full sample through gpuwarden's backend, against the same raw pynvml calls
   and against `nvidia-smi --query-gpu=memory.used,memory.total --format=csv` as a
   subprocess, on whichever backend is present (NVML when a GPU answers, else sim).
2. The real daemon sampling at 1 Hz for --duration seconds, resident memory and CPU
   time: on NVML with a PyTorch process workload holding 1 GiB when a GPU answers,
   else the sim demo (two process workloads holding VRAM).

Prints a table and writes JSON (sample.json) to --out.
"""

from __future__ import annotations

import argparse
import json
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.harness import DaemonUnderTest  # noqa: E402
from gpuwarden.gpu.nvml import NvmlBackend  # noqa: E402
from gpuwarden.gpu.sim import SimBackend  # noqa: E402


def median_us(fn: Any, n: int) -> float:
    for _ in range(min(50, n)):
        fn()  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


def raw_pynvml_sample(pynvml: Any, handles: list[Any]) -> None:
    """The same NVML calls gpuwarden makes per GPU, with nothing around them."""
    for h in handles:
        pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
        pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        pynvml.nvmlDeviceGetGraphicsRunningProcesses(h)
        pynvml.nvmlDeviceGetUtilizationRates(h)
        pynvml.nvmlDeviceGetTemperature(h, 0)
        pynvml.nvmlDeviceGetPowerUsage(h)


def bench_sample(n: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    nvml = NvmlBackend()
    first = nvml.sample()
    if first.fault is None and first.gpus:
        import pynvml

        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(len(first.gpus))]
        result["backend"] = "nvml"
        result["gpu"] = first.gpus[0].name
        result["gpus"] = len(first.gpus)
        result["gpuwarden_sample_us"] = median_us(nvml.sample, n)
        result["raw_pynvml_us"] = median_us(lambda: raw_pynvml_sample(pynvml, handles), n)
        result["ratio_vs_raw"] = result["gpuwarden_sample_us"] / result["raw_pynvml_us"]
        nvml.close()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ledger = Path(tmp)
            holders = [subprocess.Popen([sys.executable, "-m", "gpuwarden.gpu.hold", "--ledger",
                                         str(ledger), "--name", f"h{i}", "--mib", "1000"],
                                        stdout=subprocess.PIPE) for i in range(2)]
            for h in holders:
                assert h.stdout is not None
                h.stdout.readline()
            sim = SimBackend(ledger)
            result["backend"] = "sim"
            result["nvml_fault"] = f"{first.fault}: {first.fault_detail}"
            result["gpuwarden_sample_us"] = median_us(sim.sample, max(50, n // 20))
            result["processes_on_host"] = len(psutil.pids())
            for h in holders:
                h.kill()
                h.wait()
    smi = shutil.which("nvidia-smi")
    if smi:
        argv = [smi, "--query-gpu=memory.used,memory.total", "--format=csv"]
        result["nvidia_smi_us"] = median_us(
            lambda: subprocess.run(argv, capture_output=True, check=False), 20)
        result["nvidia_smi_vs_gpuwarden"] = result["nvidia_smi_us"] / result["gpuwarden_sample_us"]
    return result


def nvml_daemon_config(folder: Path) -> str:
    """The daemon on the real card: one process workload holding 1 GiB through PyTorch,
    so that every sample lists and attributes a GPU process."""
    holder = [sys.executable, str(ROOT / "scripts" / "acceptance_holder.py"), "--backend",
              "torch", "--name", "holder", "--mib", "1024"]
    return f"""
[daemon]
sample_interval = 1.0
state_dir = {json.dumps(str(folder / "state"))}
socket = {json.dumps(str(folder / "gpuwarden.sock"))}
socket_group = ""
default_mode = "hold"
[gpu]
backend = "nvml"
[workloads.holder]
kind = "process"
command = {json.dumps(holder)}
[modes.hold]
workloads = ["holder"]
"""


def bench_daemon(duration: float, backend: str) -> dict[str, Any]:
    """The daemon's footprint at 1 Hz: on the card when NVML answers, else the sim demo."""
    from gpuwarden.demo import demo_config

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = nvml_daemon_config(folder) if backend == "nvml" else demo_config(folder)
        with DaemonUnderTest(folder, config, socket=folder / "gpuwarden.sock") as daemon:
            deadline = time.monotonic() + 60
            while not daemon.client.get("/v1/status").json()["gpus"][0]["processes"]:
                if time.monotonic() > deadline:
                    raise SystemExit("the workloads never held VRAM")
                time.sleep(0.2)
            ps = psutil.Process(daemon.proc.pid)
            time.sleep(2)  # let start-up settle
            cpu0 = ps.cpu_times()
            t0 = time.monotonic()
            time.sleep(duration)
            cpu1 = ps.cpu_times()
            elapsed = time.monotonic() - t0
            rss = ps.memory_info().rss
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {"backend": backend, "duration_s": round(elapsed, 1), "rss_mb": round(rss / 1e6, 1),
            "cpu_s": round(cpu_s, 3), "cpu_pct_of_one_core": round(100 * cpu_s / elapsed, 3),
            "sample_interval_s": 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    sample = bench_sample(args.samples)
    daemon = bench_daemon(args.duration, sample["backend"])
    report = {"sample": sample, "daemon": daemon, "when": time.strftime("%Y-%m-%d"),
              "host_cpus": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sample.json").write_text(json.dumps(report, indent=2))
    print(f"{'measure':<40} {'value':>14}")
    for key, value in {**{f"sample.{k}": v for k, v in sample.items()},
                       **{f"daemon.{k}": v for k, v in daemon.items()}}.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{key:<40} {shown:>14}")
    print(f"JSON: {args.out / 'sample.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
