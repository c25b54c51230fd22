"""Shared fixtures: configs for a simulated node, the real daemon as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

PYTHON = sys.executable


def hold_argv(ledger: Path, name: str, mib: int, *extra: str) -> list[str]:
    return [PYTHON, "-m", "gpuwarden.gpu.hold", "--ledger", str(ledger), "--name", name,
            "--mib", str(mib), *extra]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_toml(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class SimNode:
    """A simulated node in a temp folder: its ledger, state and socket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ledger = root / "ledger"
        self.state_dir = root / "state"
        self.socket = root / "gw.sock"
        self.config_path = root / "config.toml"

    def tables(self, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
        tables: dict[str, dict[str, Any]] = {
            "daemon": {"sample_interval": 0.2, "state_dir": self.state_dir,
                       "socket": self.socket, "socket_group": "", "default_mode": "idle"},
            "gpu": {"backend": "sim"},
            "gpu.sim": {"total_mib": 20480, "ledger_dir": self.ledger, "release_delay": 0.15},
            "release": {"timeout": 5.0, "poll_interval": 0.05},
        }
        for name, keys in sections.items():
            tables.setdefault(name.replace("__", "."), {}).update(keys)
        return tables

    def write(self, **sections: dict[str, Any]) -> Path:
        return write_toml(self.config_path, self.tables(**sections))

    def hold(self, name: str, mib: int, *extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(hold_argv(self.ledger, name, mib, *extra),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "holding ..." once the claim is open
        assert b"holding" in line, line
        return proc

    def kill_holders(self) -> None:
        """SIGKILL every host process still holding a claim in this ledger: what a test
        left behind (a daemon killed with -9 orphans its process workloads)."""
        ledger = str(self.ledger) + os.sep
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            try:
                held = any(os.readlink(fd).startswith(ledger) for fd in fd_dir.iterdir())
            except OSError:  # gone, or not ours to read
                continue
            if held:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(fd_dir.parent.name), signal.SIGKILL)


def two_process_modes(node: SimNode, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sections for modes llm (ollama, 6000 MiB) and image (comfyui, 8000 MiB), both
    process workloads holding simulated VRAM. `extra` tables are merged in; a workload
    table that names its `kind` replaces the default one."""
    sections: dict[str, dict[str, Any]] = {
        "daemon": {"default_mode": "llm"},
        "workloads.ollama": {"kind": "process", "stop_timeout": 2,
                             "command": hold_argv(node.ledger, "ollama", 6000)},
        "workloads.comfyui": {"kind": "process", "stop_timeout": 2,
                              "command": hold_argv(node.ledger, "comfyui", 8000)},
        "modes.llm": {"workloads": ["ollama"]},
        "modes.image": {"workloads": ["comfyui"]},
    }
    for table, keys in extra.items():
        if table.startswith("workloads.") and "kind" in keys:
            sections[table] = dict(keys)
        else:
            sections.setdefault(table, {}).update(keys)
    return sections


def wait_for(condition: Any, what: str, timeout: float = 30) -> Any:
    """condition()'s first truthy value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)
    return found


def processes_naming(folder: str) -> list[Any]:
    """Live processes (not zombies, not this one) whose command line names `folder`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(folder in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind(tmp_path: Path) -> Iterator[None]:
    """A test's processes end with it: a workload, holder or daemon still running with
    the test's folder in its command line after every other fixture is torn down is
    an orphan (the daemon failed to stop a child), and fails the test."""
    yield
    folder = str(tmp_path) + os.sep
    deadline = time.monotonic() + 15  # some may be exiting right now
    while (left := processes_naming(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        described = [f"{p.pid}: {' '.join(p.info['cmdline'])}" for p in left]
        for proc in left:
            with contextlib.suppress(Exception):
                proc.kill()
        pytest.fail("processes left running after the test:\n" + "\n".join(described))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SimNode]:
    sim = SimNode(tmp_path)
    yield sim
    sim.kill_holders()


@pytest.fixture
def standin_gpu(tmp_path: Path) -> dict[str, str]:
    """The environment under which processes see the stand-in H200 (tests/gpu_standin)
    as their GPU, through `pynvml` and `torch`."""
    card = tmp_path / "card"
    card.mkdir()
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "GPUWARDEN_STANDIN_GPU": str(card),
            "PYTHONPATH": os.pathsep.join([str(root / "tests" / "gpu_standin"),
                                           str(root / "src")])}


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "gpuwarden.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


class DaemonProcess:
    """`gpuwarden daemon` as a real subprocess; its audit lines are read from stdout."""

    def __init__(self, config: Path, socket: Path, env: dict[str, str] | None = None,
                 open_files: int | None = None) -> None:
        self.config = config
        self.socket = socket
        self.log_path = config.parent / "daemon.out"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "gpuwarden.cli", "daemon", "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            # open_files: soft and hard RLIMIT_NOFILE, as a unit's LimitNOFILE= sets them
            preexec_fn=None if open_files is None else
            lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files)),
        )
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)),
                                   base_url="http://gw", timeout=30)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.output().splitlines():
            if not line.startswith("{"):
                continue
            doc = json.loads(line)
            if name is None or doc.get("event") == name:
                found.append(doc)
        return found

    def wait_event(self, name: str, timeout: float = 20, count: int = 1,
                   **match: Any) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name)
                     if all(e.get(k) == v for k, v in match.items())]
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {count}x {name} {match} within {timeout}s:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        resp = self.client.get("/v1/status")
        assert resp.status_code == 200, resp.text
        result: dict[str, Any] = resp.json()
        return result

    def wait_samples(self, count: int, timeout: float = 30) -> None:
        """Wait until the daemon has read the GPUs `count` more times: for "still only one
        event after more samples", counted in samples, not guessed in seconds."""
        seen = {self.status()["sampled_at_monotonic"]}
        deadline = time.monotonic() + timeout
        while len(seen) <= count:
            assert time.monotonic() < deadline, f"fewer than {count} samples in {timeout}s"
            time.sleep(0.02)
            seen.add(self.status()["sampled_at_monotonic"])

    def wait_mode(self, mode: str, gpu: int = 0, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status()
            g = next(x for x in doc["gpus"] if x["index"] == gpu)
            if g["mode"] == mode and g["transition"] is None:
                return doc
            if time.monotonic() >= deadline:
                raise AssertionError(f"GPU {gpu} not in {mode}: {g}")
            time.sleep(0.05)

    def wait_used(self, mib: int, gpu: int = 0, timeout: float = 30) -> dict[str, Any]:
        """Wait until a sample shows `mib` used: a process workload is started before
        its VRAM is held, and status reports the last sample."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status()
            g = next(x for x in doc["gpus"] if x["index"] == gpu)
            if g["used_mib"] == mib:
                return doc
            if time.monotonic() >= deadline:
                raise AssertionError(f"GPU {gpu} never showed {mib} MiB used: {g}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.client.close()
        self._log.close()
        return code


@pytest.fixture
def start_daemon() -> Iterator[Any]:
    started: list[DaemonProcess] = []

    def start(config: Path, socket: Path, env: dict[str, str] | None = None,
              open_files: int | None = None) -> DaemonProcess:
        daemon = DaemonProcess(config, socket, env, open_files)
        started.append(daemon)
        daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            # Gracefully, so the daemon stops its process workloads (a SIGKILL would
            # orphan them); a daemon that does not stop in time is killed.
            daemon.proc.terminate()
            try:
                daemon.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()


# -- a private Docker engine ----------------------------------------------------------

@pytest.fixture(scope="session")
def dockerd() -> Iterator[Any]:
    from .dockerd import PrivateDockerd

    engine = PrivateDockerd()
    try:
        engine.start()
        engine.import_busybox()
        yield engine
    finally:
        engine.cleanup()


class Containers:
    """Creates busybox containers holding simulated VRAM; removes them afterwards."""

    def __init__(self, engine: Any, ledger: Path) -> None:
        self.engine = engine
        self.client = engine.client()
        self.ledger = ledger
        self.names: list[str] = []

    def create(self, name: str, script: str, *, restart_policy: str = "no",
               start: bool = False) -> Any:
        from .dockerd import IMAGE

        self.ledger.mkdir(parents=True, exist_ok=True)
        policy = {"Name": restart_policy}
        container = self.client.containers.create(
            IMAGE, ["sh", "-c", script], name=name, network_mode="none",
            volumes={str(self.ledger): {"bind": "/ledger", "mode": "rw"}},
            restart_policy=policy, labels={"gpuwarden.test": "1"},
        )
        self.names.append(name)
        if start:
            container.start()
        return container

    def get(self, name: str) -> Any:
        return self.client.containers.get(name)

    def running(self, name: str) -> bool:
        c = self.get(name)
        return bool(c.attrs["State"]["Running"])

    def cleanup(self) -> None:
        for name in self.names:
            with contextlib.suppress(Exception):
                self.client.containers.get(name).remove(force=True)
        self.client.close()


@pytest.fixture
def containers(dockerd: Any, node: SimNode) -> Iterator[Containers]:
    made = Containers(dockerd, node.ledger)
    yield made
    made.cleanup()
