"""What the benchmarks share: the real daemon as a subprocess, reached over its socket."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

__all__ = ["DaemonUnderTest", "base_config", "free_port", "write_report"]


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_config(folder: Path, ledger: Path, *, default_mode: str, docker_host: str = "",
                sample_interval: float = 1.0) -> str:
    """The [daemon], [docker] and [gpu] tables of a benchmark's config (sim backend)."""
    docker = f'[docker]\nhost = "{docker_host}"\n' if docker_host else ""
    return f"""
[daemon]
state_dir = "{folder / 'state'}"
socket = "{folder / 'gw.sock'}"
socket_group = ""
default_mode = "{default_mode}"
sample_interval = {sample_interval}
{docker}
[gpu]
backend = "sim"
[gpu.sim]
ledger_dir = "{ledger}"
"""


class DaemonUnderTest:
    """`gpuwarden daemon` with the given config; `client` talks to its control socket."""

    def __init__(self, folder: Path, config_text: str, *, socket: Path | None = None) -> None:
        self.folder = folder
        self.config = folder / "config.toml"
        self.config.write_text(config_text)
        self._log = open(folder / "daemon.out", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpuwarden.cli", "daemon", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket or folder / "gw.sock")),
            base_url="http://gw", timeout=120)

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not come up; see {self.folder / 'daemon.out'}")
            time.sleep(0.1)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()

    def __enter__(self) -> DaemonUnderTest:
        self.wait_healthy()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def write_report(out: Path, name: str, report: dict[str, Any]) -> None:
    """Write `<out>/<name>.json` and print its figures (all but the raw samples)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        if key != "raw":
            print(f"{key:<36} {value}")
    print(f"JSON: {out / f'{name}.json'}")
