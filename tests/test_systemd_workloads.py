"""The parts of systemd workloads that need no systemd: config, the polkit rule's
unit list, unit names, how a unit's property changes read as crashes and starts,
attribution by cgroup, and the simulated GPU's flock holders. The same code runs
against a real systemd in test_systemd_units.py."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuwarden.config import load_config
from gpuwarden.errors import ConfigError
from gpuwarden.gpu.attribution import cgroup_components
from gpuwarden.gpu.sim import _flock_holders
from gpuwarden.polkit_rule import polkit_rule
from gpuwarden.systemd_dbus import escape_instance, unit_object_path
from gpuwarden.workloads.systemd import UnitLifecycle, mask_unit_of, unit_status

from .conftest import DaemonProcess, SimNode, run_cli, two_process_modes, write_toml


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_a_systemd_workload_needs_a_service_unit_and_user_is_for_processes(
        tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {
        "workloads.a": {"kind": "systemd"},
        "workloads.b": {"kind": "systemd", "unit": "ollama"},
        "workloads.c": {"kind": "systemd", "unit": "x.service; rm -rf /"},
        "workloads.d": {"kind": "systemd", "unit": "ollama.service", "user": "root"},
        "daemon": {"process_runner": "sometimes"},
    })
    found = problems(path)
    assert any(p.startswith("workloads.a: ") and "needs unit" in p for p in found), found
    assert any(p.startswith("workloads.b: ") and "not a service unit" in p for p in found)
    assert any(p.startswith("workloads.c: ") and "not a service unit" in p for p in found)
    assert any(p.startswith("workloads.d: ") and "user applies to kind = 'process'" in p
               for p in found)
    assert any(p.startswith("daemon.process_runner") for p in found), found


def test_the_polkit_rule_names_the_configured_units_only(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {
        "workloads.ollama": {"kind": "systemd", "unit": "ollama.service"},
        "workloads.\"comfy ui\"": {"kind": "process", "command": ["/bin/true"]},
        "workloads.box": {"kind": "docker", "container": "box"},
        "modes.llm": {"workloads": ["ollama"]},
        "modes.image": {"workloads": ["comfy ui", "box"]},
    })
    config = load_config(path)
    rule = polkit_rule(config, transient=True)
    for unit in ("ollama.service", "gpuwarden-mask@ollama.service.service",
                 "gpuwarden-unmask@ollama.service.service",
                 "gpuwarden-comfy\\\\x20ui.service"):  # JSON escapes the backslash
        assert f'"{unit}"' in rule, (unit, rule)
    assert "box" not in rule  # containers are Docker's business
    assert "unit === undefined" in rule  # StartTransientUnit names no unit
    child = polkit_rule(config, transient=False)
    assert "gpuwarden-comfy" not in child and "unit === undefined" not in child
    # The CLI prints the same rule.
    out = run_cli("polkit-rule", "--config", str(path))
    assert out.returncode == 0 and out.stdout == rule


def test_unit_names_and_object_paths_are_escaped_as_systemd_does() -> None:
    assert escape_instance("ollama.service") == "ollama.service"
    assert escape_instance("comfy ui") == "comfy\\x20ui"
    assert escape_instance("a-b/c") == "a\\x2db-c"
    assert escape_instance(".hidden") == "\\x2ehidden"
    assert mask_unit_of("ollama.service", "mask") == "gpuwarden-mask@ollama.service.service"
    assert unit_object_path("ollama.service") == \
        "/org/freedesktop/systemd1/unit/ollama_2eservice"
    # systemd-escape agrees, where this machine has it.
    if os.path.exists("/usr/bin/systemd-escape"):
        for text in ("comfy ui", "a-b/c", ".hidden"):
            out = subprocess.run(["systemd-escape", text], capture_output=True, text=True)
            assert out.stdout.strip() == escape_instance(text)


def test_unit_changes_read_as_crashes_restarts_and_stops() -> None:
    life = UnitLifecycle("flaky.service")
    life.update({"ActiveState": "inactive", "SubState": "dead", "NRestarts": 0})
    assert life.update({"ActiveState": "activating", "SubState": "start"}) == []
    assert [a for a, _ in life.update({"ActiveState": "active", "SubState": "running"})] \
        == ["start"]
    # It crashes: Restart= will bring it back.
    (crash,) = life.update({"ExecMainCode": 1, "ExecMainStatus": 3, "Result": "exit-code",
                            "ActiveState": "activating", "SubState": "auto-restart",
                            "ExecMainExitTimestamp": 1_700_000_000_500_000})
    assert crash[0] == "die" and crash[1]["exit_code"] == 3
    assert crash[1]["exited_at"] == pytest.approx(1_700_000_000.5)
    # systemd gives up: the failed that follows is the same crash.
    assert life.update({"ActiveState": "failed", "SubState": "failed"}) == []
    assert [a for a, _ in life.update({"NRestarts": 1, "ActiveState": "active",
                                       "SubState": "running"})] == ["start"]
    # A stop someone asked for is neither.
    assert life.update({"ActiveState": "deactivating", "SubState": "stop-sigterm"}) == []
    assert life.update({"ActiveState": "inactive", "SubState": "dead",
                        "Result": "success"}) == []
    # Killed by a signal without Restart=: a crash, read from the signal.
    life.update({"ActiveState": "active", "SubState": "running"})
    (crash,) = life.update({"ExecMainCode": 2, "ExecMainStatus": 9, "Result": "signal",
                            "ActiveState": "failed", "SubState": "failed"})
    assert crash[1]["exit_code"] == -9


def test_unit_status_reads_running_masked_missing_and_oom() -> None:
    running = unit_status("o.service", {"LoadState": "loaded", "ActiveState": "active",
                                        "SubState": "running", "MainPID": 42,
                                        "NRestarts": 2, "Restart": "always",
                                        "ActiveEnterTimestamp": 1_700_000_000_000_000})
    assert running.running and running.pid == 42 and running.restart_count == 2
    assert running.started_at == pytest.approx(1_700_000_000.0)
    masked = unit_status("o.service", {"LoadState": "masked", "ActiveState": "inactive",
                                       "SubState": "dead", "MainPID": 0})
    assert not masked.running and "masked" in masked.detail and masked.pid is None
    assert unit_status("o.service", {"LoadState": "not-found"}).state.value == "missing"
    oom = unit_status("o.service", {"LoadState": "loaded", "ActiveState": "failed",
                                    "SubState": "failed", "Result": "oom-kill",
                                    "ExecMainCode": 2, "ExecMainStatus": 9})
    assert oom.oom_killed and oom.exit_code == -9 and "oom-kill" in oom.detail


def test_a_units_processes_are_found_by_its_cgroup() -> None:
    v2 = "0::/system.slice/ollama.service\n"
    delegated = "0::/system.slice/ollama.service/runner-1\n"
    v1 = "12:pids:/system.slice/ollama.service\n1:name=systemd:/system.slice/ollama.service\n"
    for text in (v2, delegated, v1):
        assert "ollama.service" in cgroup_components(text)
    assert "ollama.service" not in cgroup_components("0::/system.slice/other.service\n")


def test_a_flocked_claim_names_its_holder_for_any_reader(tmp_path: Path) -> None:
    claim = tmp_path / "other-user.mib"
    claim.write_text("4000\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(claim)!r})\n"
        "fcntl.flock(f, fcntl.LOCK_SH)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        st = claim.stat()
        assert holder.pid in _flock_holders().get((st.st_dev, st.st_ino), [])
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 30
    while holder.pid in _flock_holders().get((st.st_dev, st.st_ino), []):
        assert time.monotonic() < deadline, "the lock outlived its holder"
        time.sleep(0.05)
    with open(claim) as fh:  # nothing else holds it now
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_without_a_reachable_systemd_a_unit_is_unknown_and_nothing_starts(
        node: SimNode) -> None:
    config = node.write(**two_process_modes(node, **{
        "daemon": {"default_mode": "idle"},
        "workloads.ollama": {"kind": "systemd", "unit": "ollama.service"}}))
    daemon = DaemonProcess(config, node.socket, env={
        "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={node.root / 'no-bus'}"})
    try:
        daemon.wait_ready()
        (error,) = daemon.events("systemd.error")
        assert error["severity"] == "error" and "ollama.service" in error["units"]
        status = daemon.client.get("/v1/status").json()
        ollama = next(w for w in status["workloads"] if w["name"] == "ollama")
        assert ollama["state"] == "unknown" and "systemd unreachable" in ollama["detail"]
        # The restore of the recorded mode at start is a switch of its own: once it is
        # over (CI met it still running), a switch to llm...
        daemon.wait_mode("idle", timeout=60)
        # ...fails closed: it cannot start the unit, says why, and leaves nothing running.
        resp = daemon.client.post("/v1/mode", json={"mode": "llm"})
        assert resp.status_code != 200, resp.text
        assert "ollama.service" in resp.text and "system bus" in resp.text
        assert daemon.client.get("/v1/status").json()["gpus"][0]["used_mib"] == 0
    finally:
        daemon.stop()
