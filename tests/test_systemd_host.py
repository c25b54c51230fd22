"""gpuwarden on a real systemd: PID 1 in a container of the private Docker engine,
installed with scripts/install.sh as a user would, on the simulated GPU with
process workloads.

The root filesystem (Debian bookworm with systemd, D-Bus, polkit and Python) is built
once by scripts/systemd-image.sh and cached outside the clone; gpuwarden's wheels
come from a wheelhouse built here, since the container has no network. Resource
directives (MemoryMax= and the like) are not enforced in a container with a private
cgroup namespace; nothing here relies on them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "gpuwarden"
IMAGE = "gpuwarden-test/systemd:bookworm"
GW = "/opt/gpuwarden/venv/bin/gpuwarden"
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


def wheelhouse() -> Path:
    """gpuwarden's dependencies and build backend as wheels, cached by pyproject.toml."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    folder = CACHE / f"wheels-{key}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir",
                        str(folder), str(ROOT), "setuptools>=77", "wheel"], check=True,
                       timeout=900)
        (folder / ".complete").touch()
    return folder


def source_copy(into: Path) -> Path:
    """The checkout as install.sh reads it, without build outputs or the venv."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".mypy_cache", ".ruff_cache", "out")
    shutil.copytree(ROOT, into, ignore=ignore)
    return into


class SystemdHost:
    """A container whose PID 1 is systemd; commands run in it with `run`."""

    def __init__(self, docker_host: str, name: str) -> None:
        self.docker = ["docker", "-H", docker_host]
        self.name = name

    def run(self, command: str, *, user: str | None = None, check: bool = True,
            timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [*self.docker, "exec", *(["-i"] if stdin is not None else []),
                "-e", "LANG=C.UTF-8", self.name]
        if user is not None:
            argv += ["runuser", "-u", user, "--"]
        argv += ["/bin/sh", "-c", command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                input=stdin)
        if check and result.returncode != 0:
            raise AssertionError(f"{command!r} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run(f"mkdir -p {shlex.quote(str(Path(path).parent))} && "
                 f"cat > {shlex.quote(path)} && chmod {mode} {shlex.quote(path)}", stdin=text)

    def journal(self, *match: str) -> list[dict[str, Any]]:
        out = self.run(f"journalctl -u gpuwarden -o json {' '.join(match)}", check=False)
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def wait(self, what: str, predicate: Any, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}\n"
                                     + self.run("journalctl -u gpuwarden -n 60 --no-pager",
                                                check=False).stdout)
            time.sleep(0.2)

    def active(self) -> str:
        return self.run("systemctl is-active gpuwarden", check=False).stdout.strip()

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.run(f"{GW} status --json").stdout)
        return doc


@pytest.fixture(scope="module")
def host(dockerd: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdHost]:
    tarball = subprocess.run([str(ROOT / "scripts" / "systemd-image.sh")], check=True,
                             capture_output=True, text=True, timeout=1800).stdout.strip()
    docker = ["docker", "-H", dockerd.host]
    images = subprocess.run([*docker, "images", "-q", IMAGE], capture_output=True,
                            text=True, check=True).stdout.strip()
    if not images:
        subprocess.run(f"zstd -dc {shlex.quote(tarball)} | {' '.join(docker)} import "
                       f"-c 'CMD [\"/usr/local/sbin/init-rshared\"]' - {IMAGE}",
                       shell=True, check=True, capture_output=True, timeout=600)
    src = source_copy(tmp_path_factory.mktemp("systemd") / "src")
    wheels = wheelhouse()
    name = f"gw-systemd-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [*docker, "run", "-d", "--name", name, "--network", "none", "--cap-add", "SYS_ADMIN",
         "--cgroupns=private", "--tmpfs", "/run", "--tmpfs", "/run/lock",
         "--stop-signal", "SIGRTMIN+3", "-v", f"{src}:/src", "-v", f"{wheels}:/wheels:ro",
         IMAGE, "/usr/local/sbin/init-rshared"], check=True, capture_output=True, timeout=300)
    machine = SystemdHost(dockerd.host, name)
    try:
        machine.wait("systemd up", lambda: machine.run(
            "systemctl is-system-running --wait", check=False, timeout=120
        ).stdout.strip() in ("running", "degraded"), timeout=120)
        yield machine
    finally:
        subprocess.run([*docker, "rm", "-f", name], capture_output=True, timeout=120)


def comfyui_answers(host: SystemdHost) -> None:
    """A stand-in for ComfyUI's API on 8189: /system_stats answers, /queue is empty."""
    host.run("mkdir -p /srv/comfy && echo '{}' > /srv/comfy/system_stats && "
             "echo '{\"queue_running\": [], \"queue_pending\": []}' > /srv/comfy/queue")
    subprocess.run([*host.docker, "exec", "-d", host.name, "python3", "-m", "http.server",
                    "8189", "--bind", "127.0.0.1", "--directory", "/srv/comfy"],
                   check=True, capture_output=True, timeout=60)


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
    assert refused.returncode == 3, refused
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


def test_stop_stops_the_workloads_and_uninstall_leaves_nothing(host: SystemdHost) -> None:
    host.wait("image running", lambda: host.status()["gpus"][0]["mode"] == "image")
    host.run("systemctl stop gpuwarden")
    assert host.active() in ("inactive", "failed")
    assert host.run("pgrep -x sleep", check=False).returncode == 1
    # gpuwarden stopped its workload itself, after saying it was stopping, and
    # before it exited (not systemd's final SIGKILL).
    events = [(e.get("GPUWARDEN_EVENT"), e.get("WORKLOAD")) for e in host.journal("-n", "30")
              if e.get("GPUWARDEN_EVENT")]
    last = events[max(i for i, e in enumerate(events) if e[0] == "daemon.stopping"):]
    assert ("workload.stopped", "comfyui") in last, events
    host.run("/src/scripts/install.sh --uninstall --purge")
    left = host.run("ls -d /opt/gpuwarden /etc/gpuwarden /var/lib/gpuwarden "
                    "/usr/local/bin/gpuwarden "
                    "/etc/systemd/system/gpuwarden.service* 2>/dev/null; "
                    "getent passwd gpuwarden; getent group gpuwarden", check=False)
    assert left.stdout.strip() == "", left.stdout
    assert "could not be found" in host.run("systemctl status gpuwarden",
                                            check=False).stderr
