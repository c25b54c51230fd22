"""GPU modes over real Docker containers holding simulated VRAM (a private engine)."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from .conftest import Containers, SimNode, run_cli
from .dockerd import holder_script
from .standins import ComfyStandIn, OllamaStandIn


def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"gw-ollama-{tag}", f"gw-comfy-{tag}"


def holder_containers(containers: Containers) -> tuple[str, str]:
    """Two stopped containers holding simulated VRAM once started: an Ollama (6000 MiB)
    and a ComfyUI (8000 MiB); their names."""
    ollama, comfy = names()
    containers.create(ollama, holder_script("ollama", 6000))
    containers.create(comfy, holder_script("comfyui", 8000))
    return ollama, comfy


def docker_config(node: SimNode, host: str, ollama: str, comfy: str, *,
                  default_mode: str = "llm", release: dict[str, Any] | None = None,
                  ollama_extra: dict[str, Any] | None = None,
                  comfy_extra: dict[str, Any] | None = None,
                  sim: dict[str, Any] | None = None, image_mode: dict[str, Any] | None = None
                  ) -> Path:
    return node.write(**{
        "daemon": {"default_mode": default_mode},
        "docker": {"host": host},
        "gpu.sim": sim or {},
        "release": release or {},
        "workloads.ollama": {"kind": "docker", "container": ollama, "stop_timeout": 5,
                             "restart_policy": "no", **(ollama_extra or {})},
        "workloads.comfyui": {"kind": "docker", "container": comfy, "stop_timeout": 5,
                              "restart_policy": "no", **(comfy_extra or {})},
        "modes.llm": {"workloads": ["ollama"]},
        "modes.image": {"workloads": ["comfyui"], **(image_mode or {})},
    })


class ExclusivityProbe(threading.Thread):
    """Samples both containers every 20 ms; records any instant both ran."""

    def __init__(self, containers: Containers, a: str, b: str) -> None:
        super().__init__(daemon=True)
        self.containers, self.a, self.b = containers, a, b
        self.samples = 0
        self.violations: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        client = self.containers.engine.client()
        while not self._halt.is_set():
            states = [client.containers.get(n).attrs["State"]["Running"] for n in (self.a,
                                                                                  self.b)]
            self.samples += 1
            if all(states):
                self.violations.append(time.monotonic())
            self._halt.wait(0.02)
        client.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def switch(config: Path, mode: str, *extra: str) -> tuple[int, dict[str, Any]]:
    result = run_cli("--config", str(config), "mode", mode, "--json", *extra, timeout=120)
    return result.returncode, json.loads(result.stdout or "{}")


def test_llm_image_idle_llm_cycle_is_exclusive(node: SimNode, dockerd: Any,
                                               containers: Containers, start_daemon) -> None:
    ollama, comfy = holder_containers(containers)
    # A 1 s release delay: long enough that "the switch waited for it" shows in
    # release_s however late a busy machine runs the first check.
    config = docker_config(node, dockerd.host, ollama, comfy, sim={"release_delay": 1.0})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    assert containers.running(ollama) and not containers.running(comfy)
    probe = ExclusivityProbe(containers, ollama, comfy)
    probe.start()
    try:
        for target, running, used in (("image", comfy, 8000), ("idle", None, 0),
                                      ("llm", ollama, 6000)):
            code, result = switch(config, target)
            assert code == 0, result
            assert result["ok"] and result["to"] == target
            # The stopped container's claim is freed release_delay (1 s) after it was last
            # seen alive, and the switch waited for that proof.
            if target != "llm":
                assert result["timings"]["release_s"] >= 0.1, result
            for name in (ollama, comfy):
                assert containers.running(name) == (name == running)
            deadline = time.monotonic() + 5
            while daemon.status()["gpus"][0]["used_mib"] != used:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            if running is not None:
                procs = daemon.status()["gpus"][0]["processes"]
                assert [p["workload"] for p in procs] == [
                    "ollama" if running == ollama else "comfyui"]
    finally:
        probe.stop()
    assert probe.samples > 20
    assert probe.violations == []
    verified = daemon.events("release.verified")
    completed = daemon.events("mode.switch.completed")
    assert [e["to"] for e in completed] == ["llm", "image", "idle", "llm"]
    assert all(e["requested_by"].startswith("cli:") for e in completed[1:])
    assert {"stop_s", "release_s", "start_s", "total_s"} <= set(completed[1]["timings"])
    assert len(verified) == 4
    # mode shows the new mode per GPU
    shown = run_cli("--config", str(config), "mode")
    assert shown.returncode == 0 and "GPU 0: llm" in shown.stdout


def test_a_leak_fails_the_switch_closed(node: SimNode, dockerd: Any, containers: Containers,
                                        start_daemon) -> None:
    ollama, comfy = names()
    containers.create(ollama, holder_script("ollama", 6000, leak=True))
    containers.create(comfy, holder_script("comfyui", 8000))
    config = docker_config(node, dockerd.host, ollama, comfy, release={"timeout": 1.0})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    code, result = switch(config, "image")
    assert code == 1
    assert result["ok"] is False and "release not verified" in result["error"]
    assert not containers.running(comfy), "the target must never start"
    assert not containers.running(ollama)
    timeout = daemon.wait_event("release.timeout")[0]
    assert timeout["used_mib"] == 6000 and timeout["allowed_mib"] == 256
    assert timeout["severity"] == "critical"
    doc = daemon.status()
    gpu = doc["gpus"][0]
    assert gpu["mode"] == "idle"
    assert "release not verified" in gpu["last_failure"]["error"]
    assert "last switch FAILED" in run_cli("--config", str(config), "status").stdout
    # Once the leak is cleared, the next switch goes through.
    for claim in node.ledger.glob("ollama-*.mib"):
        claim.unlink()
    code, result = switch(config, "image")
    assert code == 0, result
    assert containers.running(comfy)


def _docker_seconds(stamp: str) -> float:
    """Docker's RFC 3339 time with nanoseconds, as unix seconds."""
    from datetime import datetime

    head, _, frac = stamp.rstrip("Z").partition(".")
    whole = datetime.fromisoformat(head + "+00:00").timestamp()
    return whole + (float("0." + frac) if frac else 0.0)


def test_hand_started_container_of_inactive_mode_is_stopped(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    """The mode guard kills a container started outside its mode within 3 s of its
    start, by Docker's own clock, even on a saturated machine (.ci/run runs this with
    --busy). The container ignores nothing: the time is the guard's, not a grace's."""
    ollama, comfy = names()
    containers.create(ollama, holder_script("ollama", 6000))
    # This ComfyUI ignores SIGTERM, and its stop_timeout is long: a guard that stopped
    # it gracefully would wait 30 s.
    containers.create(comfy, 'trap "" TERM; c=/ledger/comfyui.mib; echo 8000 > "$c"; '
                      'sleep 1000000 3<"$c" & wait')
    config = docker_config(node, dockerd.host, ollama, comfy,
                           comfy_extra={"stop_timeout": 30})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    took = []
    for round_ in range(5):
        containers.get(comfy).start()
        violation = daemon.wait_event("mode.violation", workload="comfyui",
                                      count=round_ + 1)[round_]
        assert violation["mode"] == "llm"
        deadline = time.monotonic() + 30
        while containers.running(comfy):
            assert time.monotonic() < deadline, "violating container kept running"
            time.sleep(0.05)
        state = containers.get(comfy).attrs["State"]
        took.append(_docker_seconds(state["FinishedAt"]) - _docker_seconds(state["StartedAt"]))
        assert containers.running(ollama)
    took.sort()
    print(f"\nmode guard, start to stop of a hand-started container: median "
          f"{took[len(took) // 2]:.2f} s, worst {took[-1]:.2f} s of {len(took)}")
    assert took[-1] <= 3.0, took


def test_drift_at_start_is_resolved_toward_the_recorded_mode(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    ollama, comfy = names()
    containers.create(ollama, holder_script("ollama", 6000), start=True)
    containers.create(comfy, holder_script("comfyui", 8000), start=True)
    config = docker_config(node, dockerd.host, ollama, comfy, default_mode="image")
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("image")
    drift = daemon.wait_event("mode.drift")[0]
    assert drift["running"] == ["ollama"]
    assert containers.running(comfy) and not containers.running(ollama)


def test_concurrent_requests_conflict_or_join(node: SimNode, dockerd: Any,
                                              containers: Containers, start_daemon) -> None:
    ollama, comfy = holder_containers(containers)
    stand_in = ComfyStandIn().start()
    stand_in.delay["/system_stats"] = 1.5  # a slow start keeps the switch running
    try:
        config = docker_config(node, dockerd.host, ollama, comfy,
                               comfy_extra={"release": "comfyui", "url": stand_in.url})
        daemon = start_daemon(config, node.socket)
        daemon.wait_mode("llm")
        first = daemon.client.post("/v1/mode", json={"mode": "image"},
                                   params={"wait": "false"})
        assert first.status_code == 202
        tid = first.json()["id"]
        # Another target while it runs: refused with the running transition's id.
        code, refused = switch(config, "llm")
        assert code == 1 and tid in refused["error"]
        conflict = daemon.client.post("/v1/mode", json={"mode": "idle"})
        assert conflict.status_code == 409
        assert conflict.json()["detail"]["id"] == tid
        # The same target joins the running switch and gets its result.
        code, joined = switch(config, "image")
        assert code == 0 and joined["id"] == tid
    finally:
        stand_in.stop()
    assert len(daemon.events("mode.switch.started")) == 2  # restore + the one switch


def test_ollama_and_comfyui_release_calls(node: SimNode, dockerd: Any,
                                          containers: Containers, start_daemon) -> None:
    ollama, comfy = holder_containers(containers)
    ol = OllamaStandIn(["llama3.2:latest", "qwen2.5:7b"]).start()
    cf = ComfyStandIn().start()
    try:
        config = docker_config(node, dockerd.host, ollama, comfy,
                               ollama_extra={"release": "ollama", "url": ol.url},
                               comfy_extra={"release": "comfyui", "url": cf.url})
        daemon = start_daemon(config, node.socket)
        daemon.wait_mode("llm")
        assert "/api/version" in ol.paths("GET")  # readiness was checked
        code, result = switch(config, "image")
        assert code == 0, result
        unloads = [body for m, p, body in ol.calls if p == "/api/generate"]
        assert unloads == [{"model": "llama3.2:latest", "keep_alive": 0},
                           {"model": "qwen2.5:7b", "keep_alive": 0}]
        assert ol.loaded == []
        assert "/system_stats" in cf.paths("GET")

        # A queued ComfyUI job refuses the switch, naming the job count; nothing changes.
        cf.running.append([1, "p1", {}, {}, []])
        cf.pending.append([2, "p2", {}, {}, []])
        code, refused = switch(config, "llm")
        assert code == 1 and "2 job(s)" in refused["error"]
        assert containers.running(comfy) and not containers.running(ollama)
        assert daemon.status()["gpus"][0]["mode"] == "image"
        assert "/free" not in cf.paths()

        # With force it interrupts, frees, and switches.
        code, result = switch(config, "llm", "--force")
        assert code == 0, result
        posts = cf.paths("POST")
        assert posts.index("/interrupt") < posts.index("/free")
        free = next(body for m, p, body in cf.calls if p == "/free")
        assert free == {"unload_models": True, "free_memory": True}

        # An API that is down never blocks the switch.
        ol.up = False
        code, result = switch(config, "image")
        assert code == 0, result
        verified = daemon.events("release.verified")[-1]
        assert any("503" in " ".join(g) or "ollama API" in " ".join(g)
                   for g in verified["graceful"].values())
    finally:
        ol.stop()
        cf.stop()


STEPS = ["releasing", "stopping", "verifying", "starting"]


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_mid_switch_recovers_without_two_modes(
        step: str, node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    ollama, comfy = names()
    # The ollama container ignores SIGTERM (no trap): docker stop waits stop_timeout.
    slow_stop = 'c=/ledger/ollama.mib; echo 6000 > $c; exec sleep 1000000 3<$c'
    containers.create(ollama, slow_stop)
    containers.create(comfy, holder_script("comfyui", 8000))
    ol = OllamaStandIn().start()
    cf = ComfyStandIn().start()
    ol.delay["/api/ps"] = 1.0  # a slow graceful release
    try:
        config = docker_config(
            node, dockerd.host, ollama, comfy,
            ollama_extra={"release": "ollama", "url": ol.url, "stop_timeout": 1},
            comfy_extra={"release": "comfyui", "url": cf.url},
            sim={"release_delay": 1.0},  # a slow release to verify
        )
        daemon = start_daemon(config, node.socket)
        daemon.wait_mode("llm")
        cf.delay["/system_stats"] = 1.0  # a slow readiness check
        state = node.state_dir / "state.json"
        daemon.client.post("/v1/mode", json={"mode": "image"}, params={"wait": "false"})
        deadline = time.monotonic() + 15
        while True:
            tr = json.loads(state.read_text())["gpus"]["0"]["transition"]
            if tr is not None and tr["step"] == step:
                break
            assert time.monotonic() < deadline, f"never saw step {step}"
            time.sleep(0.005)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        recorded = json.loads(state.read_text())["gpus"]["0"]
        assert recorded["transition"]["to_mode"] == "image"  # written ahead of acting
        cf.delay.clear()
        probe = ExclusivityProbe(containers, ollama, comfy)
        probe.start()
        try:
            again = start_daemon(config, node.socket)
            again.wait_event("mode.recovery")
            doc = again.wait_mode("image", timeout=30)
        finally:
            probe.stop()
        assert probe.violations == []
        assert containers.running(comfy) and not containers.running(ollama)
        assert doc["gpus"][0]["transition"] is None
        assert json.loads(state.read_text())["gpus"]["0"]["transition"] is None
    finally:
        ol.stop()
        cf.stop()


def test_failed_start_rolls_back_and_a_kill_9_mid_roll_back_recovers(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    ollama, comfy = holder_containers(containers)
    # ComfyUI's API never answers: the start fails after ready_timeout and the switch
    # rolls back to llm once comfyui's VRAM is proven back (2 s release delay).
    config = docker_config(node, dockerd.host, ollama, comfy, sim={"release_delay": 2.0},
                           comfy_extra={"release": "comfyui", "url": "http://127.0.0.1:9",
                                        "ready_timeout": 0.5})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    state = node.state_dir / "state.json"
    probe = ExclusivityProbe(containers, ollama, comfy)
    probe.start()
    try:
        daemon.client.post("/v1/mode", json={"mode": "image"}, params={"wait": "false"})
        deadline = time.monotonic() + 20
        while True:  # the roll back records itself ahead of acting, like any switch
            tr = json.loads(state.read_text())["gpus"]["0"]["transition"]
            if tr is not None and tr["to_mode"] == "llm" and tr["step"] == "verifying":
                break
            assert time.monotonic() < deadline, "never saw the roll back"
            time.sleep(0.005)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        again = start_daemon(config, node.socket)
        again.wait_event("mode.recovery")
        doc = again.wait_mode("llm", timeout=30)
        assert containers.running(ollama) and not containers.running(comfy)
        assert doc["gpus"][0]["transition"] is None

        # Uninterrupted, the roll back ends in llm with the failure on record.
        code, result = switch(config, "image")
        assert code == 1 and result["ok"] is False
        assert "comfyui not ready within 0.5 s" in result["error"]
        assert result["error"].endswith("rolled back to llm")
        doc = again.wait_mode("llm")
        assert doc["gpus"][0]["last_failure"]["rolled_back_to"] == "llm"
        assert containers.running(ollama) and not containers.running(comfy)
        failed = again.events("mode.switch.failed")[-1]
        assert failed["mode"] == "llm" and failed["rolled_back_to"] == "llm"
        # comfyui's claim outlived it by 2 s (counted from when it was last seen alive):
        # the roll back waited for it
        assert failed["timings"]["rollback_release_s"] >= 0.1
        # The mode guard knew all along that llm's workloads were coming back.
        assert again.events("mode.violation") == []
    finally:
        probe.stop()
    assert probe.violations == []


def test_lease_returns_to_default_mode_when_queue_is_idle(
        node: SimNode, dockerd: Any, containers: Containers, start_daemon) -> None:
    ollama, comfy = holder_containers(containers)
    cf = ComfyStandIn().start()
    try:
        config = docker_config(node, dockerd.host, ollama, comfy,
                               comfy_extra={"release": "comfyui", "url": cf.url},
                               image_mode={"lease": "2s"})
        daemon = start_daemon(config, node.socket)
        daemon.wait_mode("llm")
        cf.pending.append([1, "p1", {}, {}, []])  # busy: the lease must wait
        code, result = switch(config, "image", "--force")
        assert code == 0, result
        time.sleep(3.5)
        assert daemon.status()["gpus"][0]["mode"] == "image"
        cf.pending.clear()
        expired = daemon.wait_event("mode.lease.expired", timeout=20)[0]
        assert expired["mode"] == "image" and expired["requested_by"] == "lease"
        daemon.wait_mode("llm", timeout=20)
        assert containers.running(ollama) and not containers.running(comfy)
    finally:
        cf.stop()


def test_docker_unreachable_is_a_state_not_a_crash(node: SimNode, start_daemon) -> None:
    config = docker_config(node, f"unix://{node.root}/no-docker.sock", "a", "b",
                           default_mode="idle")
    daemon = start_daemon(config, node.socket)
    daemon.wait_event("docker.error")
    doc = daemon.status()
    assert {w["state"] for w in doc["workloads"]} == {"unknown"}
    code, result = switch(config, "llm")
    assert code == 1 and "could not stop" in result["error"]
    assert daemon.client.get("/healthz").json() == {"ok": True}
