"""Bare-metal workloads on a real systemd: a unit (`kind = "systemd"`, a stand-in
`ollama.service` run as its own user) and a process workload run as a transient unit
outside gpuwarden's sandbox, on the simulated GPU.

The host comes from tests/systemd_host.py. The workloads run as other users than
gpuwarden, so their simulated VRAM claims are flocked (the ledger's rule for
holders the daemon may not inspect).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.systemd_host import GW, SystemdHost, systemd_host

pytestmark = pytest.mark.timeout(900)

LEDGER = "/srv/ledger"
MAX_RESTARTS = 3

OLLAMA_UNIT = f"""[Unit]
Description=Ollama Service (stand-in, as Ollama's installer writes it)

[Service]
User=ollama
ExecStart=/usr/bin/python3 /srv/ollama_unit.py --port 11434 --ledger {LEDGER} --mib 6000
Restart=always
RestartSec=3
"""

# A GPU service that crashes half a second after each start, restarted by systemd
# after 100 ms; systemd's own start limit is off, so gpuwarden's guard is what ends it.
FLAKY_UNIT = f"""[Unit]
Description=A GPU service that crashes soon after it starts
StartLimitIntervalSec=0

[Service]
User=ollama
ExecStart=/usr/bin/python3 /srv/ollama_unit.py --port 11435 --ledger {LEDGER} --mib 3000 \
  --crash-after 0.5
Restart=always
RestartSec=100ms
"""

CONFIG = f"""
[daemon]
sample_interval = 0.5
default_mode = "llm"

[gpu]
backend = "sim"

[gpu.sim]
total_mib = 20480
ledger_dir = "{LEDGER}"
release_delay = 0.15

[crashloop]
max_restarts = {MAX_RESTARTS}
window = 60

[workloads.ollama]
kind = "systemd"
unit = "ollama.service"
release = "ollama"
url = "http://127.0.0.1:11434"

# In /home, which gpuwarden's own sandbox hides (ProtectHome=yes).
[workloads.comfyui]
kind = "process"
command = ["python3", "rwx_holder.py", "{LEDGER}", "comfyui", "8000", "report.json"]
cwd = "/home/comfy"
user = "comfy"

[workloads.flaky]
kind = "systemd"
unit = "flaky.service"

[modes.llm]
workloads = ["ollama"]

[modes.image]
workloads = ["comfyui"]

[modes.flaky]
workloads = ["flaky"]
"""


@pytest.fixture(scope="module")
def host(dockerd: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdHost]:
    with systemd_host(dockerd.host, tmp_path_factory.mktemp("units")) as machine:
        machine.run("useradd --system --create-home ollama && useradd --create-home comfy")
        machine.run(f"install -d -m 1777 {LEDGER} && "
                    "install -m 0755 /src/tests/ollama_unit.py /srv/ && "
                    "install -o comfy -g comfy -m 0755 /src/tests/rwx_holder.py /home/comfy/")
        machine.write("/etc/systemd/system/ollama.service", OLLAMA_UNIT)
        machine.write("/etc/systemd/system/flaky.service", FLAKY_UNIT)
        machine.write("/etc/systemd/system/other.service",
                      "[Service]\nExecStart=/bin/sleep 1000\n")
        machine.write("/etc/gpuwarden/config.toml", CONFIG)
        machine.run("systemctl daemon-reload")
        installed = machine.run("/src/scripts/install.sh --wheelhouse /wheels", timeout=600,
                                check=False)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        yield machine


def settled(host: SystemdHost, mode: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        doc = host.status()
        gpu = doc["gpus"][0]
        return doc if gpu["mode"] == mode and gpu["transition"] is None else None
    found: dict[str, Any] = host.wait(f"mode {mode}, settled", check, timeout=120)
    return found


def holders(doc: dict[str, Any]) -> list[tuple[str | None, int]]:
    return [(p["workload"], p["used_mib"]) for p in doc["gpus"][0]["processes"]]


def held_by(host: SystemdHost, mode: str, expected: list[tuple[str, int]]) -> dict[str, Any]:
    """The status once `mode` is settled and its workload holds its VRAM (a unit or
    process without a readiness check counts as started before it claims any)."""
    settled(host, mode)
    found: dict[str, Any] = host.wait(
        f"{expected} holding VRAM", lambda: (lambda d: d if holders(d) == expected else None)(
            host.status()), timeout=60)
    return found


def unit_property(host: SystemdHost, unit: str, prop: str) -> str:
    return host.run(f"systemctl show -p {prop} --value {unit}").stdout.strip()


def events(host: SystemdHost, name: str) -> list[dict[str, Any]]:
    return host.journal(f"GPUWARDEN_EVENT={name}")


def test_ollama_unit_and_a_process_outside_the_sandbox_switch_with_release_proven(
        host: SystemdHost) -> None:
    # The unit's process (another user's) is attributed by its cgroup.
    held_by(host, "llm", [("ollama", 6000)])
    assert unit_property(host, "ollama.service", "ActiveState") == "active"

    switched = host.run(f"{GW} mode image")
    assert "llm -> image" in switched.stdout, switched.stdout
    held_by(host, "image", [("comfyui", 8000)])
    # Ollama was asked to unload its model before its unit was stopped.
    assert "unloaded standin:7b" in host.run("journalctl -u ollama -o cat").stdout
    assert unit_property(host, "ollama.service", "ActiveState") == "inactive"
    # The process workload: a transient unit of its own, as its user, free of
    # gpuwarden's MemoryDenyWriteExecute= (it mapped RWX memory) and ProtectHome=.
    report = json.loads(host.run("cat /home/comfy/report.json").stdout)
    assert report["user"] == "comfy" and report["rwx"] is True
    assert unit_property(host, "gpuwarden-comfyui.service", "User") == "comfy"
    assert unit_property(host, "gpuwarden-comfyui.service", "ControlGroup") == \
        "/system.slice/gpuwarden-comfyui.service"
    assert unit_property(host, "gpuwarden.service", "MemoryDenyWriteExecute") == "yes"
    completed = [e for e in events(host, "mode.switch.completed") if e.get("TO") == "image"]
    assert completed, "no audited switch"

    host.run(f"{GW} mode llm")
    held_by(host, "llm", [("ollama", 6000)])
    assert unit_property(host, "gpuwarden-comfyui.service", "ActiveState") in ("inactive", "")


def test_a_process_workload_is_readopted_after_kill_9_without_overlap(
        host: SystemdHost) -> None:
    host.run(f"{GW} mode image")
    held_by(host, "image", [("comfyui", 8000)])
    pid = unit_property(host, "gpuwarden-comfyui.service", "MainPID")
    ollama_started = unit_property(host, "ollama.service", "ActiveEnterTimestampMonotonic")
    restarts = int(unit_property(host, "gpuwarden.service", "NRestarts"))

    host.run("systemctl kill -s KILL gpuwarden.service")
    host.wait("gpuwarden restarted by systemd",
              lambda: int(unit_property(host, "gpuwarden.service", "NRestarts")) > restarts
              and host.active() == "active", timeout=120)
    doc = settled(host, "image")
    # The same process, found again by its unit's name; Ollama never came back.
    assert unit_property(host, "gpuwarden-comfyui.service", "MainPID") == pid
    assert holders(doc) == [("comfyui", 8000)], doc
    workloads = {w["name"]: w["state"] for w in doc["workloads"]}
    assert workloads == {"ollama": "stopped", "comfyui": "running", "flaky": "stopped"}
    assert unit_property(host, "ollama.service", "ActiveEnterTimestampMonotonic") == \
        ollama_started


def test_a_crash_loop_under_restart_always_is_blocked_and_masked_until_unblock(
        host: SystemdHost) -> None:
    host.run(f"{GW} mode flaky")
    blocked = host.wait("the block", lambda: events(host, "crashloop.blocked"), timeout=120)[-1]
    assert blocked["WORKLOAD"] == "flaky"
    assert json.loads(blocked["GPUWARDEN_ERRORS"]) == [], blocked
    assert blocked["GPUWARDEN_MASKED"] == "true"
    # Blocked at the crash after the last allowed restart: systemd made exactly
    # max_restarts restarts, and none after the block.
    assert int(blocked["GPUWARDEN_RESTART_COUNT"]) == MAX_RESTARTS
    starts = host.run("journalctl -u flaky -o cat").stdout.count("stand-in on 127.0.0.1:11435")
    crash_at = json.loads(blocked["GPUWARDEN_CRASH_TIMES"])[-1]
    to_block = float(blocked["GPUWARDEN_POLICY_NO_AT"]) - crash_at
    print(f"\ncrash -> stop queued: {to_block * 1000:.1f} ms; restarts past the threshold: "
          f"{starts - 1 - MAX_RESTARTS}")
    time.sleep(1.0)  # RestartSec= ten times over: a restart would have come by now
    starts_later = host.run("journalctl -u flaky -o cat").stdout.count(
        "stand-in on 127.0.0.1:11435")
    assert starts == starts_later == MAX_RESTARTS + 1
    assert unit_property(host, "flaky.service", "ActiveState") == "inactive"
    assert host.run("systemctl is-enabled flaky.service", check=False).stdout.strip() == \
        "masked-runtime"
    refused = host.run("systemctl start flaky.service", check=False)
    assert refused.returncode != 0 and "masked" in refused.stderr
    status = host.status()
    assert [w["name"] for w in status["workloads"] if w["blocked"]] == ["flaky"], status

    host.run(f"{GW} mode llm")
    settled(host, "llm")
    host.run(f"{GW} unblock flaky")
    assert host.run("systemctl is-enabled flaky.service", check=False).stdout.strip() == \
        "static"
    assert [e["WORKLOAD"] for e in events(host, "crashloop.unblocked")] == ["flaky"]
    assert unit_property(host, "flaky.service", "ActiveState") == "inactive"


def test_the_polkit_rule_allows_exactly_the_configured_units(host: SystemdHost) -> None:
    def as_gpuwarden(command: str) -> int:
        return host.run(f"systemctl --no-ask-password {command}", user="gpuwarden",
                        check=False).returncode

    rule = host.run("cat /etc/polkit-1/rules.d/50-gpuwarden.rules").stdout
    assert '"ollama.service"' in rule and '"gpuwarden-comfyui.service"' in rule
    settled(host, "llm")
    assert as_gpuwarden("start ollama.service") == 0  # configured (already running)
    assert as_gpuwarden("start other.service") != 0
    assert as_gpuwarden("restart ollama.service") != 0  # a verb gpuwarden never uses
    assert as_gpuwarden("start gpuwarden-mask@other.service.service") != 0
    assert unit_property(host, "other.service", "ActiveState") == "inactive"
    assert host.run("systemctl is-enabled other.service", check=False).stdout.strip() != \
        "masked-runtime"


    # The transient unit outlives a stop of the daemon; uninstalling stops it, and
    # leaves no rule or oneshot behind.
    host.run(f"{GW} mode image")
    settled(host, "image")
    host.run("systemctl stop gpuwarden")
    assert unit_property(host, "gpuwarden-comfyui.service", "ActiveState") == "active"
    host.run("/src/scripts/install.sh --uninstall --purge")
    assert unit_property(host, "gpuwarden-comfyui.service", "ActiveState") == "inactive"
    left = host.run("ls /etc/polkit-1/rules.d/50-gpuwarden.rules "
                    "/etc/systemd/system/gpuwarden-mask@.service 2>/dev/null", check=False)
    assert left.stdout.strip() == ""
