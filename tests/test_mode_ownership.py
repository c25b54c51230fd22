"""One owner per GPU during a switch, every refusal before anything stops, `mode M` heals M,
and a CLI that keeps its word: over real Docker containers and real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

import pytest

from .conftest import (
    PYTHON,
    Containers,
    DaemonProcess,
    SimNode,
    run_cli,
    two_process_modes,
    wait_for,
)
from .standins import ComfyStandIn
from .test_modes_docker import ExclusivityProbe, docker_config, holder_containers, switch


def gpu_state(node: SimNode) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((node.state_dir / "state.json").read_text())
    return doc


def workload(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    return next(w for w in daemon.status()["workloads"] if w["name"] == name)


def test_a_slow_hanging_or_failing_queue_refuses_before_anything_stops(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    ollama, comfy = holder_containers(containers)
    cf = ComfyStandIn().start()
    try:
        config = docker_config(node, dockerd.host, ollama, comfy, default_mode="image",
                               comfy_extra={"release": "comfyui", "url": cf.url},
                               release={"queue_timeout": 4.0})
        daemon = start_daemon(config, node.socket)
        daemon.wait_mode("image")
        before = gpu_state(node)

        # A job is queued and /queue answers after 2.5 s: the sampler and the mode guard
        # run many times meanwhile, and none of them may touch ComfyUI.
        cf.pending.append([1, "p1", {}, {}, []])
        cf.delay["/queue"] = 2.5
        code, refused = switch(config, "llm")
        assert code == 1 and "1 job(s)" in refused["error"], refused
        # ...an answer that never comes in queue_timeout (4 s)...
        cf.delay["/queue"] = 6.0  # past queue_timeout; short enough for stop() to wait out
        code, hung = switch(config, "llm")
        assert code == 1 and "did not answer within 4 s" in hung["error"], hung
        # ...and an error are refusals too, never a silent pass.
        cf.delay.clear()
        cf.up = False
        code, failing = switch(config, "llm")
        assert code == 1 and "answered 503" in failing["error"], failing

        assert containers.running(comfy) and not containers.running(ollama)
        assert gpu_state(node)["gpus"] == before["gpus"]
        assert daemon.status()["gpus"][0]["mode"] == "image"
        assert daemon.events("mode.violation") == []
        assert daemon.events("workload.stopped") == []
        assert "/free" not in cf.paths() and "/interrupt" not in cf.paths()
        audited = daemon.events("mode.switch.refused")
        assert [e["figures"].get("jobs") for e in audited] == [1, None, None]
        assert all(e["requested_by"].startswith("cli:") and e["from"] == "image"
                   and e["to"] == "llm" for e in audited)
        assert "did not answer" in audited[1]["reason"]

        # Forced, it interrupts ComfyUI (its API is back) and switches.
        cf.up = True
        code, forced = switch(config, "llm", "--force")
        assert code == 0, forced
        assert containers.running(ollama) and not containers.running(comfy)
        assert daemon.events("mode.violation") == []
    finally:
        cf.stop()


def test_a_target_that_cannot_fit_is_refused_before_anything_stops(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    ollama, comfy = holder_containers(containers)
    config = docker_config(node, dockerd.host, ollama, comfy,
                           comfy_extra={"expected_mib": 8000})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    stray = node.hold("stray", 13000)  # unowned: 6000 + 13000 of the 20480 MiB card
    try:
        wait_for(lambda: daemon.status()["gpus"][0]["used_mib"] == 19000, "the stray")
        before = gpu_state(node)
        code, refused = switch(config, "image")
        assert code == 1, refused
        assert "needs 8000 MiB" in refused["error"] and "7480 MiB free" in refused["error"]
        assert containers.running(ollama), "Ollama must not be interrupted for nothing"
        assert not containers.running(comfy)
        assert gpu_state(node)["gpus"] == before["gpus"]
        assert daemon.events("workload.stopped") == []
        assert [e["to"] for e in daemon.events("mode.switch.started")] == ["llm"]  # restore
        event = daemon.wait_event("mode.switch.refused")[0]
        assert event["figures"]["available_mib"] == 7480
        assert event["figures"]["freed_mib"] == 6000
        assert event["figures"]["holders"][0]["used_mib"] == 13000
    finally:
        stray.kill()
        stray.wait()
    wait_for(lambda: daemon.status()["gpus"][0]["used_mib"] == 6000, "the stray gone")
    code, result = switch(config, "image")
    assert code == 0, result


def test_mode_heals_a_container_killed_by_hand(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    ollama, comfy = holder_containers(containers)
    config = docker_config(node, dockerd.host, ollama, comfy)
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    containers.get(ollama).kill()  # SIGKILL: exit code 137

    stopped = wait_for(lambda: workload(daemon, "ollama")["stopped"], "ollama stopped")
    assert stopped["exit_code"] == 137 and stopped["signal"] == "SIGKILL", stopped
    assert stopped["by"] == "exit" and stopped["at"] is not None
    plain = run_cli("--config", str(config), "status").stdout
    assert "exited with code 137 (SIGKILL), at " in plain, plain

    result = run_cli("--config", str(config), "mode", "llm", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    healed = json.loads(result.stdout)
    assert healed["ok"] and healed["from"] == healed["to"] == "llm"
    assert healed["started"] == ["ollama"]
    assert containers.running(ollama) and not containers.running(comfy)
    event = daemon.wait_event("mode.reconcile")[-1]
    assert event["started"] == ["ollama"] and event["requested_by"].startswith("cli:")
    assert workload(daemon, "ollama")["stopped"] is None
    # Whole again: nothing to do.
    again = run_cli("--config", str(config), "mode", "llm")
    assert again.returncode == 0 and "already in llm" in again.stdout

    # A workload a switch stopped says so, with who asked.
    code, result = switch(config, "image")
    assert code == 0, result
    stopped = workload(daemon, "ollama")["stopped"]
    assert stopped["by"] == "switch" and "switch to image" in stopped["reason"], stopped
    assert stopped["requested_by"].startswith("cli:")


@pytest.mark.timeout(900)
def test_200_switches_never_meet_the_mode_guard(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    ollama, comfy = holder_containers(containers)
    config = docker_config(node, dockerd.host, ollama, comfy)
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    probe = ExclusivityProbe(containers, ollama, comfy)
    probe.start()
    try:
        for i in range(200):
            target = "image" if i % 2 == 0 else "llm"
            resp = daemon.client.post("/v1/mode", json={"mode": target}, timeout=120)
            assert resp.status_code == 200, (i, resp.text)
    finally:
        probe.stop()
    completed = daemon.events("mode.switch.completed")
    assert len(completed) == 201  # the restore, then the 200
    violations = daemon.events("mode.violation")
    assert violations == [], f"{len(violations)} mode.violation events: {violations[:3]}"
    assert daemon.events("mode.switch.failed") == []
    assert probe.violations == []
    assert containers.running(ollama) and not containers.running(comfy)


def test_cli_timeout_and_ctrl_c_say_the_switch_goes_on(node: SimNode, start_daemon) -> None:
    cf = ComfyStandIn().start()
    cf.delay["/system_stats"] = 3.0  # ComfyUI takes 3 s to answer its readiness check
    try:
        config = node.write(**two_process_modes(node, **{
            "workloads.comfyui": {"release": "comfyui", "url": cf.url}}))
        daemon = start_daemon(config, node.socket)
        daemon.wait_mode("llm")

        # Exit 4 only while the switch still runs: it ends 3 s on, at the earliest.
        result = run_cli("--config", str(config), "mode", "image", "--timeout", "0.5")
        assert result.returncode == 4, result
        assert "goes on" in result.stderr and "gpuwarden mode" in result.stderr
        tid = result.stderr.split("(id ")[1].split(",")[0].split(")")[0]
        done = daemon.wait_event("mode.switch.completed", to="image")[0]
        assert done["transition_id"] == tid
        followed = daemon.client.get(f"/v1/switches/{tid}").json()
        assert followed["done"] and followed["ok"] and followed["started"] == ["comfyui"]

        as_json = run_cli("--config", str(config), "mode", "llm", "--json", "--timeout", "60")
        assert as_json.returncode == 0, as_json
        assert json.loads(as_json.stdout)["to"] == "llm"

        # Ctrl-C while the switch runs: exit 130, saying the switch goes on. ComfyUI now
        # takes 6 s to answer, so the switch surely runs when the signal lands, however
        # slowly a busy machine lets this test see it start.
        cf.delay["/system_stats"] = 6.0
        # As from a terminal: SIGINT at its default, even where this test runs with it
        # ignored (a job started in the background inherits that).
        cli = subprocess.Popen([PYTHON, "-m", "gpuwarden.cli", "--config", str(config), "mode",
                                "image"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_for(lambda: daemon.status()["gpus"][0]["transition"], "the switch under way")
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=30)
        assert cli.returncode == 130, (out, err)
        # Interrupted once the daemon's answer (the switch's id) is in: the id is named;
        # interrupted while that answer is still on its way: it says to look.
        assert "interrupted" in err, err
        assert ("goes on" in err and "(id " in err) or "may still go on" in err, err
        daemon.wait_mode("image", timeout=60)
    finally:
        cf.stop()


def test_a_killed_process_workload_says_why_and_mode_heals_it(
        node: SimNode, start_daemon) -> None:
    config = node.write(**two_process_modes(node))
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    never = workload(daemon, "comfyui")["stopped"]
    assert never["by"] == "exit" and never["reason"] == "never started", never
    for mode in ("image", "llm"):
        assert run_cli("--config", str(config), "mode", mode).returncode == 0
    by_switch = workload(daemon, "comfyui")["stopped"]
    assert by_switch["by"] == "switch" and "switch to llm" in by_switch["reason"]

    pid = wait_for(lambda: workload(daemon, "ollama")["pid"], "ollama's pid")
    os.kill(pid, signal.SIGKILL)
    stopped = wait_for(lambda: workload(daemon, "ollama")["stopped"], "ollama stopped")
    assert stopped["reason"] == "killed by SIGKILL" and stopped["signal"] == "SIGKILL"
    plain = run_cli("--config", str(config), "status").stdout
    assert "killed by SIGKILL, at " in plain, plain
    assert "DEGRADED: ollama of mode llm not running" in plain, plain
    result = run_cli("--config", str(config), "mode", "llm")
    assert result.returncode == 0, result
    assert "llm healed" in result.stdout and "started ollama" in result.stdout
    assert workload(daemon, "ollama")["state"] == "running"
    assert daemon.wait_event("mode.reconcile")[-1]["started"] == ["ollama"]
    # The heal stopped nothing that ran: comfyui still says which switch stopped it.
    assert workload(daemon, "comfyui")["stopped"] == by_switch
    assert "DEGRADED" not in run_cli("--config", str(config), "status").stdout

    # Bad input: exit 2, nothing changes.
    for argv, message in ((["mode", "image", "--timeout", "-1"], "more than 0 seconds"),
                          (["mode", "gaming"], "unknown mode 'gaming'"),
                          (["unblock", "nosuch"], "unknown workload 'nosuch'")):
        bad = run_cli("--config", str(config), *argv)
        assert bad.returncode == 2 and message in bad.stderr, (argv, bad)  # bad usage
    assert daemon.status()["gpus"][0]["mode"] == "llm"


def test_refusal_for_a_switch_already_running_is_audited(node: SimNode,
                                                        start_daemon) -> None:
    cf = ComfyStandIn().start()
    cf.delay["/system_stats"] = 3.0
    try:
        config = node.write(**two_process_modes(node, **{
            "workloads.comfyui": {"release": "comfyui", "url": cf.url}}))
        daemon = start_daemon(config, node.socket)
        daemon.wait_mode("llm")
        first = daemon.client.post("/v1/mode", json={"mode": "image"}, params={"wait": "false"})
        assert first.status_code == 202
        before = daemon.status()["gpus"][0]["transition"]
        conflict = daemon.client.post("/v1/mode", json={"mode": "idle"})
        assert conflict.status_code == 409
        event = daemon.wait_event("mode.switch.refused")[0]
        assert event["to"] == "idle" and event["figures"]["id"] == first.json()["id"]
        assert daemon.status()["gpus"][0]["transition"]["id"] == before["id"]
        daemon.wait_mode("image", timeout=30)
    finally:
        cf.stop()
