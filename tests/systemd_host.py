"""A real systemd (PID 1) in a container of the private Docker engine, for the tests
that install gpuwarden as a service (test_systemd_host.py, test_systemd_units.py).

The root filesystem (Debian bookworm with systemd, D-Bus, polkit and Python) is built
once by scripts/systemd-image.sh and cached outside the clone; gpuwarden's wheels
come from a wheelhouse built here, since the container has no network. Resource
directives (MemoryMax= and the like) are not enforced in a container with a private
cgroup namespace; nothing here relies on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "gpuwarden"
IMAGE = "gpuwarden-test/systemd:bookworm"
GW = "/opt/gpuwarden/venv/bin/gpuwarden"


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


@contextlib.contextmanager
def systemd_host(docker_host: str, workdir: Path) -> Iterator[SystemdHost]:
    """A fresh container whose PID 1 is systemd, with this checkout at /src and the
    wheelhouse at /wheels; removed afterwards."""
    tarball = subprocess.run([str(ROOT / "scripts" / "systemd-image.sh")], check=True,
                             capture_output=True, text=True, timeout=1800).stdout.strip()
    docker = ["docker", "-H", docker_host]
    images = subprocess.run([*docker, "images", "-q", IMAGE], capture_output=True,
                            text=True, check=True).stdout.strip()
    if not images:
        subprocess.run(f"zstd -dc {shlex.quote(tarball)} | {' '.join(docker)} import "
                       f"-c 'CMD [\"/usr/local/sbin/init-rshared\"]' - {IMAGE}",
                       shell=True, check=True, capture_output=True, timeout=600)
    src = source_copy(workdir / "src")
    wheels = wheelhouse()
    name = f"gw-systemd-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [*docker, "run", "-d", "--name", name, "--network", "none", "--cap-add", "SYS_ADMIN",
         "--cgroupns=private", "--tmpfs", "/run", "--tmpfs", "/run/lock",
         "--stop-signal", "SIGRTMIN+3", "-v", f"{src}:/src", "-v", f"{wheels}:/wheels:ro",
         IMAGE, "/usr/local/sbin/init-rshared"], check=True, capture_output=True, timeout=300)
    machine = SystemdHost(docker_host, name)
    try:
        machine.wait("systemd up", lambda: machine.run(
            "systemctl is-system-running --wait", check=False, timeout=120
        ).stdout.strip() in ("running", "degraded"), timeout=120)
        yield machine
    finally:
        subprocess.run([*docker, "rm", "-f", name], capture_output=True, timeout=120)
