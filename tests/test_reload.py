"""A reload applies what can change under a running node (workloads and modes not in
use, receivers, demand proxies) and names the rest with why; process workloads'
restart policies, and the crash-loop guard over them, as the demo shows them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from .conftest import PYTHON, SimNode, hold_argv, run_cli, two_process_modes, wait_for
from .standins import free_port
from .test_proxy import ProxiedNode, chat, in_thread, prompt
from .test_sinks import SECRET, Receiver


@pytest.fixture
def proxied(node: SimNode, start_daemon: Any) -> ProxiedNode:
    return ProxiedNode(node, start_daemon)


def reload(config: Path) -> dict[str, Any]:
    result = run_cli("--config", str(config), "reload", "--json")
    assert result.returncode == 0, result
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_workloads_and_modes_not_in_use_change_live(node: SimNode, start_daemon) -> None:
    """A new workload and mode can be switched to after a reload; a workload in use
    keeps its config and says why; a key read at start says it needs a restart."""
    tables = two_process_modes(node)
    config = node.write(**tables)
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    changed = {
        **tables,
        "daemon": {**tables["daemon"], "sample_interval": 0.3},
        "workloads.ollama": {**tables["workloads.ollama"], "stop_timeout": 3},
        "workloads.comfyui": {**tables["workloads.comfyui"], "stop_timeout": 4},
        "workloads.embed": {"kind": "process", "stop_timeout": 2,
                            "command": hold_argv(node.ledger, "embed", 2000)},
        "modes.embed": {"workloads": ["embed"]},
    }
    node.write(**changed)
    doc = reload(config)
    assert "workloads.comfyui.stop_timeout" in doc["applied"]
    # Tables added whole are named whole, not by every key they default.
    assert "workloads.embed" in doc["applied"] and "modes.embed" in doc["applied"]
    assert "in use" in doc["not_applied"]["workloads.ollama.stop_timeout"]
    assert "restart" in doc["not_applied"]["daemon.sample_interval"]
    assert doc["needs_restart"] == ["daemon.sample_interval"]  # the rest waits for a switch
    event = daemon.wait_event("config.reloaded")[0]
    assert event["requested_by"].startswith("cli:") and event["not_applied"]

    result = run_cli("--config", str(config), "mode", "embed", "--json")
    assert result.returncode == 0, result
    daemon.wait_used(2000)
    assert {w["name"]: w["state"] for w in daemon.status()["workloads"]}["embed"] == "running"

    # The active mode cannot lose its workload under it; the mode it left can go.
    del changed["modes.embed"], changed["workloads.embed"]
    changed["modes.llm"] = {"workloads": []}
    node.write(**changed)
    doc = reload(config)
    assert "modes.llm.workloads" in doc["applied"]
    assert "'embed' is active" in doc["not_applied"]["modes.embed"]
    assert "embed" in {w["name"] for w in daemon.status()["workloads"]}
    result = run_cli("--config", str(config), "mode", "llm", "--json")
    assert result.returncode == 0, result
    daemon.wait_used(0)  # llm now runs nothing: the reload reached the switcher
    doc = reload(config)  # embed is no longer in use: now it goes
    assert "workloads.embed" in doc["applied"] and "modes.embed" in doc["applied"], doc
    assert "embed" not in {w["name"] for w in daemon.status()["workloads"]}


def test_receivers_are_added_and_removed_by_a_reload(node: SimNode, start_daemon) -> None:
    receiver = Receiver().start()
    try:
        config = node.write()
        daemon = start_daemon(config, node.socket)
        assert daemon.status()["sinks"]["receivers"] == []
        node.write(n8n={"event_webhook_urls": [f"{receiver.url}/hook"],
                        "signing_secret": SECRET, "min_severity": "info"})
        doc = reload(config)
        assert "n8n.event_webhook_urls" in doc["applied"], doc
        # Its first delivery is the reload that made it.
        got = wait_for(lambda: [r for r in receiver.received
                                if r["body"]["event"] == "config.reloaded"],
                       "config.reloaded at the new receiver")
        assert got[0]["body"]["requested_by"].startswith("cli:"), got[0]["body"]
        (sink,) = daemon.status()["sinks"]["receivers"]
        assert sink["sink"].startswith("n8n:")
        node.write()
        doc = reload(config)
        assert "n8n.event_webhook_urls" in doc["applied"]
        assert daemon.status()["sinks"]["receivers"] == []
        before = len(receiver.received)
        reload(config)  # one more event, at info
        daemon.wait_event("config.reloaded", count=3)
        daemon.wait_samples(3)
        assert len(receiver.received) == before  # removed: nothing more reaches it
    finally:
        receiver.stop()
    assert receiver.bad_signatures == 0


def test_a_proxy_moves_at_a_reload_but_not_under_a_waiting_request(
        proxied: ProxiedNode) -> None:
    daemon = proxied.start(default_mode="image", job_seconds=4.0)
    config = proxied.node.config_path
    moved = free_port()
    old = proxied.ollama
    proxied.ollama_proxy = moved
    proxied.ollama = f"http://127.0.0.1:{moved}"
    proxied.config(default_mode="image", job_seconds=4.0)  # the file, with the new listen
    # A chat waiting for a running image job: the proxies stay as they are.
    prompt(proxied.comfy)
    thread, answer = in_thread(chat, old)
    proxied.wait_proxy("ollama", waiting=1)
    doc = reload(config)
    assert "wait or run" in doc["not_applied"]["proxy.ollama.listen"], doc
    assert f"http://{proxied.proxy_status('ollama')['listen']}" == old
    thread.join(120)  # the chat waited for the job, then its switch
    assert "error" not in answer, answer
    assert answer["result"]["status"] == 200
    assert json.loads(answer["result"]["lines"][-1])["done"]
    wait_for(lambda: proxied.proxy_status("ollama")["in_flight"] == 0, "the chat's end")
    doc = reload(config)
    assert "proxy.ollama.listen" in doc["applied"], doc
    assert httpx.get(f"{proxied.ollama}/api/version", timeout=10).status_code == 200
    try:
        httpx.get(f"{old}/api/version", timeout=5)
        raise AssertionError("the old address still answers")
    except httpx.ConnectError:
        pass
    # An address another program holds: refused before the running proxies close.
    taken = free_port()
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        proxied.ollama_proxy = taken
        proxied.config(default_mode="image", job_seconds=4.0)
        doc = reload(config)
        assert "cannot listen" in doc["not_applied"]["proxy.ollama.listen"], doc
        # The proxies were left alone, and a rebuild keeps their counts.
        assert proxied.proxy_status("comfyui")["forwarded"] >= 1
        assert httpx.get(f"{proxied.ollama.rsplit(':', 1)[0]}:{moved}/api/version",
                         timeout=10).status_code == 200
    assert daemon.proc.poll() is None


def test_a_crashing_process_is_restarted_by_its_policy_then_blocked(
        node: SimNode, start_daemon) -> None:
    fixed = node.root / "fixed"
    tables = two_process_modes(node, **{
        "workloads.crashy": {
            "kind": "process", "stop_timeout": 2, "restart_policy": "on-failure",
            "crashloop_max_restarts": 2, "crashloop_window": 60,
            "command": hold_argv(node.ledger, "crashy", 1000, "--exit-after", "0.5",
                                 "--exit-code", "3", "--unless-exists", str(fixed))},
        "modes.llm": {"workloads": ["ollama", "crashy"]}})
    config = node.write(**tables)
    daemon = start_daemon(config, node.socket)
    blocked = daemon.wait_event("crashloop.blocked", timeout=60, workload="crashy")[0]
    assert blocked["restarts"] == 2 and blocked["exit_codes"] == [3, 3, 3]
    restarts = daemon.events("workload.started")
    assert sum(e.get("requested_by") == "restart policy" for e in restarts) == 2
    daemon.wait_samples(3)  # blocked: no restart comes
    workloads = {w["name"]: w for w in daemon.status()["workloads"]}
    assert workloads["crashy"]["state"] == "stopped" and workloads["crashy"]["blocked"]
    delays = [e["delay_s"] for e in daemon.events("workload.started")
              if e.get("requested_by") == "restart policy"]
    assert delays == [0.1, 0.2]
    # Unblocked unfixed: a new sequence, from 100 ms again, blocked again. (Unblock
    # is refused until crashy's VRAM is back.)
    daemon.wait_samples(2)
    daemon.wait_used(6000)
    answer = run_cli("--config", str(config), "unblock", "crashy", "--json")
    assert answer.returncode == 0, answer
    assert json.loads(answer.stdout) == {"ok": True, "workload": "crashy", "started": True}
    daemon.wait_event("crashloop.blocked", timeout=60, workload="crashy", count=2)
    delays = [e["delay_s"] for e in daemon.events("workload.started")
              if e.get("requested_by") == "restart policy"]
    assert delays == [0.1, 0.2, 0.1, 0.2]
    fixed.touch()
    daemon.wait_samples(2)  # taken after the block: crashy's VRAM is back
    daemon.wait_used(6000)
    result = run_cli("--config", str(config), "unblock", "crashy")
    assert result.returncode == 0, result
    daemon.wait_used(7000)
    daemon.wait_samples(5)  # the fixed crashy stays up
    workloads = {w["name"]: w for w in daemon.status()["workloads"]}
    assert workloads["crashy"]["state"] == "running"
    assert len(daemon.events("workload.crashed")) == 6
    last = run_cli("--config", str(config), "events", "-n", "2", "--type", "workload.*")
    assert len(last.stdout.splitlines()) == 2, last.stdout  # -n without --follow too
    none = run_cli("--config", str(config), "events", "-n", "0")
    assert none.returncode == 0 and none.stdout == "", none  # as tail -n 0
    bad = run_cli("--config", str(config), "events", "-n", "-1")
    assert bad.returncode == 2 and "not a count" in bad.stderr, bad
    again = run_cli("--config", str(config), "unblock", "crashy", "--json")
    assert again.returncode == 1 and json.loads(again.stdout)["exit_code"] == 1


def test_demo_crash_loop_is_blocked_and_unblock_lifts_it(tmp_path: Path) -> None:
    """The README's quick start: `gpuwarden demo --crash-loop`, then the commands it
    prints."""
    folder = tmp_path / "demo"
    demo = subprocess.Popen([PYTHON, "-m", "gpuwarden.cli", "demo", "--crash-loop", "--dir",
                             str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    config = folder / "config.toml"
    try:
        def crashy() -> dict[str, Any] | None:
            result = run_cli("--config", str(config), "status", "--json")
            if result.returncode != 0:
                return None
            found: dict[str, Any] = next(w for w in json.loads(result.stdout)["workloads"]
                                         if w["name"] == "crashy")
            return found
        wait_for(lambda: (w := crashy()) and w["blocked"] and w["state"] == "stopped",
                 "crashy blocked and stopped", timeout=90)
        status = run_cli("--config", str(config), "status")
        assert "BLOCKED" in status.stdout and "crash loop" in status.stdout, status.stdout
        (folder / "crashy.fixed").touch()
        result = run_cli("--config", str(config), "unblock", "crashy")
        assert result.returncode == 0 and "started" in result.stdout, result
        wait_for(lambda: (w := crashy()) and w["state"] == "running", "crashy running")
        children = psutil.Process(demo.pid).children(recursive=True)
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)  # its children end with it
            demo.wait(30)
    assert demo.returncode == 0, err
    assert f"touch {folder / 'crashy.fixed'}" in err.decode()
    assert b'"event": "crashloop.blocked"' in out
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive


def _config(**sections: dict[str, Any]) -> Any:
    from gpuwarden.config import Config

    base: dict[str, Any] = {
        "daemon": {"default_mode": "llm"},
        "workloads": {"ollama": {"kind": "process", "command": ["a"]},
                      "comfyui": {"kind": "process", "command": ["b"]}},
        "modes": {"llm": {"workloads": ["ollama"]}, "image": {"workloads": ["comfyui"]}},
    }
    for key, value in sections.items():
        base[key] = value
    return Config(**base)


def _in_use(**changes: Any) -> Any:
    from gpuwarden.reload import InUse

    fields: dict[str, Any] = {"workloads": frozenset({"ollama"}), "modes": frozenset({"llm"}),
                              "switching": False, "proxies_busy": None, "discord_bot": False}
    fields.update(changes)
    return InUse(**fields)


def test_the_plan_names_why_each_change_waits() -> None:
    from gpuwarden.reload import plan_reload

    old = _config()
    workloads = {"ollama": {"kind": "process", "command": ["a2"]},
                 "comfyui": {"kind": "process", "command": ["b2"]}}
    new = _config(workloads=workloads)
    plan = plan_reload(old, new, _in_use(), lambda _: None)
    assert plan.applied == ["workloads.comfyui.command"]
    assert "in use" in plan.not_applied["workloads.ollama.command"]
    assert plan.config.workloads["comfyui"].command == ["b2"]
    assert plan.config.workloads["ollama"].command == ["a"]
    assert plan.rebuilt_workloads == {"comfyui"}

    # While a switch runs, nothing of workloads or modes changes.
    plan = plan_reload(old, new, _in_use(switching=True), lambda _: None)
    assert plan.applied == [] and "switch is running" in plan.not_applied[
        "workloads.comfyui.command"]
    assert plan.config.workloads == old.workloads

    # A kind this daemon cannot take without a restart.
    plan = plan_reload(old, new, _in_use(), lambda _: "units are watched from the start")
    assert plan.not_applied["workloads.comfyui.command"] == "units are watched from the start"

    # The active mode and its workload stay, though the new file drops them.
    new = _config(workloads={"comfyui": {"kind": "process", "command": ["b"]}},
                  modes={"image": {"workloads": ["comfyui"]}}, daemon={"default_mode": "image"})
    plan = plan_reload(old, new, _in_use(), lambda _: None)
    assert "in use" in plan.not_applied["workloads.ollama"]
    assert "active" in plan.not_applied["modes.llm"]
    assert "restart" in plan.not_applied["daemon.default_mode"]
    assert plan.config.modes == old.modes and plan.config.workloads == old.workloads

    # Requests at the proxies hold proxy changes, and the workload changes with them.
    served = {"kind": "process", "release": "comfyui", "url": "http://127.0.0.1:8188"}
    old = _config(proxy={"comfyui": {"listen": "127.0.0.1:18188"}},
                  workloads={"ollama": {"kind": "process", "command": ["a"]},
                             "comfyui": {**served, "command": ["b"]}})
    new = _config(proxy={"comfyui": {"listen": "127.0.0.1:18189"}},
                  workloads={"ollama": {"kind": "process", "command": ["a"]},
                             "comfyui": {**served, "command": ["b2"]}})
    plan = plan_reload(old, new, _in_use(proxies_busy="2 requests wait"), lambda _: None)
    assert plan.not_applied == {"proxy.comfyui.listen": "2 requests wait",
                                "workloads.comfyui.command": "2 requests wait"}
    assert plan.config == old and not plan.proxies
    plan = plan_reload(old, new, _in_use(), lambda _: None)
    assert plan.proxies and plan.config.proxy["comfyui"].listen == "127.0.0.1:18189"
