"""A systemd unit as a workload (`kind = "systemd"`): Ollama's own `ollama.service`.

Start, stop and state go through systemd's manager over D-Bus (`SystemdBus`).
Its processes are attributed by the unit's cgroup. Crashes come from the unit's
`ActiveState`/`SubState` and `NRestarts` changes, as signals (`UnitLifecycle`
turns them into the crash-loop guard's "die" and "start"). A crash-loop block
stops the unit and masks it for this boot. gpuwarden's user may start only the
units its polkit rule names, so the mask is done by a root oneshot it may start,
`gpuwarden-mask@<unit>.service` (scripts/install.sh installs both; the oneshot's
comments say where the mask goes and why).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import WorkloadConfig
from ..errors import WorkloadError
from ..gpu.attribution import OwnerIndex
from ..systemd_dbus import SystemdBus, SystemdBusError, escape_instance
from .base import WorkloadState, WorkloadStatus

__all__ = ["SystemdWorkload", "UnitLifecycle", "UnitWorkload", "mask_unit_of", "unit_status"]

_CLD_EXITED, _CLD_KILLED, _CLD_DUMPED = 1, 2, 3
# A unit's Result= after an end it did not ask for. "timeout" (a stop that took too
# long) and "success" are stops, not crashes.
_CRASH_RESULTS = frozenset({"exit-code", "signal", "core-dump", "oom-kill", "watchdog"})


def mask_unit_of(unit: str, verb: Literal["mask", "unmask"]) -> str:
    """The root oneshot that runs `systemctl VERB --runtime UNIT`."""
    return f"gpuwarden-{verb}@{escape_instance(unit)}.service"


def _seconds(usec: object) -> float | None:
    return usec / 1e6 if isinstance(usec, int) and usec > 0 else None


def _exit_code(props: dict[str, Any]) -> int | None:
    """The main process's end: its exit status, or minus the signal that killed it."""
    code, status = props.get("ExecMainCode"), props.get("ExecMainStatus")
    if not isinstance(status, int) or code not in (_CLD_EXITED, _CLD_KILLED, _CLD_DUMPED):
        return None
    return status if code == _CLD_EXITED else -status


def unit_status(unit: str, props: dict[str, Any]) -> WorkloadStatus:
    """A WorkloadStatus from a unit's Unit and Service properties."""
    load, active = props.get("LoadState"), str(props.get("ActiveState", ""))
    sub, result = str(props.get("SubState", "")), str(props.get("Result", ""))
    if load == "not-found":
        return WorkloadStatus(WorkloadState.MISSING, f"no unit named {unit!r}")
    running = active in ("active", "reloading")
    detail = f"{active} ({sub})"
    if load == "masked":
        detail += ", masked"
    if not running and result and result != "success":
        detail += f", result {result}"
    pid = props.get("MainPID")
    return WorkloadStatus(
        WorkloadState.RUNNING if running else WorkloadState.STOPPED, detail,
        pid=pid if isinstance(pid, int) and pid > 0 else None,
        exit_code=None if running else _exit_code(props),
        restart_policy=props.get("Restart"),
        restart_count=props.get("NRestarts"),
        oom_killed=not running and result == "oom-kill",
        started_at=_seconds(props.get("ActiveEnterTimestamp")),
        finished_at=None if running else _seconds(props.get("InactiveEnterTimestamp")),
    )


class UnitWorkload:
    """What a unit workload and a transient one share: state, stop and error messages
    over the manager's D-Bus API. Subclasses say how it starts."""

    kind: str

    def __init__(self, name: str, config: WorkloadConfig, unit: str, *, bus: SystemdBus,
                 owners: OwnerIndex) -> None:
        self.name = name
        self.config = config
        self.unit = unit
        self._bus = bus
        owners.set_unit(name, unit)

    def status(self) -> WorkloadStatus:
        try:
            props = self._bus.properties(self.unit)
        except SystemdBusError as exc:
            return WorkloadStatus(WorkloadState.UNKNOWN, f"systemd unreachable: {exc}")
        return self._status_of(props)

    def _status_of(self, props: dict[str, Any]) -> WorkloadStatus:
        return unit_status(self.unit, props)

    def _fail(self, what: str, exc: SystemdBusError) -> WorkloadError:
        hint = ""
        if exc.access_denied:
            hint = (" (gpuwarden's polkit rule does not allow it: run scripts/install.sh "
                    "again after adding or renaming a workload)")
        elif exc.name == "org.freedesktop.systemd1.UnitMasked":
            hint = " (masked: a crash-loop block masks it until `gpuwarden unblock`)"
        return WorkloadError(f"workload {self.name!r}: {what} {self.unit} failed: {exc}{hint}")

    def _started(self, result: str) -> WorkloadStatus:
        status = self.status()
        if result != "done" or not status.running:
            raise WorkloadError(
                f"workload {self.name!r}: {self.unit} did not start (job {result}, "
                f"{status.detail}); see journalctl -u {self.unit}")
        return status

    def stop(self, grace: float | None = None) -> WorkloadStatus:
        """StopUnit, waited for `grace` (default `stop_timeout`; the unit's own
        TimeoutStopSec= may SIGKILL sooner); then SIGKILL to the whole cgroup."""
        grace = self.config.stop_timeout if grace is None else grace
        try:
            result = self._bus.stop_unit(self.unit, grace)
            if result == "pending":
                self._bus.kill_unit(self.unit, signal.SIGKILL)
                self._wait_down(10.0)
        except SystemdBusError as exc:
            if not exc.no_such_unit:  # not loaded: not running, nothing to stop
                raise self._fail("stop of", exc) from exc
        status = self.status()
        if status.running or status.state is WorkloadState.UNKNOWN:
            raise WorkloadError(f"workload {self.name!r}: {self.unit} still running after "
                                f"stop ({status.detail})")
        return status

    def _wait_down(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            props = self._bus.properties(self.unit, ("org.freedesktop.systemd1.Unit",))
            if props.get("ActiveState") in ("inactive", "failed"):
                return
            time.sleep(0.05)

    def close(self) -> None:
        """The bus is shared and closed by the daemon; the unit outlives it."""


class SystemdWorkload(UnitWorkload):
    kind = "systemd"

    def __init__(self, name: str, config: WorkloadConfig, *, bus: SystemdBus,
                 owners: OwnerIndex) -> None:
        if not config.unit:
            raise ValueError(f"workload {name!r} has no unit")
        super().__init__(name, config, config.unit, bus=bus, owners=owners)

    def start(self) -> WorkloadStatus:
        try:
            result = self._bus.start_unit(self.unit, self.config.ready_timeout)
        except SystemdBusError as exc:
            raise self._fail("start of", exc) from exc
        return self._started(result)

    def hold_down(self) -> None:
        """Queue a stop without waiting: it cancels a restart `Restart=` has pending
        (the crash-loop guard's first move; the stop and mask follow)."""
        try:
            self._bus.stop_unit(self.unit, 0)
        except SystemdBusError as exc:
            raise self._fail("stop of", exc) from exc

    def set_masked(self, masked: bool) -> None:
        """Mask (for this boot) or unmask the unit, through the root oneshot."""
        helper = mask_unit_of(self.unit, "mask" if masked else "unmask")
        try:
            result = self._bus.start_unit(helper, 30.0)
        except SystemdBusError as exc:
            raise self._fail(f"{'mask' if masked else 'unmask'} ({helper}) of", exc) from exc
        if result != "done":
            raise WorkloadError(f"workload {self.name!r}: {helper} ended with {result}; "
                                f"see journalctl -u {helper}")


@dataclass
class UnitLifecycle:
    """A unit's property changes, as the crash-loop guard's events.

    A crash is the unit entering `auto-restart` (its `Restart=` will bring it back)
    or `failed` with a crash's result, once per exit; a start is it becoming
    `active`. A stop someone asked for (gpuwarden or `systemctl stop`) ends in
    `inactive` with result `success` and is neither.
    """

    unit: str
    props: dict[str, Any] = field(default_factory=dict)
    crashed: bool = False  # an exit already reported, until the next start

    def update(self, changed: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Feed one PropertiesChanged; returns the ("die" | "start", details) it means."""
        before = self.props.get("ActiveState"), self.props.get("SubState")
        self.props.update(changed)
        after = self.props.get("ActiveState"), self.props.get("SubState")
        if after == before:
            return []
        details = {"exit_code": _exit_code(self.props), "result": self.props.get("Result"),
                   "exited_at": _seconds(self.props.get("ExecMainExitTimestamp")),
                   "n_restarts": self.props.get("NRestarts"), "sub_state": after[1]}
        if after[1] == "auto-restart" or (after[0] == "failed"
                                          and self.props.get("Result") in _CRASH_RESULTS):
            if self.crashed:
                return []  # the failed that follows an auto-restart's give-up
            self.crashed = True
            return [("die", details)]
        if after[0] == "active" and before[0] != "active":
            self.crashed = False
            return [("start", details)]
        return []
