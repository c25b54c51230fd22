"""gpuwarden on a real systemd: PID 1 in a container of the private Docker engine,
installed with scripts/install.sh as a user would, on the simulated GPU with
process workloads (transient units: the daemon runs under systemd). The host comes
from tests/systemd_host.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.systemd_host import GW, ROOT, SystemdHost, systemd_host

TOKEN = "systemd-host-token-" + "z" * 24
LEDGER = "/var/lib/gpuwarden/ledger"

pytestmark = pytest.mark.timeout(900)


def _holder(name: str, mib: int) -> list[str]:
    claim = f"{LEDGER}/{name}.mib"
    return ["/bin/sh", "-c", f"trap 'exit 0' TERM; echo {mib} > {claim}; "
            f"sleep 1000000 3<{claim} & wait"]


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

[workloads.ollama]
kind = "process"
command = {json.dumps(_holder("ollama", 6000))}

[workloads.comfyui]
kind = "process"
command = {json.dumps(_holder("comfyui", 8000))}
# Ready once its API answers: nothing listens until a test starts a stand-in, so a
# switch to image can be held in its "starting" step.
release = "comfyui"
url = "http://127.0.0.1:8189"

[modes.llm]
workloads = ["ollama"]

[modes.image]
workloads = ["comfyui"]

[api]
listen = "127.0.0.1:8787"

[api.tokens.n8n]
token_file = "n8n.token"
"""


@pytest.fixture(scope="module")
def host(dockerd: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdHost]:
    with systemd_host(dockerd.host, tmp_path_factory.mktemp("systemd")) as machine:
        yield machine


def comfyui_answers(host: SystemdHost) -> None:
    """A stand-in for ComfyUI's API on 8189: /system_stats answers, /queue is empty."""
    host.run("mkdir -p /srv/comfy && echo '{}' > /srv/comfy/system_stats && "
             "echo '{\"queue_running\": [], \"queue_pending\": []}' > /srv/comfy/queue")
    subprocess.run([*host.docker, "exec", "-d", host.name, "python3", "-m", "http.server",
                    "8189", "--bind", "127.0.0.1", "--directory", "/srv/comfy"],
                   check=True, capture_output=True, timeout=60)


def test_a_first_install_with_the_example_config_starts_nothing(host: SystemdHost) -> None:
    """No config yet: the example is installed and checked, and nothing is enabled or
    started until it has been edited (or --enable is given)."""
    installed = host.run("/src/scripts/install.sh --wheelhouse /wheels", timeout=600,
                         check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "still the example: nothing was enabled or started" in installed.stdout
    assert "check-config" in installed.stdout  # the next steps
    assert host.active() != "active"
    enabled = host.run("systemctl is-enabled gpuwarden", check=False).stdout.strip()
    assert enabled != "enabled", enabled


def test_install_on_a_host_without_docker_starts_after_ready(host: SystemdHost) -> None:
    host.run("useradd -m alice && useradd -m bob")
    host.write("/etc/gpuwarden/config.toml", CONFIG)
    host.write("/etc/gpuwarden/credentials/n8n.token", TOKEN + "\n", mode="0600")
    assert host.run("getent group docker", check=False).returncode != 0  # no docker group
    installed = host.run("/src/scripts/install.sh --wheelhouse /wheels --operator alice",
                         timeout=600, check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr + host.run(
        "journalctl -u gpuwarden -n 40 --no-pager", check=False).stdout
    assert "gpuwarden is running" in installed.stdout, installed.stdout
    assert "python3 here is under" not in installed.stdout
    assert host.active() == "active"
    # Config for the service and operators, credentials for root only.
    perms = host.run("stat -c '%a %U %G %n' /etc/gpuwarden /etc/gpuwarden/config.toml "
                     "/etc/gpuwarden/credentials /etc/gpuwarden/credentials/n8n.token").stdout
    assert perms.split("\n")[:4] == [
        "750 root gpuwarden /etc/gpuwarden", "640 root gpuwarden /etc/gpuwarden/config.toml",
        "700 root root /etc/gpuwarden/credentials",
        "600 root root /etc/gpuwarden/credentials/n8n.token"], perms
    assert "[modes.llm]" in host.run("cat /etc/gpuwarden/config.toml", user="gpuwarden").stdout
    # The man page and the docs the unit names are where it says.
    assert host.run("test -f /usr/local/share/man/man1/gpuwarden.1 && "
                    "test -f /opt/gpuwarden/docs/architecture.md").returncode == 0
    assert "man:gpuwarden(1)" in host.run("systemctl show -p Documentation gpuwarden").stdout
    # The installed unit with its drop-ins, as this systemd sees it, still rates <= 4.0;
    # every test here runs the service under that sandbox.
    security = host.run("systemd-analyze security gpuwarden --no-pager", check=False).stdout
    exposure = re.search(r"Overall exposure level for gpuwarden\.service: (\d+\.\d+)", security)
    assert exposure and float(exposure.group(1)) <= 4.0, security[-2000:]
    print(f"\nsystemd-analyze security on the installed unit: {exposure.group(1)}")

    # `systemctl start` returns after READY=1: the socket answers with a sample at once.
    host.run("systemctl stop gpuwarden")
    started = time.monotonic()
    host.run("systemctl start gpuwarden")
    start_s = time.monotonic() - started
    doc = host.status()
    assert doc["gpus"][0]["used_mib"] is not None
    print(f"\nsystemctl start -> active: {start_s:.2f} s")
    host.wait("llm running", lambda: host.status()["gpus"][0]["mode"] == "llm")


def test_credentials_arrive_through_load_credential(host: SystemdHost) -> None:
    # The token's content reached the service: the API accepts it, and only it.
    ok = host.run(f"{GW} status --json --url http://127.0.0.1:8787 --token {TOKEN}")
    assert json.loads(ok.stdout)["gpus"][0]["mode"] == "llm"
    bad = host.run(f"{GW} status --url http://127.0.0.1:8787 --token {'x' * 40}",
                   check=False)
    assert bad.returncode == 1 and "invalid bearer token" in bad.stderr
    unit = host.run("systemctl cat gpuwarden").stdout
    assert "LoadCredential=n8n.token:/etc/gpuwarden/credentials/n8n.token" in unit
    # The service user cannot read the credentials folder itself.
    peek = host.run("cat /etc/gpuwarden/credentials/n8n.token", user="gpuwarden", check=False)
    assert peek.returncode != 0


def test_operators_in_the_group_and_no_one_else(host: SystemdHost) -> None:
    comfyui_answers(host)
    # The installer put the CLI on everyone's PATH.
    status = host.run("gpuwarden status", user="alice")
    assert "GPU 0" in status.stdout
    switched = host.run("gpuwarden mode image", user="alice")
    assert "llm -> image" in switched.stdout
    completed = host.wait("the switch in the journal", lambda: [
        e for e in host.journal("GPUWARDEN_EVENT=mode.switch.completed")
        if e.get("TO") == "image"])
    assert completed[-1]["REQUESTED_BY"] == "cli:alice"
    refused = host.run("gpuwarden status", user="bob", check=False)
    assert refused.returncode == 5, refused  # permission denied, not "unreachable"
    assert "gpuwarden group" in refused.stderr and "Traceback" not in refused.stderr


def test_every_journalctl_query_in_the_readme_runs(host: SystemdHost) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Audit trail (journald)"):]
    block = block[block.index("```sh") + 5:block.index("```", block.index("```sh") + 5)]
    queries = [q for q in re.sub(r"\\\n\s*", "", block).splitlines()
               if q.startswith("journalctl")]
    assert len(queries) == 3
    outputs = [host.run(q).stdout for q in queries]
    # The first lists each switch with who asked, from the audit fields.
    rows = [line.split("\t") for line in outputs[0].splitlines() if line]
    assert ["cli:alice", "llm", "image"] in [row[1:] for row in rows], outputs[0]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[0]) for row in rows), rows
    # No crash loop or alert happened: the others run and find nothing.
    assert "crashloop" not in outputs[1] and "TO=alert" not in outputs[2]


def test_a_restart_in_the_middle_of_a_switch_recovers_without_overlap(
        host: SystemdHost) -> None:
    host.run(f"{GW} mode llm")
    host.run("pkill -f 'http[.]server'")  # ComfyUI's API gone: a switch to image waits for it
    pending = host.run(f"{GW} mode image --no-wait")
    assert "under way" in pending.stdout, pending.stdout
    host.wait("the switch waiting for ComfyUI", lambda: (
        host.status()["gpus"][0]["transition"] or {}).get("step") == "starting")
    host.run("systemctl restart gpuwarden")
    comfyui_answers(host)
    doc = host.wait("image, settled", lambda: (lambda d: d if d["gpus"][0]["mode"] == "image"
                    and d["gpus"][0]["transition"] is None else None)(host.status()),
                    timeout=120)
    # Exactly the image mode's workload holds VRAM: nothing of the llm mode came back.
    assert [p["workload"] for p in doc["gpus"][0]["processes"]] == ["comfyui"], doc
    assert doc["gpus"][0]["used_mib"] == 8000
    running = {w["name"]: w["state"] for w in doc["workloads"]}
    assert running == {"ollama": "stopped", "comfyui": "running"}, running
    assert host.run("pgrep -c -x sleep").stdout.strip() == "1"


def test_a_hung_sampling_path_is_restarted_by_the_watchdog(host: SystemdHost) -> None:
    def restarts() -> int:
        return int(host.run("systemctl show -p NRestarts --value gpuwarden").stdout)

    before = restarts()
    host.run(f"touch {LEDGER}/HANG")  # the simulated GPU's documented hang
    hung = time.monotonic()
    host.wait("the watchdog's restart", lambda: restarts() > before, timeout=120)
    host.run(f"rm -f {LEDGER}/HANG")
    host.wait("active again", lambda: host.active() == "active", timeout=120)
    host.wait("answering", lambda: host.run(f"{GW} status", check=False).returncode == 0)
    print(f"\nhang -> active again: {time.monotonic() - hung:.1f} s (WatchdogSec=30s)")
    log = host.run("journalctl -u gpuwarden --no-pager -n 200").stdout
    assert "Watchdog timeout" in log, log[-3000:]
    # The restarted daemon restores the recorded mode.
    host.wait("image restored", lambda: host.status()["gpus"][0]["mode"] == "image",
              timeout=60)


def test_workloads_outlive_a_stop_and_uninstall_leaves_nothing(host: SystemdHost) -> None:
    host.wait("image running", lambda: host.status()["gpus"][0]["mode"] == "image")
    host.run("systemctl stop gpuwarden")
    assert host.active() in ("inactive", "failed")
    # The process workload is a transient unit of its own, not in gpuwarden's cgroup:
    # like a container it stays up, for the next start to find.
    active = host.run("systemctl is-active gpuwarden-comfyui.service", check=False)
    assert active.stdout.strip() == "active"
    assert host.run("pgrep -c -x sleep").stdout.strip() == "1"
    host.run("/src/scripts/install.sh --uninstall --purge")
    left = host.run("ls -d /opt/gpuwarden /etc/gpuwarden /var/lib/gpuwarden "
                    "/usr/local/bin/gpuwarden /usr/local/share/man/man1/gpuwarden.1 "
                    "/etc/systemd/system/gpuwarden.service* 2>/dev/null; "
                    "getent passwd gpuwarden; getent group gpuwarden", check=False)
    assert left.stdout.strip() == "", left.stdout
    assert "could not be found" in host.run("systemctl status gpuwarden",
                                            check=False).stderr
    # Uninstalling stops what gpuwarden started.
    assert host.run("pgrep -x sleep", check=False).returncode == 1
