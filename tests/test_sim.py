"""The simulated GPU: VRAM held by real processes, freed after the delay, leaks kept."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from gpuwarden.gpu.attribution import OwnerIndex
from gpuwarden.gpu.sim import SimBackend, read_claim

from .conftest import SimNode


def used_mib(backend: SimBackend, gpu: int = 0) -> int:
    sample = backend.sample()
    assert sample.fault is None
    found = sample.gpu(gpu)
    assert found is not None
    return found.used_mib


def test_claim_counts_while_held_and_frees_after_the_delay(node: SimNode) -> None:
    backend = SimBackend(node.ledger, total_mib=20480, release_delay=0.3)
    assert used_mib(backend) == 0
    holder = node.hold("llm", 6000)
    sample = backend.sample().gpus[0]
    assert sample.used_mib == 6000 and sample.free_mib == 20480 - 6000
    assert [(p.pid, p.used_mib) for p in sample.processes] == [(holder.pid, 6000)]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed = time.monotonic()
    # Still counted right after the holder died ...
    assert used_mib(backend) == 6000
    assert backend.sample().gpus[0].processes == ()
    # ... and freed once the release delay has passed.
    while used_mib(backend) != 0:
        assert time.monotonic() - killed < 2.0, "never released"
        time.sleep(0.02)
    assert time.monotonic() - killed >= 0.3


def test_leaking_claim_outlives_its_holder_until_deleted(node: SimNode) -> None:
    backend = SimBackend(node.ledger, release_delay=0.05)
    holder = node.hold("crashy", 4000, "--leak")
    assert used_mib(backend) == 4000
    holder.terminate()
    holder.wait()
    time.sleep(0.2)
    assert used_mib(backend) == 4000
    assert backend.sample().gpus[0].processes == ()  # held, but by no process
    (node.ledger / "crashy.mib").unlink()
    assert used_mib(backend) == 0


def test_a_claim_opened_by_a_shell_and_multi_gpu_ledger(node: SimNode, tmp_path: Path) -> None:
    import subprocess

    backend = SimBackend(node.ledger, count=2, release_delay=0.05)
    (node.ledger / "gpu1").mkdir(exist_ok=True)
    shell = subprocess.Popen(
        ["sh", "-c", f"echo 3000 > {node.ledger}/gpu1/sh.mib; exec sleep 100 3<{node.ledger}"
                     "/gpu1/sh.mib"])
    try:
        deadline = time.monotonic() + 5
        while used_mib(backend, 1) != 3000:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert used_mib(backend, 0) == 0
        assert [p.pid for p in backend.sample().gpus[1].processes] == [shell.pid]
    finally:
        shell.kill()
        shell.wait()


def test_malformed_claims_are_ignored(node: SimNode) -> None:
    node.ledger.mkdir(parents=True)
    (node.ledger / "junk.mib").write_text("lots\n")
    assert read_claim(node.ledger / "junk.mib") is None
    backend = SimBackend(node.ledger)
    assert used_mib(backend) == 0


def test_attribution_to_a_process_tree_and_unowned_holders(node: SimNode) -> None:
    import subprocess
    import sys

    backend = SimBackend(node.ledger)
    owners = OwnerIndex()
    # A workload root that spawns the holder as a child, like a launcher script would.
    root = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess,sys; subprocess.run(sys.argv[1:])",
         sys.executable, "-m", "gpuwarden.gpu.hold", "--ledger", str(node.ledger),
         "--name", "child", "--mib", "1000"], start_new_session=True)
    owners.set_root("comfyui", root.pid)
    stray = node.hold("stray", 500)
    try:
        deadline = time.monotonic() + 10
        while used_mib(backend) != 1500:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        attributed = owners.attribute(backend.sample())
        by_workload = {o.workload: o for o in attributed.owners.values()}
        assert set(by_workload) == {"comfyui", None}
        assert by_workload["comfyui"].pid != root.pid  # the child holds it, the root owns it
        assert by_workload[None].pid == stray.pid
        gpu = attributed.node.gpus[0]
        assert attributed.owned_mib(gpu, {"comfyui"}) == 1000
        assert attributed.unowned_mib(gpu) == 500
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait()
        stray.kill()
        stray.wait()


def test_a_rewritten_claim_is_a_new_allocation_even_if_never_seen_held(node: SimNode) -> None:
    backend = SimBackend(node.ledger, release_delay=0.3)
    first = node.hold("llm", 6000)
    assert used_mib(backend) == 6000
    first.kill()
    first.wait()
    assert used_mib(backend) == 6000
    time.sleep(0.4)
    assert used_mib(backend) == 0
    # A new holder writes the claim again and dies before any sample saw it held:
    # its memory is still freed only release_delay later, as on a real card.
    second = node.hold("llm", 6000)
    second.kill()
    second.wait()
    assert used_mib(backend) == 6000
    time.sleep(0.35)
    assert used_mib(backend) == 0
