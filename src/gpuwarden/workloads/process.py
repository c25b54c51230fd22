"""A command gpuwarden starts: bare-metal ComfyUI from a venv, the GPU acceptance run.

Two runners, chosen by `[daemon] process_runner`:
- `ProcessWorkload`, a child in its own session and process group (the demo,
  development, any host without systemd). Stopped with SIGTERM to the whole group,
  then SIGKILL after `stop_timeout`; so is what is left of the group when the child
  ends on its own (a crash). Output goes to `<state_dir>/logs/<name>.log`.
- `TransientUnitWorkload`, a transient systemd unit (gpuwarden run as a service), so
  the command is outside gpuwarden's sandbox and cgroup and survives its restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from dbus_fast import Variant

from ..config import WorkloadConfig
from ..errors import WorkloadError
from ..gpu.attribution import OwnerIndex
from ..systemd_dbus import SystemdBus, SystemdBusError, escape_instance
from .base import WorkloadState, WorkloadStatus
from .systemd import UnitWorkload, unit_status

__all__ = ["ProcessWorkload", "TransientUnitWorkload", "transient_unit_of"]

log = logging.getLogger(__name__)


class ProcessWorkload:
    kind = "process"

    def __init__(
        self, name: str, config: WorkloadConfig, *, log_dir: Path, owners: OwnerIndex,
        record_dir: Path | None = None,
    ) -> None:
        """`record_dir`: where the running child's pid and start time are kept, so that
        a daemon killed without stopping it (SIGKILL, a crash) finds it at its next
        start (`stop_orphan`)."""
        if not config.command:
            raise ValueError(f"workload {name!r} has no command")
        self.name = name
        self.config = config
        self._log_dir = log_dir
        self._record = None if record_dir is None else record_dir / f"{name}.json"
        self._owners = owners
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_requested = False
        self._started_at: float | None = None
        self._exited_at: float | None = None  # when an exit was first seen
        self._lock = threading.Lock()
        # Told of each exit, from a thread: (name, pid, exit code, whether a stop asked
        # for it, seconds it ran). Set by the restart policy (restarts.ChildRestarter).
        self.on_exit: Callable[[str, int, int, bool, float], None] | None = None

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
            WorkloadState.STOPPED, _ended(code), exit_code=code,
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
                        user=self.config.user,
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
            self._write_record(self._proc.pid, argv)
            threading.Thread(target=self._wait_exit, args=(self._proc, time.monotonic()),
                             name=f"wait-{self.name}", daemon=True).start()
            return self.status()

    def _wait_exit(self, proc: subprocess.Popen[bytes], started: float) -> None:
        code = proc.wait()
        if self._exited_at is None and proc is self._proc:
            self._exited_at = time.time()
        if not self._stop_requested:
            self._end_leftovers(proc.pid)
        callback = self.on_exit
        if callback is not None and proc is self._proc:
            callback(self.name, proc.pid, code, self._stop_requested,
                     time.monotonic() - started)

    @property
    def log_path(self) -> Path:
        return self._log_dir / f"{self.name}.log"

    def last_output(self, lines: int = 3, limit: int = 4096) -> str:
        """The last lines of its output (its log), for an error that says why."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - limit))
                tail = log.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in tail[-lines:] if line.strip())

    def _write_record(self, pid: int, argv: list[str]) -> None:
        if self._record is None:
            return
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # gone already: nothing to find again
        self._record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "create_time": created, "argv": argv}))
        os.replace(tmp, self._record)

    def _drop_record(self) -> None:
        if self._record is not None:
            with contextlib.suppress(FileNotFoundError):
                self._record.unlink()

    def stop_orphan(self) -> str | None:
        """Stop this workload's process left running by an earlier daemon that did not
        stop it (killed with SIGKILL, crashed): the pid it recorded, if that process is
        still the one it started (same start time and command). Its whole process group
        gets SIGTERM, then SIGKILL after stop_timeout. Returns what was stopped, or None.
        Call before anything starts this workload."""
        if self._record is None or not self._record.exists():
            return None
        try:
            doc = json.loads(self._record.read_text())
            pid, created = int(doc["pid"]), float(doc["create_time"])
            proc = psutil.Process(pid)
            same = abs(proc.create_time() - created) < 0.05 and \
                proc.cmdline() == list(doc["argv"]) and \
                proc.status() != psutil.STATUS_ZOMBIE
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            same = False  # gone, reused, or unreadable: nothing of ours is left
        if not same:
            self._drop_record()
            return None
        what = f"pid {pid} ({' '.join(doc['argv'])[:120]})"
        self._signal_group(pid, signal.SIGTERM)
        self._wait_group_gone(pid, self.config.stop_timeout)
        self._signal_group(pid, signal.SIGKILL)
        self._wait_group_gone(pid, 10.0)
        self._drop_record()
        return what

    def stop(self, grace: float | None = None) -> WorkloadStatus:
        grace = self.config.stop_timeout if grace is None else grace
        with self._lock:
            proc = self._proc
            if proc is None:
                return self.status()
            self._stop_requested = True
            self._signal_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
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
            self._drop_record()
            return self.status()

    def _end_leftovers(self, pgid: int) -> None:
        """What a process that crashed or was killed started lives on in its process
        group (a model runner holding VRAM, as Ollama's does): ended as systemd ends a
        unit's leftovers, SIGTERM then SIGKILL after stop_timeout, before the restart
        policy or a switch may start the workload again. (Its group id cannot be
        another's while a process of the group is alive.)"""
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return  # nothing left
        log.warning("workload %s: its process %d ended, but processes it started still "
                    "run in its group: stopping them", self.name, pgid)
        self._signal_group(pgid, signal.SIGTERM)
        self._wait_group_gone(pgid, self.config.stop_timeout)
        self._signal_group(pgid, signal.SIGKILL)
        self._wait_group_gone(pgid, 10.0)

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


def _ended(code: int) -> str:
    """'exited with status 3', or 'killed by SIGKILL' (Popen's negative codes)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class TransientUnitWorkload(UnitWorkload):
    """A process workload under systemd: a transient unit, `gpuwarden-NAME.service`.

    Started through `StartTransientUnit` as `systemd-run` does, so the command runs in
    a cgroup of its own, as its configured user, with none of gpuwarden's sandbox
    (no MemoryDenyWriteExecute=, syscall filter or ProtectHome=). It outlives the
    daemon, which finds it again by name after a restart. Its output goes to the
    journal (`journalctl -u gpuwarden-NAME`).
    """

    kind = "process"

    def __init__(self, name: str, config: WorkloadConfig, *, bus: SystemdBus,
                 owners: OwnerIndex) -> None:
        if not config.command:
            raise ValueError(f"workload {name!r} has no command")
        super().__init__(name, config, transient_unit_of(name), bus=bus, owners=owners)
        self._stop_requested = False
        self._lock = threading.Lock()

    def _status_of(self, props: dict[str, Any]) -> WorkloadStatus:
        status = unit_status(self.unit, props)
        if status.state is WorkloadState.MISSING:
            # A transient unit that ended well is unloaded at once; a failed one stays.
            return WorkloadStatus(WorkloadState.STOPPED, "not running")
        if status.running:
            return status
        return dataclasses.replace(status, crashed=not self._stop_requested)

    def _properties(self) -> list[tuple[str, Variant]]:
        cfg = self.config
        argv = list(cfg.command or ())
        path = argv[0] if os.path.isabs(argv[0]) else shutil.which(
            argv[0], path=cfg.env.get("PATH", os.environ.get("PATH")))
        if path is None:
            raise WorkloadError(f"workload {self.name!r}: {argv[0]!r} is not on PATH; "
                                "give its absolute path in command")
        user = cfg.user or pwd.getpwuid(os.getuid()).pw_name  # never root by default
        props: list[tuple[str, Variant]] = [
            ("Description", Variant("s", f"gpuwarden workload {self.name}")),
            ("Type", Variant("s", "exec")),  # the start job fails if exec fails
            ("ExecStart", Variant("a(sasb)", [[path, argv, False]])),
            ("User", Variant("s", user)),
            ("SyslogIdentifier", Variant("s", self.name)),
            # systemd itself sends SIGKILL this long after SIGTERM.
            ("TimeoutStopUSec", Variant("t", int(cfg.stop_timeout * 1_000_000))),
        ]
        if cfg.cwd is not None:
            props.append(("WorkingDirectory", Variant("s", str(cfg.cwd))))
        if cfg.env:
            props.append(("Environment", Variant("as", [f"{k}={v}"
                                                        for k, v in cfg.env.items()])))
        return props

    def start(self) -> WorkloadStatus:
        with self._lock:
            try:
                props = self._bus.properties(self.unit)
                if props.get("ActiveState") == "active":
                    return self._status_of(props)  # found again after a daemon restart
                self._stop_requested = False
                if props.get("ActiveState") == "failed":
                    self._bus.reset_failed(self.unit)  # a failed unit keeps its name taken
                result = self._bus.start_transient(self.unit, self._properties(), 30.0)
            except SystemdBusError as exc:
                raise self._fail("start of", exc) from exc
            return self._started(result)

    def stop(self, grace: float | None = None) -> WorkloadStatus:
        with self._lock:
            self._stop_requested = True
            return super().stop(grace)


def transient_unit_of(workload: str) -> str:
    """The transient unit a process workload runs as under systemd."""
    return f"gpuwarden-{escape_instance(workload)}.service"
