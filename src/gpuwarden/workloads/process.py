"""A command gpuwarden starts itself, in its own session and process group.

For bare-metal ComfyUI from a venv and for the GPU acceptance run. Stopped with
SIGTERM to the whole group, then SIGKILL after `stop_timeout`. Output goes to
`<state_dir>/logs/<name>.log`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from ..config import WorkloadConfig
from ..errors import WorkloadError
from ..gpu.attribution import OwnerIndex
from .base import WorkloadState, WorkloadStatus

__all__ = ["ProcessWorkload"]


class ProcessWorkload:
    kind = "process"

    def __init__(
        self, name: str, config: WorkloadConfig, *, log_dir: Path, owners: OwnerIndex
    ) -> None:
        if not config.command:
            raise ValueError(f"workload {name!r} has no command")
        self.name = name
        self.config = config
        self._log_dir = log_dir
        self._owners = owners
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_requested = False
        self._started_at: float | None = None
        self._exited_at: float | None = None  # when an exit was first seen
        self._lock = threading.Lock()

    def status(self) -> WorkloadStatus:
        proc = self._proc
        if proc is None:
            return WorkloadStatus(WorkloadState.STOPPED, "never started")
        code = proc.poll()
        if code is None:
            return WorkloadStatus(WorkloadState.RUNNING, pid=proc.pid,
                                  started_at=self._started_at)
        if self._exited_at is None:
            self._exited_at = time.time()  # within one sample of the exit
        return WorkloadStatus(
            WorkloadState.STOPPED, f"exited with status {code}", exit_code=code,
            crashed=not self._stop_requested, started_at=self._started_at,
            finished_at=self._exited_at,
        )

    def start(self) -> WorkloadStatus:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self.status()
            self._log_dir.mkdir(parents=True, exist_ok=True)
            self._stop_requested = False
            self._exited_at = None
            env = {**os.environ, **self.config.env}
            argv = list(self.config.command or ())
            with open(self._log_dir / f"{self.name}.log", "ab") as log:
                try:
                    self._proc = subprocess.Popen(
                        argv,
                        cwd=self.config.cwd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                except OSError as exc:
                    raise WorkloadError(
                        f"workload {self.name!r}: cannot run {argv[0]!r}: {exc.strerror or exc}"
                    ) from exc
            self._started_at = time.time()
            self._owners.set_root(self.name, self._proc.pid)
            return self.status()

    def stop(self) -> WorkloadStatus:
        with self._lock:
            proc = self._proc
            if proc is None:
                return self.status()
            self._stop_requested = True
            self._signal_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_timeout
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.config.stop_timeout)
            # The whole group gets its grace, not only the leader: a wrapper script dies
            # at once on SIGTERM while the process it started is still shutting down.
            self._wait_group_gone(proc.pid, max(0.0, deadline - time.monotonic()))
            # Whatever is left of the group gets the SIGKILL either way.
            self._signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired as exc:
                raise WorkloadError(
                    f"workload {self.name!r} (pid {proc.pid}) survived SIGKILL for 10 s"
                ) from exc
            self._wait_group_gone(proc.pid)
            if self._exited_at is None:
                self._exited_at = time.time()
            return self.status()

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.01)

    def close(self) -> None:
        """Nothing held beyond the child itself, which `stop` ends."""
