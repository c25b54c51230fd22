"""Release verification on the NVML backend, where the driver lists a process by PID
until it has freed its memory, and that PID may already be gone from /proc.

The daemon and its workloads run for real; the GPU is the stand-in H200
(tests/gpu_standin), which, like the measured card, keeps an exited holder's VRAM
for 150 ms."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpuwarden.gpu.attribution import OwnerIndex
from gpuwarden.gpu.model import MIB, GpuProcess, GpuSample, NodeSample
from gpuwarden.modes import ReleaseVerifier

from .conftest import SimNode

HOLDER = Path(__file__).resolve().parent.parent / "scripts" / "acceptance_holder.py"


def _gpu(*processes: tuple[int, int], used_mib: int) -> NodeSample:
    return NodeSample(gpus=(GpuSample(
        index=0, uuid="GPU-x", name="test", total_bytes=20480 * MIB, used_bytes=used_mib * MIB,
        free_bytes=(20480 - used_mib) * MIB,
        processes=tuple(GpuProcess(pid=pid, used_bytes=mib * MIB) for pid, mib in processes)),))


def test_a_listed_pid_missing_from_proc_is_never_someone_elses_memory() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: this PID is in no /proc now
    alive = subprocess.Popen(["sleep", "60"])
    try:
        owners = OwnerIndex()
        verifier = ReleaseVerifier(tolerance_mib=256)
        # The exited process still holds 6000 MiB as far as the driver says.
        sample = owners.attribute(_gpu((gone.pid, 6000), (alive.pid, 1000), used_mib=7000))
        assert not sample.owners[gone.pid].visible and sample.owners[alive.pid].visible
        verdict = verifier.check(sample, 0, released={"ollama"})
        assert not verdict.clear
        assert f"PIDs {gone.pid}, which are not in /proc" in verdict.reason
        assert [h["pid"] for h in verdict.holders] == [gone.pid]
        assert verdict.allowed_mib == 1000 + 256  # the live stray is accounted for
        # Once the driver drops it, the live unowned process alone is fine.
        sample = owners.attribute(_gpu((alive.pid, 1000), used_mib=1000))
        assert verifier.check(sample, 0, released={"ollama"}).clear
    finally:
        alive.kill()
        alive.wait()


def test_switch_waits_until_the_driver_frees_a_child_process_that_already_exited(
        node: SimNode, start_daemon: Any, standin_gpu: dict[str, str]) -> None:
    """The GPU process is a child of the workload's root (a wrapper script), so once it
    has exited nothing ties its PID to the workload: the switch must still wait."""
    def wrapped(name: str, mib: int) -> list[str]:
        holder = f"{sys.executable} {HOLDER} --backend torch --name {name} --mib {mib}"
        return ["sh", "-c", f"{holder}; true"]  # "; true": sh forks, no exec

    config = node.write(**{
        "daemon": {"default_mode": "a"},
        "gpu": {"backend": "nvml"},
        "workloads.alpha": {"kind": "process", "command": wrapped("alpha", 40000)},
        "workloads.beta": {"kind": "process", "command": wrapped("beta", 50000)},
        "modes.a": {"workloads": ["alpha"]},
        "modes.b": {"workloads": ["beta"]},
    })
    # A card that takes 3 s to free: longer than the stop (which waits until the
    # orphaned holder is reaped), so the driver still lists the vanished PID.
    daemon = start_daemon(config, node.socket,
                          {**standin_gpu, "GPUWARDEN_STANDIN_RELEASE_DELAY": "3.0"})
    daemon.wait_mode("a")
    # The holder allocates in steps: wait for all of it (context + 40000 MiB).
    deadline = time.monotonic() + 60
    while (procs := daemon.status()["gpus"][0]["processes"]) == [] or \
            procs[0]["used_mib"] != 40500:
        assert time.monotonic() < deadline, f"alpha never held its 40500 MiB: {procs}"
        time.sleep(0.05)
    assert [p["workload"] for p in procs] == ["alpha"]

    result = daemon.client.post("/v1/mode", json={"mode": "b"}).json()
    assert result["ok"], result
    # The driver freed alpha's 40 GB 3 s after the holder exited; the switch waited for
    # that, although the holder's PID had left /proc long before.
    log = (node.state_dir / "logs" / "alpha.log").read_text().splitlines()
    exited = next(json.loads(x)["time"] for x in log if '"exiting"' in x)
    verified = daemon.wait_event("release.verified", workloads=["alpha"])[-1]
    assert verified["time"] - exited >= 2.9, (verified, exited)
    assert verified["used_mib"] == 0
