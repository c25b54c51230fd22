"""The GPU acceptance script and the sample benchmark, which are meant for a real NVIDIA
GPU, run in CI so they cannot rot: on the simulated backend, and on their NVML and
PyTorch paths against the stand-in GPU in tests/gpu_standin (the GPU is the one part
these machines cannot have; the daemon, the scripts and the holders run for real)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOLDER = ROOT / "scripts" / "acceptance_holder.py"


def run_acceptance(backend: str, out: Path, env: dict[str, str] | None = None
                   ) -> tuple[subprocess.CompletedProcess[str], dict]:
    result = subprocess.run([str(ROOT / "scripts" / "gpu-acceptance.sh"), "--backend", backend,
                             "--out", str(out)], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return result, json.loads((out / "gpu-acceptance.json").read_text())


def assert_all_checks_pass(result: subprocess.CompletedProcess[str], report: dict) -> None:
    assert report["elapsed_s"] < 240
    names = {c["check"] for c in report["checks"]}
    for expected in ("attribution", "switch a -> b", "release verified after the holder's exit",
                     "unowned holder reported as unowned", "tier warn at 83%",
                     "no event at 78% (hysteresis)", "tier alert at 92%",
                     "tier critical at 97%", "protective action at critical",
                     "one event per crossing, in order"):
        assert expected in names
    assert all(c["ok"] for c in report["checks"])
    assert report["figures"]["tier_sequence"][:3] == [["ok", "warn"], ["warn", "alert"],
                                                       ["alert", "critical"]]
    assert "passed, 0 failed" in result.stdout


def test_acceptance_script_passes_on_the_sim_backend(tmp_path: Path) -> None:
    result, report = run_acceptance("sim", tmp_path)
    assert report["backend"] == "sim"
    assert_all_checks_pass(result, report)


def test_acceptance_script_passes_on_nvml_and_pytorch(tmp_path: Path,
                                                      standin_gpu: dict[str, str]) -> None:
    result, report = run_acceptance("nvml", tmp_path / "out", standin_gpu)
    assert report["backend"] == "nvml" and report["gpu"] == "NVIDIA H200 (stand-in)"
    assert report["total_mib"] == 143771 and report["driver"].startswith("580")
    assert_all_checks_pass(result, report)
    names = {c["check"] for c in report["checks"]}
    assert {"NVML total = PyTorch total", "NVML free ~ PyTorch free"} <= names
    figures = report["figures"]
    assert figures["torch_total_mib"] == figures["nvml_total_mib"] == 143771
    # The stand-in frees VRAM 150 ms after exit, as the measured H200 did.
    assert 0.15 <= figures["exit_to_release_verified_s"] <= 0.3


def test_torch_holder_steps_down_to_exactly_what_it_holds(standin_gpu: dict[str, str]) -> None:
    """NVML must see a step down at once: freed tensors go back to the driver, and none
    is kept alive (cached) while the holder grows again."""
    code = """
import os, sys, json, subprocess
import pynvml
pynvml.nvmlInit()
gpu = pynvml.nvmlDeviceGetHandleByIndex(0)
holder = subprocess.Popen([sys.executable, sys.argv[1], "--backend", "torch", "--name", "r",
                           "--control"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
holder.stdout.readline()
seen = []
for mib in (3000, 2500, 5000, 100, 0):
    holder.stdin.write(f"set {mib}\\n"); holder.stdin.flush()
    held = json.loads(holder.stdout.readline())
    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(gpu)
    seen.append([held["mib"], [p.usedGpuMemory // 2**20 for p in procs]])
holder.stdin.write("quit\\n"); holder.stdin.flush()
print(json.dumps(seen), holder.wait())
"""
    result = subprocess.run([sys.executable, "-c", code, str(HOLDER)], env=standin_gpu,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen, status = result.stdout.rsplit(maxsplit=1)
    context = 500  # MiB of CUDA context per process on the stand-in, as on the H200
    assert json.loads(seen) == [[m, [m + context]] for m in (3000, 2500, 5000, 100, 0)]
    assert status == "0"


def test_sample_benchmark_measures_nvml_and_the_daemon_on_it(tmp_path: Path,
                                                             standin_gpu: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sample.py"), "--samples",
                             "200", "--duration", "2", "--out", str(tmp_path)],
                            env=standin_gpu, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "sample.json").read_text())
    sample, daemon = report["sample"], report["daemon"]
    assert sample["backend"] == "nvml" and sample["gpu"] == "NVIDIA H200 (stand-in)"
    assert sample["gpuwarden_sample_us"] > 0 and sample["raw_pynvml_us"] > 0
    assert sample["ratio_vs_raw"] == pytest.approx(
        sample["gpuwarden_sample_us"] / sample["raw_pynvml_us"])
    assert daemon["backend"] == "nvml" and 0 < daemon["rss_mb"] < 200
    summary = subprocess.run([sys.executable, str(ROOT / "bench" / "summary.py"),
                              str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert "vs raw pynvml calls" in summary.stdout and "nvml" in summary.stdout
