#!/usr/bin/env python3
"""Benchmark: what one CLI call costs, against `python -c pass`.

    .venv/bin/python bench/cli.py [--runs 30] [--out bench/out]

Starts the real daemon on a simulated node with two process workloads, then runs,
interleaved, `python -c pass`, `gpuwarden --help` and `gpuwarden status` --runs
times each (the installed console script, as an operator runs it). Each child's CPU
time (user + system, from wait4) and wall time are recorded; the figures are the
medians and their ratios to `python -c pass`. Target: a `status` call costs at most
3x the CPU of `python -c pass`. The package is compiled to bytecode first, as pip
does when it installs it. Writes cli.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import DaemonUnderTest, base_config, write_report  # noqa: E402


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of `argv`, which must exit 0."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} exited {proc.returncode}")
    return usage.ru_utime + usage.ru_stime, wall


def run(runs: int) -> dict[str, Any]:
    # As installed: pip compiles the package to bytecode at install time. A checkout
    # run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module anew on
    # every call, which no installed gpuwarden does.
    import compileall

    import gpuwarden

    compileall.compile_dir(Path(gpuwarden.__file__).parent, quiet=1)
    folder = Path(tempfile.mkdtemp(prefix="gw-bench-cli-"))
    ledger = folder / "ledger"
    hold = [sys.executable, "-m", "gpuwarden.gpu.hold", "--ledger", str(ledger)]
    config = base_config(folder, ledger, default_mode="llm") + f"""
[workloads.ollama]
kind = "process"
command = {[*hold, "--name", "ollama", "--mib", "6000"]!r}
[workloads.comfyui]
kind = "process"
command = {[*hold, "--name", "comfyui", "--mib", "8000"]!r}
[modes.llm]
workloads = ["ollama"]
[modes.image]
workloads = ["comfyui"]
""".replace("'", '"')
    gpuwarden = str(Path(sys.executable).parent / "gpuwarden")
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "gpuwarden --help": [gpuwarden, "--help"],
        "gpuwarden status": [gpuwarden, "status"],
    }
    raw: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    with DaemonUnderTest(folder, config):
        env = {**os.environ, "GPUWARDEN_CONFIG": str(folder / "config.toml")}
        for argv in commands.values():  # warm the page cache and .pyc files
            measure(argv, env)
        for _ in range(runs):
            for name, argv in commands.items():
                raw[name].append(measure(argv, env))
    med = statistics.median
    cpu = {name: med(c for c, _ in found) for name, found in raw.items()}
    wall = {name: med(w for _, w in found) for name, found in raw.items()}
    base = cpu["python -c pass"]
    return {
        "runs": runs,
        "cpu_ms_median": {n: round(v * 1000, 1) for n, v in cpu.items()},
        "wall_ms_median": {n: round(v * 1000, 1) for n, v in wall.items()},
        "status_cpu_ratio": round(cpu["gpuwarden status"] / base, 2),
        "help_cpu_ratio": round(cpu["gpuwarden --help"] / base, 2),
        "target_status_cpu_ratio": 3.0,
        "raw": raw,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    write_report(args.out, "cli", run(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
