"""The real daemon as a subprocess, driven by the real CLI over the control socket."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from .conftest import (
    PYTHON,
    SimNode,
    hold_argv,
    processes_naming,
    run_cli,
    two_process_modes,
    wait_for,
)
from .standins import ComfyStandIn


def two_mode_config(node: SimNode) -> Path:
    return node.write(**two_process_modes(node))


def test_status_over_the_socket_shows_figures_holders_and_modes(node: SimNode,
                                                                start_daemon) -> None:
    config = two_mode_config(node)
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    deadline = time.monotonic() + 10
    while True:
        result = run_cli("--config", str(config), "status", "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        if doc["gpus"][0]["used_mib"] == 6000:
            break
        assert time.monotonic() < deadline, doc
        time.sleep(0.1)
    gpu = doc["gpus"][0]
    assert gpu["total_mib"] == 20480 and gpu["tier"] == "ok" and gpu["mode"] == "llm"
    assert gpu["used_fraction"] == round(6000 / 20480, 4)
    assert [(p["used_mib"], p["workload"]) for p in gpu["processes"]] == [(6000, "ollama")]
    states = {w["name"]: (w["state"], w["blocked"], w["gpu"]) for w in doc["workloads"]}
    assert states == {"ollama": ("running", False, 0), "comfyui": ("stopped", False, 0)}
    assert doc["modes"]["llm"]["workloads"] == ["ollama"] and "idle" in doc["modes"]

    # The human form carries the same facts; --config also works after the verb.
    text = run_cli("status", "--config", str(config))
    assert text.returncode == 0
    assert "6000/20480 MiB" in text.stdout and "ollama" in text.stdout and "llm" in text.stdout

    # An unowned holder is reported as such.
    stray = node.hold("stray", 2000)
    try:
        deadline = time.monotonic() + 10
        while True:
            procs = daemon.status()["gpus"][0]["processes"]
            if len(procs) == 2:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert {(p["pid"], p["workload"]) for p in procs} >= {(stray.pid, None)}
        assert "UNOWNED" in run_cli("--config", str(config), "status").stdout
    finally:
        stray.kill()
        stray.wait()


def test_tier_event_reaches_the_audit_log_once(node: SimNode, start_daemon) -> None:
    config = node.write(thresholds={"sustain": 2})
    daemon = start_daemon(config, node.socket)
    holder = node.hold("big", 17000)  # 83 %
    try:
        events = daemon.wait_event("vram.tier", to="warn")
        daemon.wait_samples(5)  # more samples above warn: still one event
        assert len(daemon.events("vram.tier")) == 1
        assert events[0]["from"] == "ok" and events[0]["used_mib"] == 17000
        assert events[0]["holders"][0]["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    daemon.wait_event("vram.tier", to="ok")


def test_socket_mode_and_clean_shutdown_leaves_nothing_behind(node: SimNode,
                                                              start_daemon) -> None:
    config = two_mode_config(node)
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    assert stat.S_IMODE(node.socket.stat().st_mode) == 0o660
    children = psutil.Process(daemon.proc.pid).children(recursive=True)
    assert children, "the llm workload runs as a child"
    assert daemon.stop(signal.SIGTERM) == 0
    assert not node.socket.exists()
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
    events = daemon.events()
    names = [e["event"] for e in events]
    assert names[0] == "daemon.started"
    # It says it is stopping, then stops its workloads itself and audits each.
    after = events[names.index("daemon.stopping") + 1:]
    assert [(e["event"], e["workload"]) for e in after] == [("workload.stopped", "ollama")]


def test_event_ids_keep_rising_across_restarts(node: SimNode, start_daemon) -> None:
    """A client polling `since=<the last id it saw>` sees the next daemon's events, also
    after a SIGKILL and with the id file damaged."""
    config = two_mode_config(node)

    def events_after(daemon: Any, since: int) -> list[dict[str, Any]]:
        resp = daemon.client.get("/v1/events", params={"since": since, "limit": 1000})
        assert resp.status_code == 200, resp.text
        found: list[dict[str, Any]] = resp.json()["events"]
        return found

    seen = 0
    for ending, damage in ((signal.SIGTERM, None), (signal.SIGKILL, None),
                           (signal.SIGTERM, b"\x00not a number")):
        daemon = start_daemon(config, node.socket)
        daemon.wait_mode("llm")
        new = events_after(daemon, seen)
        assert new and new[0]["event"] == "daemon.started", new[:3]
        ids = [e["id"] for e in new]
        assert ids == sorted(ids) and ids[0] > seen, (seen, ids[:3])
        seen = ids[-1]
        daemon.stop(ending)
        node.kill_holders()  # what SIGKILL orphaned
        if damage is not None:
            (node.state_dir / "event-ids").write_bytes(damage)


def test_cli_exits_3_when_no_daemon_answers(node: SimNode) -> None:
    config = node.write()
    result = run_cli("--config", str(config), "status")
    assert result.returncode == 3
    assert "no gpuwarden daemon answers" in result.stderr
    # --json: one JSON document on stdout all the same, for every verb that has it.
    for verb in (["status"], ["mode"], ["mode", "image"], ["events"]):
        result = run_cli("--config", str(config), *verb, "--json")
        assert result.returncode == 3, (verb, result)
        doc = json.loads(result.stdout)
        assert doc["ok"] is False and "no gpuwarden daemon answers" in doc["error"], doc
        assert doc["exit_code"] == 3


def test_daemon_refuses_an_invalid_config_with_the_same_messages(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[thresholds]\nwarn = 0.95\n")
    daemon = run_cli("daemon", "--config", str(bad))
    check = run_cli("check-config", str(bad))
    assert daemon.returncode == check.returncode == 2
    assert "thresholds.warn: must be below thresholds.alert" in daemon.stderr
    assert daemon.stderr.strip() == "gpuwarden: " + check.stderr.strip()


def test_second_daemon_on_the_same_socket_is_refused(node: SimNode, start_daemon) -> None:
    config = node.write()
    start_daemon(config, node.socket)
    second = run_cli("daemon", "--config", str(config), timeout=30)
    assert second.returncode == 1
    assert "another gpuwarden daemon is listening" in second.stderr


def test_demo_runs_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    demo = subprocess.Popen([PYTHON, "-m", "gpuwarden.cli", "demo", "--dir", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        config = folder / "config.toml"
        deadline = time.monotonic() + 20
        while True:
            result = run_cli("--config", str(config), "status", "--json")
            if result.returncode == 0:
                doc = json.loads(result.stdout)
                if doc["gpus"][0]["used_mib"] > 0:
                    break
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.2)
        assert doc["gpus"][0]["processes"][0]["workload"] == "ollama"
        children = psutil.Process(demo.pid).children(recursive=True)
        assert children
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, err
    assert f"--config {config} status" in err.decode()
    assert b'"event": "daemon.started"' in out
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive


def test_process_workloads_switch_and_roll_back_after_a_bad_start(node: SimNode,
                                                                   start_daemon) -> None:
    node.ledger.mkdir(parents=True, exist_ok=True)
    claim = node.ledger / "ollama.mib"
    stubborn = ["sh", "-c", f'trap "" TERM; echo 6000 > {claim}; exec sleep 100000 3<{claim}']
    config = node.write(**{
        "daemon": {"default_mode": "llm"},
        "gpu.sim": {"release_delay": 1.0},  # waited out however busy the machine is
        "workloads.ollama": {"kind": "process", "command": stubborn, "stop_timeout": 0.5},
        "workloads.comfyui": {"kind": "process",
                              "command": hold_argv(node.ledger, "comfyui", 8000)},
        "workloads.broken": {"kind": "process", "command": [str(node.root / "missing-binary")]},
        "modes.llm": {"workloads": ["ollama"]},
        "modes.image": {"workloads": ["comfyui"]},
        "modes.bad": {"workloads": ["broken"]},
    })
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    deadline = time.monotonic() + 10
    while daemon.status()["gpus"][0]["used_mib"] != 6000:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # The holder ignores SIGTERM: the group gets SIGKILL after stop_timeout.
    result = run_cli("--config", str(config), "mode", "image", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    timings = json.loads(result.stdout)["timings"]
    assert timings["stop_s"] >= 0.45  # SIGKILL only after stop_timeout (0.5 s)
    assert timings["release_s"] >= 0.1  # the sim's 1 s release delay was waited out
    doc = daemon.status()
    assert [w["state"] for w in doc["workloads"] if w["name"] == "ollama"] == ["stopped"]

    result = run_cli("--config", str(config), "mode", "bad", "--json")
    assert result.returncode == 1
    failed = json.loads(result.stdout)
    assert failed["ok"] is False and "cannot run" in failed["error"]
    assert failed["error"].endswith("rolled back to image")
    # The previous mode is back, after comfyui's VRAM was proven free and started again.
    doc = daemon.wait_mode("image")
    failure = doc["gpus"][0]["last_failure"]
    assert "cannot run" in failure["error"] and failure["rolled_back_to"] == "image"
    shown = run_cli("--config", str(config), "status").stdout
    assert "last switch FAILED: " in shown and "(rolled back to image)" in shown
    states = {w["name"]: w["state"] for w in doc["workloads"]}
    assert states == {"ollama": "stopped", "comfyui": "running", "broken": "stopped"}
    events = daemon.client.get("/v1/events", params={"since": 0}).json()["events"]
    outcomes = [e["event"] for e in events if e["event"] != "mode.switch.step"]
    assert outcomes[-3:] == ["release.verified", "workload.started", "mode.switch.failed"]
    assert events[-1]["rolled_back_to"] == "image" and events[-1]["mode"] == "image"

    unknown = run_cli("--config", str(config), "mode", "nope")
    assert unknown.returncode == 2 and "unknown mode 'nope'" in unknown.stderr
    assert daemon.status()["gpus"][0]["mode"] == "image"


@pytest.mark.parametrize("roll_back", [True, False])
def test_a_failed_start_that_leaves_vram_behind_fails_closed_to_idle(
        node: SimNode, start_daemon, roll_back: bool) -> None:
    """No roll back unless the failed workload's VRAM is proven back; none when off."""
    node.ledger.mkdir(parents=True, exist_ok=True)
    claim = node.ledger / "leaky.mib"
    config = node.write(**{
        "daemon": {"default_mode": "image", "roll_back_failed_start": roll_back},
        "release": {"timeout": 1.0},
        "workloads.comfyui": {"kind": "process",
                              "command": hold_argv(node.ledger, "comfyui", 8000)},
        # Takes VRAM that outlives it, and never answers its readiness probe.
        "workloads.leaky": {"kind": "process", "release": "comfyui",
                            "url": "http://127.0.0.1:9", "ready_timeout": 0.5,
                            "command": ["sh", "-c",
                                        f'echo "4000 leak" > {claim}; exec sleep 100000']},
        "modes.image": {"workloads": ["comfyui"]},
        "modes.leaky": {"workloads": ["leaky"]},
    })
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("image")
    result = run_cli("--config", str(config), "mode", "leaky", "--json")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert "leaky not ready within" in error
    doc = daemon.wait_mode("idle")
    assert all(w["state"] == "stopped" for w in doc["workloads"])
    assert doc["gpus"][0]["last_failure"]["rolled_back_to"] is None
    # The switch's own events (the watchdog may meanwhile report the leak: vram.leak).
    events = [e["event"] for e in
              daemon.client.get("/v1/events", params={"since": 0}).json()["events"]
              if e["event"].startswith(("mode.", "release."))
              and e["event"] != "mode.switch.step"]
    if roll_back:
        assert "no roll back to image: VRAM release not verified" in error
        assert events[-2:] == ["release.timeout", "mode.switch.failed"]
    else:
        assert "roll back" not in error and events[-1] == "mode.switch.failed"
        assert "release.timeout" not in events


def test_two_gpus_run_one_mode_each_and_switch_independently(node: SimNode,
                                                             start_daemon) -> None:
    config = node.write(**{
        "daemon": {"default_mode": "llm"},
        "gpu.sim": {"count": 2},
        "workloads.ollama": {"kind": "process", "command": hold_argv(node.ledger, "ollama", 6000)},
        "workloads.comfyui": {"kind": "process",
                              "command": hold_argv(node.ledger, "comfyui", 8000, "--gpu", "1")},
        "workloads.embed": {"kind": "process",
                            "command": hold_argv(node.ledger, "embed", 3000, "--gpu", "1")},
        "modes.llm": {"workloads": ["ollama"], "gpu": 0},
        "modes.image": {"workloads": ["comfyui"], "gpu": 1},
        "modes.embed": {"workloads": ["embed"], "gpu": 1},
    })
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm", gpu=0)
    daemon.wait_mode("idle", gpu=1)  # GPU 1 has no recorded mode: the default lives on 0
    result = run_cli("--config", str(config), "mode", "image", "--json")
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["gpu"] == 1
    deadline = time.monotonic() + 10
    while True:
        gpus = {g["index"]: g for g in daemon.status()["gpus"]}
        if gpus[0]["used_mib"] == 6000 and gpus[1]["used_mib"] == 8000:
            break
        assert time.monotonic() < deadline, gpus
        time.sleep(0.05)
    assert gpus[0]["mode"] == "llm" and gpus[1]["mode"] == "image"
    # Exclusivity per GPU: embed replaces image on GPU 1; llm on GPU 0 is untouched.
    result = run_cli("--config", str(config), "mode", "embed", "--json")
    assert result.returncode == 0, result.stdout
    expected = {"ollama": "running", "comfyui": "stopped", "embed": "running"}
    deadline = time.monotonic() + 10
    while {w["name"]: w["state"] for w in daemon.status()["workloads"]} != expected:
        assert time.monotonic() < deadline, daemon.status()["workloads"]
        time.sleep(0.05)
    # idle needs to know which GPU; a mode on another GPU is refused.
    result = run_cli("--config", str(config), "mode", "idle", "--gpu", "1", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["gpu"] == 1
    wrong = run_cli("--config", str(config), "mode", "llm", "--gpu", "1")
    assert wrong.returncode == 2 and "runs on GPU 0" in wrong.stderr
    assert daemon.status()["gpus"][0]["mode"] == "llm"


def test_status_right_after_a_switch_shows_the_new_mode(node: SimNode, start_daemon) -> None:
    config = node.write(**two_process_modes(node, daemon={"sample_interval": 5.0}))
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    assert run_cli("--config", str(config), "mode", "image").returncode == 0
    doc = json.loads(run_cli("--config", str(config), "status", "--json").stdout)
    # Read well inside the 5 s sample interval: the switch refreshed the figures.
    assert {w["name"]: w["state"] for w in doc["workloads"]} == {"ollama": "stopped",
                                                               "comfyui": "running"}
    assert all(p["workload"] != "ollama" for p in doc["gpus"][0]["processes"])


def test_a_process_workload_exiting_on_its_own_is_a_crash_event(node: SimNode,
                                                               start_daemon) -> None:
    config = node.write(**two_process_modes(node, **{
        "workloads.ollama": {"kind": "process", "command": hold_argv(
            node.ledger, "ollama", 6000, "--exit-after", "1.0", "--exit-code", "3")}}))
    daemon = start_daemon(config, node.socket)
    crashed = daemon.wait_event("workload.crashed", workload="ollama")[0]
    assert crashed["exit_code"] == 3 and crashed["severity"] == "error"
    # A workload stopped by a switch did not crash.
    assert run_cli("--config", str(config), "mode", "image").returncode == 0
    assert run_cli("--config", str(config), "mode", "idle").returncode == 0
    daemon.wait_samples(3)
    assert [e["workload"] for e in daemon.events("workload.crashed")] == ["ollama"]


def test_a_slow_readiness_answer_still_counts(node: SimNode, start_daemon) -> None:
    """A ComfyUI that takes 3 s to answer /system_stats is ready, not failed."""
    comfy = ComfyStandIn().start()
    comfy.delay["/system_stats"] = 3.0
    try:
        config = node.write(**two_process_modes(node, **{
            "workloads.comfyui": {"release": "comfyui", "url": comfy.url,
                                  "ready_timeout": 20}}))
        daemon = start_daemon(config, node.socket)
        daemon.wait_mode("llm")
        result = run_cli("--config", str(config), "mode", "image", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["timings"]["start_s"] >= 3.0
    finally:
        comfy.stop()


def test_a_process_behind_a_wrapper_script_gets_its_stop_grace(tmp_path: Path) -> None:
    """`sh -c "server; true"` dies at once on SIGTERM; the server it started must still
    get stop_timeout to shut down before the group is killed."""
    from gpuwarden.config import WorkloadConfig
    from gpuwarden.gpu.attribution import OwnerIndex
    from gpuwarden.workloads.process import ProcessWorkload

    ready, done = tmp_path / "ready", tmp_path / "done"
    server = tmp_path / "server.py"
    server.write_text(
        "import signal, sys, time, pathlib\n"
        "def stop(*_):\n"
        "    time.sleep(0.5)  # a graceful shutdown takes a moment\n"
        f"    pathlib.Path({str(done)!r}).write_text('graceful')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(ready)!r}).write_text('up')\n"
        "while True:\n"
        "    signal.pause()\n")
    workload = ProcessWorkload(
        "wrapped", WorkloadConfig(kind="process", stop_timeout=10,
                                  command=["sh", "-c", f"{sys.executable} {server}; true"]),
        log_dir=tmp_path / "logs", owners=OwnerIndex())
    workload.start()
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "the server never started"
        time.sleep(0.02)
    workload.stop()
    assert done.read_text() == "graceful"
    assert not workload.status().running


def test_a_cancelled_start_keeps_the_workload_locked_until_its_process_exists(
        tmp_path: Path) -> None:
    """A switch cancelled by the daemon's shutdown while a start runs in its thread: the
    cancel waits for the start, so the shutdown that takes the lock next sees (and
    stops) the process instead of leaving it orphaned."""
    import asyncio
    import threading

    from gpuwarden.config import WorkloadConfig
    from gpuwarden.gpu.attribution import OwnerIndex
    from gpuwarden.workloads.process import ProcessWorkload
    from gpuwarden.workloads.supervisor import WorkloadSupervisor

    entered, gate = threading.Event(), threading.Event()

    class SlowStart(ProcessWorkload):  # a start that takes a while, as a container's does
        def start(self) -> Any:
            entered.set()
            gate.wait(30)
            return super().start()

    workload = SlowStart("slow", WorkloadConfig(kind="process", stop_timeout=2,
                                                command=["sleep", "600"]),
                         log_dir=tmp_path / "logs", owners=OwnerIndex())
    supervisor = WorkloadSupervisor({"slow": workload})

    async def scenario() -> None:
        async def switch_step() -> None:
            async with supervisor.lock("slow"):
                await supervisor.start_locked("slow")

        step = asyncio.create_task(switch_step())
        assert await asyncio.to_thread(entered.wait, 30), "the start never began"
        step.cancel()
        done, _ = await asyncio.wait({step}, timeout=0.5)
        assert not done and supervisor.lock("slow").locked()  # still starting
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await step
        async with supervisor.lock("slow"):  # what the shutdown does next
            assert (await supervisor.status("slow")).running
            await supervisor.stop_locked("slow", by="daemon", reason="stopping")
        assert not workload.status().running

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        workload.stop()


def test_a_shutdown_during_a_switch_leaves_no_process_behind(node: SimNode) -> None:
    """The daemon stops while a switch runs: whatever the switch had started is stopped
    with the daemon, and a switch asked for after that is refused."""
    import asyncio

    from gpuwarden.config import load_config
    from gpuwarden.daemon import Daemon
    from gpuwarden.errors import ConflictError

    config = load_config(two_mode_config(node))

    async def scenario(delay: float) -> None:
        daemon = Daemon(config)
        await daemon.setup()
        assert daemon.service is not None
        try:
            await daemon.service.switch_mode("llm", requested_by="test")
            await daemon.service.switch_mode("image", requested_by="test", wait=False)
            await asyncio.sleep(delay)  # somewhere in the switch: stopping, verifying, starting
        finally:
            await daemon.cleanup()
        with pytest.raises(ConflictError, match="stopping"):
            await daemon.service.switch_mode("llm", requested_by="test")

    for delay in (0.0, 0.05, 0.2):
        asyncio.run(scenario(delay))
        assert not processes_naming(str(node.ledger)), delay  # live, zombies aside


def test_the_demo_removes_its_temporary_folder_at_exit() -> None:
    demo = subprocess.Popen([PYTHON, "-m", "gpuwarden.cli", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert demo.stderr is not None
        banner = demo.stderr.readline()
        assert "removed at exit" in banner, banner
        config = Path(banner.split("config in ")[1].split(" (removed")[0])
        deadline = time.monotonic() + 30
        while run_cli("--config", str(config), "status").returncode != 0:
            assert time.monotonic() < deadline, "the demo never answered"
            time.sleep(0.2)
        demo.send_signal(signal.SIGINT)
        demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0
    assert not config.parent.exists()


def test_after_kill_9_the_next_start_stops_what_was_left_running(
        node: SimNode, start_daemon) -> None:
    """A daemon killed with SIGKILL leaves its process workloads running with their
    VRAM. Ten times: kill -9, start again on the same state: exactly one Ollama runs
    after each start, no VRAM is unowned, and the survivor's stop is audited."""
    config = node.write(**two_process_modes(node))

    def ollamas() -> list[Any]:
        return [p for p in processes_naming(str(node.ledger))
                if "--name" in p.info["cmdline"] and "ollama" in p.info["cmdline"]]

    counts, unowned = [], []
    for round_ in range(10):
        daemon = start_daemon(config, node.socket)
        if round_:  # the survivor is stopped, its VRAM proven back, then llm restored
            orphan = daemon.wait_event("workload.orphan", workload="ollama")[0]
            assert orphan["released"] is True, orphan
        daemon.wait_event("mode.reconcile" if round_ else "mode.switch.completed")
        doc = daemon.wait_used(6000)
        counts.append(len(ollamas()))
        unowned.append(sum(p["used_mib"] or 0 for p in doc["gpus"][0]["processes"]
                           if p["workload"] is None))
        daemon.stop(signal.SIGKILL)
    node.kill_holders()
    print(f"\nprocesses per workload after each restart: {counts}; unowned MiB: {unowned}")
    assert counts == [1] * 10 and unowned == [0] * 10


def test_sighup_and_reload_read_the_config_again(node: SimNode, start_daemon) -> None:
    """SIGHUP (a closed terminal sends it too) and `gpuwarden reload` re-read the
    config: thresholds change live, a workload in use keeps its config and says why,
    and a config with problems changes nothing; the daemon serves throughout."""
    tables = two_process_modes(node)
    config = node.write(**tables)
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    sections = {**tables, "thresholds": {"warn": 0.5, "alert": 0.6, "critical": 0.7},
                "workloads.ollama": {**tables["workloads.ollama"], "stop_timeout": 7}}
    node.write(**sections)
    t0 = time.monotonic()
    daemon.proc.send_signal(signal.SIGHUP)
    reloaded = daemon.wait_event("config.reloaded")[0]
    took = time.monotonic() - t0
    assert daemon.proc.poll() is None  # SIGHUP does not end it
    assert "thresholds.warn" in reloaded["applied"]
    assert reloaded["needs_restart"] == []  # it waits for a switch, not a restart
    assert "in use" in reloaded["not_applied"]["workloads.ollama.stop_timeout"]
    assert reloaded["requested_by"] == "signal:SIGHUP"
    # The new thresholds judge the next samples: 6000 of 20480 MiB is 29 %, below 0.5.
    node.hold("stray", 5000)  # 11000 MiB: 54 %, above the new warn
    tier = daemon.wait_event("vram.tier", to="warn")[0]
    assert tier["gpu"] == 0

    # A config with problems: refused, named, nothing changes.
    node.write(**{**sections, "thresholds": {**sections["thresholds"], "wran": 0.4}})
    result = run_cli("--config", str(config), "reload")
    assert result.returncode == 2, result
    assert "wran" in result.stderr and "nothing changed" in result.stderr
    failed = daemon.wait_event("config.reload_failed")[0]
    assert "wran" in failed["message"]
    assert daemon.status()["gpus"][0]["tier"] == "warn"  # still judged by 0.5
    print(f"\nSIGHUP to config.reloaded: {took * 1000:.0f} ms")


def test_a_killed_process_workloads_leftover_child_is_stopped_and_its_vram_freed(
        node: SimNode, start_daemon) -> None:
    """An engine killed with SIGKILL leaves the runner it started holding VRAM (as
    Ollama's does): the leftovers of its process group are stopped, so the VRAM comes
    back and the mode can be started again."""
    runner = " ".join(hold_argv(node.ledger, "ollama-runner", 5000))
    config = node.write(**two_process_modes(node, **{
        "workloads.ollama": {"kind": "process", "stop_timeout": 2, "command": [
            "sh", "-c", f"{runner} & exec {' '.join(hold_argv(node.ledger, 'ollama', 1000))}"
        ]}}))
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    daemon.wait_used(6000)
    leader = next(w for w in daemon.status()["workloads"] if w["name"] == "ollama")["pid"]
    group = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == leader]
    assert len(group) == 2, group
    os.kill(leader, signal.SIGKILL)
    daemon.wait_event("workload.crashed", workload="ollama")
    wait_for(lambda: not any(psutil.pid_exists(pid) and _pgid(pid) == leader
                             for pid in group), "the runner stopped", timeout=30)
    daemon.wait_used(0)
    result = run_cli("--config", str(config), "mode", "llm")
    assert result.returncode == 0, result.stdout + result.stderr
    daemon.wait_used(6000)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
