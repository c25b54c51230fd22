"""Crash-loop guard: Docker events and unit changes -> restart windows -> block, and
unblock by a person.

Docker's restart policy never gives up, nor does systemd's `Restart=always`, and a
crashing GPU workload that restarts allocates VRAM before the last instance
released it. A Docker-driven restart shows as `die` then `start` (not `restart`); a
stop someone asked for shows a `kill` first. So an exit with no `kill` before it
(or an `oom`) is a crash, and a `start` after a crash is a restart. A unit's crash
is its entering `auto-restart` (or `failed`), told apart by systemd itself
(`UnitLifecycle`). When a workload has already been restarted `max_restarts` times
within `window` and crashes again, the guard blocks it before the restart comes
(Docker's backoff starts at 100 ms, as does systemd's `RestartSec=`): for Docker,
restart policy `no` and stopped; for a unit, stopped (which cancels the pending
restart) and masked for this boot. The block is persisted and `crashloop.blocked`
raised. It stays down until a person unblocks it, which is refused while the GPU
holds memory nobody accounts for.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .docker_events import ContainerEvent
from .errors import ConflictError, NotFoundError, WorkloadError
from .events import EventBus, Severity
from .modes import ModeSwitcher, ReleaseVerifier, Sampler
from .state import Block, State, StateStore
from .watchdog import top_holders
from .workloads.base import Workload
from .workloads.docker import DockerWorkload
from .workloads.supervisor import WorkloadSupervisor
from .workloads.systemd import SystemdWorkload

__all__ = ["CrashLoopGuard"]

# A `die` within this long after a `kill` was asked for, not a crash.
_KILL_GRACE_S = 60.0


@dataclass
class _History:
    crashes: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=64))
    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    killed_at: float | None = None
    crashed_last: bool = False


class CrashLoopGuard:
    def __init__(self, config: Config, workloads: dict[str, Workload],
                 supervisor: WorkloadSupervisor, state: State, store: StateStore,
                 bus: EventBus, sampler: Sampler, switcher: ModeSwitcher) -> None:
        self._config = config
        self._workloads = workloads
        self._supervisor = supervisor
        self._state = state
        self._store = store
        self._bus = bus
        self._sampler = sampler
        self._switcher = switcher
        self._verifier = ReleaseVerifier(config.release.tolerance_mib)
        self._history: dict[str, _History] = {}
        self._blocking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config (the workloads dict is shared, and changed in place)."""
        self._config = config

    def limits(self, name: str) -> tuple[int, float]:
        wl = self._workloads[name].config
        return (wl.crashloop_max_restarts or self._config.crashloop.max_restarts,
                wl.crashloop_window or self._config.crashloop.window)

    def is_blocked(self, name: str) -> bool:
        return name in self._state.blocks

    def holds_down(self, name: str) -> bool:
        """Blocked, or being blocked now: nothing may start it."""
        return name in self._state.blocks or name in self._blocking

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_event(self, event: ContainerEvent) -> None:
        """Feed one container event (on the loop; Docker calls are spawned)."""
        name = next((n for n, w in self._workloads.items()
                     if isinstance(w, DockerWorkload) and w.config.container == event.name),
                    None)
        if name is not None:
            self.observe(name, event.action, event.time_ns / 1e9,
                         event.attributes.get("exitCode"))

    def observe(self, name: str, action: str, now: float, exit_code: object = None,
                **fields: Any) -> None:
        """Feed one lifecycle event of workload `name`: "kill"/"stop" (asked for),
        "die"/"oom" (an exit), "start" (on the loop; the block is spawned)."""
        history = self._history.setdefault(name, _History())
        if action in ("kill", "stop"):
            history.killed_at = now
            return
        if action in ("die", "oom"):
            requested = history.killed_at is not None and now - history.killed_at < _KILL_GRACE_S
            if action == "die":
                history.killed_at = None
            if requested and action == "die":
                history.crashed_last = False
                return
            if action == "die" and history.crashed_last and history.crashes and \
                    history.crashes[-1]["kind"] == "oom" and now - history.crashes[-1]["at"] < 5:
                return  # the die that follows an oom is the same crash
            history.crashes.append({"at": now, "kind": action, "exit_code": exit_code,
                                    **fields})
            history.crashed_last = True
            self._bus.publish(
                "workload.crashed",
                f"{name} " + ("was killed for lack of memory (oom)" if action == "oom"
                              else f"exited on its own (exit code {exit_code})"),
                severity=Severity.ERROR, workload=name, gpu=self._config.gpu_of_workload(name),
                exit_code=exit_code, kind=action, **fields,
            )
            max_restarts, window = self.limits(name)
            if self._recent(history.restarts, now, window) >= max_restarts:
                # The next restart would be one too many: block before Docker makes it.
                self._trigger(name, history, now)
            return
        if action == "start":
            if self.is_blocked(name) and name not in self._blocking:
                self._spawn(self._stop_blocked(name))
                return
            if history.crashed_last:
                history.restarts.append(now)
                history.crashed_last = False
                max_restarts, window = self.limits(name)
                if self._recent(history.restarts, now, window) > max_restarts:
                    self._trigger(name, history, now)

    @staticmethod
    def _recent(times: deque[float], now: float, window: float) -> int:
        return sum(1 for t in times if now - t <= window)

    def _trigger(self, name: str, history: _History, now: float) -> None:
        if self.is_blocked(name) or name in self._blocking:
            return
        self._blocking.add(name)
        _, window = self.limits(name)
        crashes = [c for c in history.crashes if now - c["at"] <= window]
        restarts = [t for t in history.restarts if now - t <= window]
        self._spawn(self._block(name, crashes, restarts))

    async def _block(self, name: str, crashes: list[dict[str, Any]],
                     restarts: list[float]) -> None:
        workload = self._workloads[name]
        t0 = time.monotonic()
        errors: list[str] = []
        try:
            try:
                # First what keeps the restart from coming, then the rest.
                if isinstance(workload, DockerWorkload):
                    await asyncio.to_thread(workload.set_restart_policy, "no")
                elif isinstance(workload, SystemdWorkload):
                    await asyncio.to_thread(workload.hold_down)
            except WorkloadError as exc:
                errors.append(str(exc))
            policy_s = time.monotonic() - t0
            policy_no_at = time.time()
            max_restarts, window = self.limits(name)
            self._state.blocks[name] = Block(
                workload=name, blocked_at=time.time(),
                reason=f"{len(restarts)} restarts after crashes within {window:.0f} s "
                       f"(limit {max_restarts})",
                details={"crashes": crashes, "restarts": restarts},
            )
            await self._store.save_async(self._state)
            try:
                status = await self._supervisor.stop(
                    name, by="crash-loop guard",
                    reason=f"{len(restarts)} restarts within {window:.0f} s")
            except WorkloadError as exc:
                errors.append(str(exc))
                status = await asyncio.to_thread(workload.status)
            masked = False
            if isinstance(workload, SystemdWorkload):
                try:
                    await asyncio.to_thread(workload.set_masked, True)
                    masked = True
                except WorkloadError as exc:
                    errors.append(str(exc))
            held = (f"stopped, {workload.unit} masked for this boot" if masked else "stopped")\
                if isinstance(workload, SystemdWorkload) else \
                "restart policy set to no, stopped" if isinstance(workload, DockerWorkload) \
                else "its restarts held, stopped"
            figures = await self._figures(name)
            self._bus.publish(
                "crashloop.blocked",
                f"{name} crash-looped ({len(restarts)} restarts, {len(crashes)} crashes within "
                f"{window:.0f} s): {held}, blocked until unblocked",
                severity=Severity.CRITICAL, workload=name,
                gpu=self._config.gpu_of_workload(name),
                crash_times=[c["at"] for c in crashes],
                exit_codes=[c["exit_code"] for c in crashes],
                crash_kinds=[c["kind"] for c in crashes],
                restarts=len(restarts), max_restarts=max_restarts, window_s=window,
                # A unit's own count, as its last crash showed it (a stopped unit is
                # unloaded, and a reloaded one counts from 0).
                restart_count=crashes[-1].get("n_restarts", status.restart_count)
                if crashes else status.restart_count, policy_set_s=round(policy_s, 4),
                policy_no_at=policy_no_at, masked=masked,
                errors=errors, **figures,
            )
        finally:
            self._blocking.discard(name)

    async def _stop_blocked(self, name: str) -> None:
        self._bus.publish("mode.violation", f"{name} is blocked after a crash loop but started;"
                          " stopping it", severity=Severity.WARNING, workload=name,
                          gpu=self._config.gpu_of_workload(name), source="crashloop guard")
        try:
            await self._supervisor.stop(name, by="crash-loop guard",
                                        reason="blocked, but started")
        except WorkloadError as exc:
            self._bus.publish("mode.violation", f"could not stop blocked {name}: {exc}",
                              severity=Severity.ERROR, workload=name, error=str(exc))

    async def _figures(self, name: str) -> dict[str, Any]:
        gpu = self._config.gpu_of_workload(name) or 0
        sample = await asyncio.to_thread(self._sampler)
        reading = sample.node.gpu(gpu)
        if reading is None or not reading.ok:
            return {"vram": None}
        return {"used_mib": reading.used_mib, "total_mib": reading.total_mib,
                "used_fraction": round(reading.used_fraction, 4),
                "leaked_mib": max(0, reading.used_mib - sum(p.used_mib or 0
                                                            for p in reading.processes)),
                "holders": top_holders(sample, reading)}

    async def unblock(self, name: str, requested_by: str) -> dict[str, Any]:
        """Lift a block once the GPU is proven clear; start it if its mode is active.

        Raises:
            NotFoundError: no such workload.
            ConflictError: it is not blocked, or the GPU holds memory nobody accounts
                for (the figures and holders are in the error's detail).
            WorkloadError: its restart policy or unit mask could not be restored (the
                block stays).
        """
        if name not in self._workloads:
            raise NotFoundError(f"unknown workload {name!r} "
                                f"(workloads: {', '.join(sorted(self._workloads))})",
                                {"workload": name})
        if not self.is_blocked(name):
            raise ConflictError(f"workload {name!r} is not blocked", {"workload": name})
        gpu = self._config.gpu_of_workload(name) or 0
        sample = await asyncio.to_thread(self._sampler)
        verdict = self._verifier.check(sample, gpu, {name})
        if not verdict.clear:
            raise ConflictError(
                f"refusing to unblock {name}: GPU {gpu} is not clear ({verdict.reason})",
                {"workload": name, "gpu": gpu, "used_mib": verdict.used_mib,
                 "allowed_mib": verdict.allowed_mib, "holders": verdict.holders},
            )
        workload = self._workloads[name]
        # A WorkloadError here (the container gone, systemd refusing) leaves the block.
        if isinstance(workload, DockerWorkload):
            await asyncio.to_thread(workload.set_restart_policy, workload.config.restart_policy)
        elif isinstance(workload, SystemdWorkload):
            await asyncio.to_thread(workload.set_masked, False)
        block = self._state.blocks.pop(name)
        await self._store.save_async(self._state)
        self._history.pop(name, None)
        # Started only into a settled mode: a running switch owns its GPU's workloads.
        started = not self._switcher.switching(gpu) and name in self._switcher.allowed_on(gpu)
        self._bus.publish(
            "crashloop.unblocked",
            f"{name} unblocked by {requested_by}"
            + ("; its mode is active, starting it" if started else ""),
            requested_by=requested_by, workload=name, gpu=gpu, used_mib=verdict.used_mib,
            blocked_since=block.blocked_at,
        )
        if started:
            _, error = await self._switcher.start_workloads([name], requested_by, gpu,
                                                            "unblock")
            if error is not None:
                return {"ok": True, "workload": name, "started": False, "error": error}
        return {"ok": True, "workload": name, "started": started}

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
