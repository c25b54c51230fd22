"""Crash-loop guard, leak detection and protective actions, over a real Docker engine."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from gpuwarden.config import Config, DockerConfig
from gpuwarden.docker_events import ContainerEvent, DockerEventWatcher

from .conftest import Containers, SimNode, run_cli
from .dockerd import holder_script
from .standins import ComfyStandIn, OllamaStandIn

LEAK_MIB = 1500


def crashloop_config(node: SimNode, host: str, crashy: str, calm: str, **extra: Any) -> Path:
    return node.write(**{
        "daemon": {"default_mode": "image"},
        "docker": {"host": host},
        "crashloop": {"max_restarts": 3, "window": 60},
        "workloads.comfyui": {"kind": "docker", "container": crashy, "stop_timeout": 2,
                              "restart_policy": "unless-stopped"},
        "workloads.ollama": {"kind": "docker", "container": calm, "stop_timeout": 2},
        "modes.image": {"workloads": ["comfyui"]},
        "modes.llm": {"workloads": ["ollama"]},
        **extra,
    })


def restart_count(containers: Containers, name: str) -> int:
    return int(containers.get(name).attrs["RestartCount"])


def test_crash_loop_is_blocked_and_unblock_needs_a_clear_gpu(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    tag = uuid.uuid4().hex[:8]
    crashy, calm = f"gw-crashy-{tag}", f"gw-calm-{tag}"
    # Each start leaks a fresh claim and crashes 0.3 s later, under unless-stopped.
    containers.create(crashy, holder_script("comfy", LEAK_MIB, leak=True, exit_after=0.3),
                      restart_policy="unless-stopped")
    containers.create(calm, holder_script("ollama", 2000))
    config = crashloop_config(node, dockerd.host, crashy, calm)
    daemon = start_daemon(config, node.socket)
    blocked = daemon.wait_event("crashloop.blocked", timeout=60)[0]
    assert blocked["workload"] == "comfyui" and blocked["severity"] == "critical"
    assert blocked["restarts"] == 3 and len(blocked["exit_codes"]) == 4
    assert set(blocked["exit_codes"]) == {"1"}
    assert blocked["used_mib"] >= LEAK_MIB and "leaked_mib" in blocked
    crashes = daemon.events("workload.crashed")
    assert len(crashes) == 4 and {c["exit_code"] for c in crashes} == {"1"}

    container = containers.get(crashy)
    assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "no"
    # Docker counts a restart when it schedules one: the 4th was scheduled at the 4th
    # crash and cancelled by the block before it ran.
    count = restart_count(containers, crashy)
    assert count <= 4
    time.sleep(3)  # Docker's backoff would have restarted it by now
    assert restart_count(containers, crashy) == count
    assert not containers.running(crashy)
    # Each start leaked one claim: the first start and exactly 3 restarts, none beyond.
    leaked = list(node.ledger.glob("comfy-*.mib"))
    assert len(leaked) == 4
    doc = daemon.status()
    assert doc["gpus"][0]["used_mib"] <= 4 * LEAK_MIB
    assert [w["blocked"] for w in doc["workloads"] if w["name"] == "comfyui"] == [True]
    # Plain status points at the unblock, not at `mode image` (which would be refused).
    plain = run_cli("--config", str(config), "status").stdout
    assert "DEGRADED: comfyui of mode image not running (`gpuwarden unblock comfyui`" in plain

    # The block survives a daemon restart.
    assert daemon.stop() == 0
    daemon = start_daemon(config, node.socket)
    assert [w["blocked"] for w in daemon.status()["workloads"]
            if w["name"] == "comfyui"] == [True]

    # A switch into its mode is refused, naming the block; nothing changes.
    refused = run_cli("--config", str(config), "mode", "image", "--json")
    assert refused.returncode == 1 and "blocked" in json.loads(refused.stdout)["error"]
    assert daemon.status()["gpus"][0]["mode"] == "image"
    assert not containers.running(crashy)

    # Started by hand while blocked: a violation, stopped.
    containers.get(crashy).start()
    daemon.wait_event("mode.violation", workload="comfyui")
    deadline = time.monotonic() + 10
    while containers.running(crashy):
        assert time.monotonic() < deadline
        time.sleep(0.05)

    # Unblock is refused while the leaked VRAM is held, with the figures.
    result = run_cli("--config", str(config), "unblock", "comfyui")
    assert result.returncode == 1
    assert "not clear" in result.stderr and "MiB" in result.stderr
    resp = daemon.client.post("/v1/workloads/comfyui/unblock")
    assert resp.status_code == 409 and resp.json()["detail"]["used_mib"] >= 4 * LEAK_MIB
    # Once the leak is cleared the card is usable and the unblock accepted, with the
    # configured policy restored; its mode is no longer active, so it is not started.
    for claim in node.ledger.glob("comfy-*.mib"):
        claim.unlink()
    code = run_cli("--config", str(config), "mode", "llm", "--json")
    assert code.returncode == 0, code.stdout
    result = run_cli("--config", str(config), "unblock", "comfyui")
    assert result.returncode == 0, result.stderr
    assert "started" not in result.stdout
    unblocked = daemon.wait_event("crashloop.unblocked")[0]
    assert unblocked["requested_by"].startswith("cli:")
    container = containers.get(crashy)
    assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert not containers.running(crashy)
    again = run_cli("--config", str(config), "unblock", "comfyui")
    assert again.returncode == 1 and "not blocked" in again.stderr
    assert run_cli("--config", str(config), "unblock", "ghost").returncode == 2  # bad usage


def test_the_gate_after_the_release_refuses_a_card_filled_during_the_switch(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    """The up-front fit prediction passes (the card is empty), but a stray fills the card
    while the switch stops llm: the last gate, after the release, refuses the start,
    and the switch rolls back to llm."""
    tag = uuid.uuid4().hex[:8]
    crashy, calm = f"gw-a-{tag}", f"gw-b-{tag}"
    containers.create(crashy, holder_script("comfy", 1000))
    # Ignores SIGTERM: the stop takes stop_timeout (2 s), time to fill the card.
    containers.create(calm, 'c=/ledger/ollama.mib; echo 2000 > $c; exec sleep 1000000 3<$c')
    config = crashloop_config(
        node, dockerd.host, crashy, calm, daemon={"default_mode": "llm"},
        **{"workloads.comfyui": {"kind": "docker", "container": crashy, "stop_timeout": 2,
                                 "expected_mib": 12000}})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    state = node.state_dir / "state.json"
    stray = None
    try:
        first = daemon.client.post("/v1/mode", json={"mode": "image"}, params={"wait": "false"})
        assert first.status_code == 202, first.text
        deadline = time.monotonic() + 20
        while (json.loads(state.read_text())["gpus"]["0"]["transition"] or {}).get(
                "step") != "stopping":
            assert time.monotonic() < deadline, "never saw the stopping step"
            time.sleep(0.005)
        stray = node.hold("stray", 10000)  # 10 GiB of 20 GiB taken mid-switch
        result = daemon.client.get(f"/v1/switches/{first.json()['id']}").json()
        deadline = time.monotonic() + 60
        while not result["done"]:
            assert time.monotonic() < deadline, result
            time.sleep(0.05)
            result = daemon.client.get(f"/v1/switches/{first.json()['id']}").json()
        assert result["ok"] is False
        assert "needs 12000 MiB" in result["error"] and "10480 MiB free" in result["error"]
        assert result["error"].endswith("rolled back to llm")
        refused = daemon.wait_event("workload.refused", workload="comfyui")[0]
        assert refused["transition_id"] == first.json()["id"]
        daemon.wait_mode("llm")
        assert containers.running(calm) and not containers.running(crashy)
        assert containers.get(crashy).attrs["State"]["StartedAt"].startswith("0001-"), \
            "comfyui must never have started"
    finally:
        if stray is not None:
            stray.kill()
            stray.wait()
    deadline = time.monotonic() + 30
    while daemon.status()["gpus"][0]["used_mib"] > 2000:  # the stray's VRAM is back
        assert time.monotonic() < deadline, daemon.status()["gpus"][0]
        time.sleep(0.05)
    result = run_cli("--config", str(config), "mode", "image", "--json")
    assert result.returncode == 0, result.stdout


def test_event_stream_resumes_after_an_engine_restart_without_double_counting(
        dockerd: Any, containers: Containers) -> None:
    import asyncio

    name = f"gw-ev-{uuid.uuid4().hex[:8]}"
    containers.create(name, holder_script("ev", 10))
    seen: list[ContainerEvent] = []
    states: list[bool] = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    watcher = DockerEventWatcher(DockerConfig(host=dockerd.host),
                                 lambda e: seen.append(e) if e.name == name else None,
                                 lambda up, detail: states.append(up), max_backoff=0.5)
    watcher.start(loop)
    try:
        deadline = time.monotonic() + 20
        while not watcher.connected:
            assert time.monotonic() < deadline, "the event stream never connected"
            time.sleep(0.05)
        containers.get(name).start()
        containers.get(name).stop(timeout=2)
        dockerd.restart()
        client = dockerd.client()
        client.containers.get(name).start()
        client.containers.get(name).stop(timeout=2)
        client.close()
        deadline = time.monotonic() + 20
        while sum(e.action == "start" for e in seen) < 2 or \
                sum(e.action == "die" for e in seen) < 2:
            assert time.monotonic() < deadline, [(e.action, e.time_ns) for e in seen]
            time.sleep(0.1)
    finally:
        watcher.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    keys = [(e.time_ns, e.container_id, e.action) for e in seen]
    assert len(keys) == len(set(keys)), "an event was delivered twice"
    assert [e.action for e in seen].count("start") == 2
    assert [e.action for e in seen].count("die") == 2
    assert states == [False, True]  # lost once, recovered once
    assert watcher.reconnects >= 1


def test_leak_detection_on_an_idle_gpu_and_an_unowned_holder(node: SimNode,
                                                             start_daemon) -> None:
    config = node.write(thresholds={"sustain": 2}, watchdog={"leak_reminder": "1s"})
    daemon = start_daemon(config, node.socket)
    leaker = node.hold("leaky", 3000, "--leak")
    leaker.kill()
    leaker.wait()
    event = daemon.wait_event("vram.leak", kind="device")[0]
    assert event["leaked_mib"] == 3000 and event["recovered"] is False
    daemon.wait_event("vram.leak", kind="device", reminder=True)
    (node.ledger / "leaky.mib").unlink()
    daemon.wait_event("vram.leak", kind="device", recovered=True)
    opened = [e for e in daemon.events("vram.leak")
              if e["kind"] == "device" and not e["recovered"] and not e.get("reminder")]
    assert len(opened) == 1  # one event per episode

    stray = node.hold("stray", 700)
    try:
        event = daemon.wait_event("vram.leak", kind="process")[0]
        assert event["processes"][0]["pid"] == stray.pid
        assert event["processes"][0]["visible"] is True  # a live process, in this /proc
        assert event["unowned_mib"] == 700
    finally:
        stray.kill()
        stray.wait()
    daemon.wait_event("vram.leak", kind="process", recovered=True)


def test_allowed_processes_are_not_leaks(node: SimNode, start_daemon, tmp_path: Path) -> None:
    probe = node.hold("probe", 10)
    comm = Path(f"/proc/{probe.pid}/comm").read_text().strip()
    probe.kill()
    probe.wait()
    (node.ledger / "probe.mib").unlink()
    config = node.write(watchdog={"allowed_processes": [comm]})
    daemon = start_daemon(config, node.socket)
    stray = node.hold("xorg", 700)
    try:
        daemon.wait_samples(5)
        assert [e for e in daemon.events("vram.leak") if e["kind"] == "process"] == []
    finally:
        stray.kill()
        stray.wait()


def test_protective_actions_in_order_at_critical(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    tag = uuid.uuid4().hex[:8]
    ollama, comfy = f"gw-pol-{tag}", f"gw-pcf-{tag}"
    containers.create(ollama, holder_script("ollama", 6000))
    containers.create(comfy, holder_script("comfyui", 9500))
    ol = OllamaStandIn(["llama3.2:latest"], ledger=node.ledger, model_mib=400).start()
    cf = ComfyStandIn(ledger=node.ledger, cache_mib=300).start()
    try:
        config = node.write(**{
            "daemon": {"default_mode": "both"},
            "docker": {"host": dockerd.host},
            "gpu.sim": {"total_mib": 16300},
            "thresholds": {"sustain": 1},
            "watchdog": {"protect_actions": ["comfyui_free", "ollama_unload",
                                             "stop_lowest_priority"],
                         "protect_settle": 2.0},
            "workloads.ollama": {"kind": "docker", "container": ollama, "stop_timeout": 2,
                                 "release": "ollama", "url": ol.url, "priority": 10},
            "workloads.comfyui": {"kind": "docker", "container": comfy, "stop_timeout": 2,
                                  "release": "comfyui", "url": cf.url, "priority": 5},
            "modes.both": {"workloads": ["ollama", "comfyui"]},
        })
        daemon = start_daemon(config, node.socket)
        actions = daemon.wait_event("vram.protect", count=3, timeout=60)
        assert [a["action"] for a in actions] == ["comfyui_free", "ollama_unload",
                                                   "stop_lowest_priority"]
        assert actions[0]["freed_mib"] == 300 and actions[1]["freed_mib"] == 400
        assert actions[2]["workloads"] == ["comfyui"]  # priority 5 < 10
        assert actions[2]["freed_mib"] == 9500
        assert ol.loaded == [] and "/free" in cf.paths("POST")
        assert not containers.running(comfy) and containers.running(ollama)
        daemon.wait_event("vram.tier", to="ok")
        daemon.wait_samples(5)
        assert len(daemon.events("vram.protect")) == 3  # once per escalation
        tiers = [(e["from"], e["to"]) for e in daemon.events("vram.tier")]
        assert tiers[0] == ("ok", "critical")
    finally:
        ol.stop()
        cf.stop()


def test_default_protective_actions_kill_nothing() -> None:
    assert "stop_lowest_priority" not in Config().watchdog.protect_actions
