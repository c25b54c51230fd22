"""Only what the switcher allows runs on a GPU, and leases run out.

A container of a mode that is not active and starts anyway (by hand, by a restart
policy, by compose) is killed at once with a `mode.violation` event: it holds VRAM
the active mode counts on, so it gets no graceful stop (`stop_timeout`). Docker's event
stream makes this immediate; the periodic check catches anything the stream missed
(the engine restarting, a process workload).

The guard never decides on its own what may run: it asks the switcher
(`allowed_on`), which during a switch answers with what that switch owns. It decides
and stops while holding the workload's lock, so its stop and a start by the
switcher cannot interleave.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx

from .config import IDLE_MODE, Config
from .errors import RefusedError
from .events import EventBus, Severity
from .modes import ModeSwitcher
from .state import State
from .workloads.base import Workload, WorkloadStatus
from .workloads.release import QueueUnreadable, comfyui_queue_size
from .workloads.supervisor import WorkloadSupervisor

__all__ = ["ModeGuard"]

log = logging.getLogger(__name__)

# How many times the guard stops a workload that is started again while it stops it.
_STOP_ATTEMPTS = 3
# How often a lease whose workload still has jobs queued is looked at again.
_LEASE_RECHECK_S = 10.0


class ModeGuard:
    def __init__(self, config: Config, switcher: ModeSwitcher, workloads: dict[str, Workload],
                 supervisor: WorkloadSupervisor, state: State, bus: EventBus,
                 http: httpx.AsyncClient) -> None:
        self._config = config
        self._state = state
        self._switcher = switcher
        self._workloads = workloads
        self._supervisor = supervisor
        self._bus = bus
        self._http = http
        self._stopping: set[str] = set()
        self._seen_again: set[str] = set()  # started again while being stopped
        self._lease_checked: dict[int, float] = {}
        # When demand last used a mode (the demand proxies and the router), for leases.
        self.last_used: Callable[[str], float | None] | None = None
        # The demand before this daemon started is unknown: its start counts as a use,
        # so a restart (even after kill -9) never ends a lease its clients were using.
        self._started = time.time()
        self._tasks: set[asyncio.Task[None]] = set()

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config (the workloads dict is shared, and changed in place)."""
        self._config = config

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Stopping a container takes seconds: never inside the sampling job.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def workload_of_container(self, container_name: str) -> str | None:
        return next((name for name, w in self._workloads.items()
                     if w.config.container == container_name), None)

    def violates(self, name: str) -> str | None:
        """Why `name` may not run now, or None when it may."""
        if name in self._state.blocks:
            return "it is blocked after a crash loop"
        gpu = self._config.gpu_of_workload(name)
        if gpu is None:
            return None  # in no mode: not gpuwarden's to police
        if name not in self._switcher.allowed_on(gpu):
            tr = self._switcher.transition_of(gpu)
            if self._switcher.switching(gpu) and tr is not None:
                return f"GPU {gpu} is switching {tr.from_mode} -> {tr.to_mode}"
            return f"mode {self._switcher.mode_of(gpu)!r} is active on GPU {gpu}"
        return None

    async def on_started(self, name: str, source: str) -> None:
        """A workload was seen starting (Docker event or periodic check)."""
        reason = self.violates(name)
        if reason is None:
            return
        if name in self._stopping:
            self._seen_again.add(name)  # looked at again once this stop is over
            return
        self._stopping.add(name)
        try:
            async with self._supervisor.lock(name):
                # Look again, under the lock: the start may belong to a switch that
                # began meanwhile, and no start can slip in until the stop is done.
                status: WorkloadStatus = await self._supervisor.status(name)
                reason = self.violates(name)
                if reason is None or not status.running:
                    return
                gpu = self._config.gpu_of_workload(name)
                self._bus.publish(
                    "mode.violation",
                    f"{name} started outside its mode ({reason}); stopping it",
                    severity=Severity.WARNING, workload=name, gpu=gpu,
                    mode=self._switcher.mode_of(gpu or 0), source=source,
                )
                for attempt in range(_STOP_ATTEMPTS):
                    try:
                        # Killed, not stopped gracefully: it holds VRAM the active mode
                        # counts on, and runs no work of that mode's a grace could save.
                        await self._supervisor.stop_locked(name, by="mode guard",
                                                           reason=reason, grace=0.0,
                                                           before=status)
                        break
                    except Exception as exc:
                        # Started again while it was being stopped (a restart policy, a
                        # person): that start is stopped too, its event having found
                        # this stop under way.
                        again = await self._supervisor.status(name)
                        if again.running and attempt + 1 < _STOP_ATTEMPTS and \
                                again.started_at != status.started_at:
                            status = again
                            continue
                        self._bus.publish("mode.violation", f"could not stop {name}: {exc}",
                                          severity=Severity.ERROR, workload=name,
                                          error=str(exc))
                        break
        finally:
            self._stopping.discard(name)
            if name in self._seen_again:
                self._seen_again.discard(name)
                self.spawn(self.on_started(name, source))

    def check(self, statuses: dict[str, WorkloadStatus]) -> None:
        """The periodic sweep: stray workloads, then leases (both in the background)."""
        for name, status in statuses.items():
            if status.running and name not in self._stopping and \
                    self.violates(name) is not None:
                self.spawn(self.on_started(name, "periodic check"))
        self.spawn(self._check_leases())

    def lease_of(self, gpu: int) -> dict[str, Any] | None:
        """The lease of the mode active on `gpu`, if it has one and is not switching:
        how long it has been without demand, and how long until it is given back."""
        mode = self._switcher.mode_of(gpu)
        modes = self._config.all_modes()
        if mode is None or mode == self._config.daemon.default_mode or mode not in modes:
            return None
        lease = modes[mode].lease
        since = self._switcher.mode_since(gpu)
        if lease is None or since is None or self._switcher.switching(gpu):
            return None
        # Idle since the switch, the daemon's start, or the last demand it served (a
        # request in flight through a proxy or the router counts as now).
        used = self.last_used(mode) if self.last_used is not None else None
        idle = max(0.0, time.time() - max(since, self._started, used or 0.0))
        return {"mode": mode, "lease_s": lease, "idle_s": round(idle, 1),
                "ends_in_s": round(max(0.0, lease - idle), 1)}

    async def _check_leases(self) -> None:
        default = self._config.daemon.default_mode
        modes = self._config.all_modes()
        for gpu in self._config.gpu_indices():
            lease_now = self.lease_of(gpu)
            if lease_now is None:
                continue
            mode, lease, held = lease_now["mode"], lease_now["lease_s"], lease_now["idle_s"]
            if held < lease:
                continue
            now = time.monotonic()
            if now - self._lease_checked.get(gpu, 0.0) < _LEASE_RECHECK_S:
                continue
            self._lease_checked[gpu] = now
            try:
                jobs = await self._queued_jobs(modes[mode].workloads)
            except QueueUnreadable as exc:
                log.info("lease of %s on GPU %d ran out but the queue is unreadable (%s)",
                         mode, gpu, exc)
                continue
            if jobs:
                log.info("lease of %s on GPU %d ran out but %d job(s) are queued", mode, gpu,
                         jobs)
                continue
            # The default mode may live on another GPU: then this one goes idle.
            target = default if default == IDLE_MODE or modes[default].gpu == gpu else IDLE_MODE
            self._bus.publish(
                "mode.lease.expired",
                f"GPU {gpu}: lease of {mode} ran out: idle for "
                + (f"{held:.0f} s" if held < 120 else f"{held / 60:.0f} min")
                + f" with no demand and no job queued; back to {target}",
                gpu=gpu, mode=mode, lease_s=lease, held_s=round(held, 1),
                requested_by="lease",
            )
            try:
                await self._switcher.switch(target, gpu=gpu, requested_by="lease",
                                            wait=False)
            except RefusedError as exc:  # audited by the switcher (mode.switch.refused)
                log.info("lease return of GPU %d to %s refused: %s", gpu, target, exc)

    async def _queued_jobs(self, names: list[str]) -> int:
        total = 0
        for name in names:
            wl = self._workloads[name].config
            if wl.release == "comfyui" and wl.url:
                total += await comfyui_queue_size(self._http, wl.url.rstrip("/"),
                                                  self._config.release.queue_timeout)
        return total
