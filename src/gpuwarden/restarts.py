"""Restart policies for process workloads that run as gpuwarden's children.

Docker restarts a container by its restart policy, and systemd a unit by `Restart=`;
a process workload gets the same from gpuwarden: `restart_policy` (`no`, `always`,
`unless-stopped`, `on-failure[:N]`) with Docker's backoff, 100 ms doubled after each
restart, and back to 100 ms after a run of 10 s or a stop someone asked for (a switch,
the guard's block). The delay never grows past a minute, nor past what lets the
crash-loop guard see `max_restarts` + 1 crashes within its `window`: a restart policy
never outpaces the guard, which blocks a workload that keeps crashing exactly as it
blocks a container. A restart is made only into a settled mode that has the workload,
and never while the guard holds it down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from .config import Config
from .crashloop import CrashLoopGuard
from .errors import WorkloadError
from .events import EventBus, Severity
from .modes import ModeSwitcher
from .workloads.base import Workload
from .workloads.process import ProcessWorkload
from .workloads.supervisor import WorkloadSupervisor

__all__ = ["ChildRestarter"]

_FIRST_DELAY_S = 0.1
_MAX_DELAY_S = 60.0
_RESET_AFTER_S = 10.0  # a run this long resets the backoff and on-failure's count


@dataclass
class _Backoff:
    delay_s: float = _FIRST_DELAY_S
    restarts: int = 0  # since the last long run, for on-failure:N


def _wants_restart(policy: str, exit_code: int, restarts: int) -> bool:
    if policy in ("always", "unless-stopped"):
        return True
    if policy.startswith("on-failure"):
        _, _, limit = policy.partition(":")
        return exit_code != 0 and (not limit or restarts < int(limit))
    return False


class ChildRestarter:
    def __init__(self, config: Config, workloads: dict[str, Workload],
                 supervisor: WorkloadSupervisor, switcher: ModeSwitcher,
                 guard: CrashLoopGuard, bus: EventBus) -> None:
        self._config = config
        self._workloads = workloads
        self._supervisor = supervisor
        self._switcher = switcher
        self._guard = guard
        self._bus = bus
        self._backoff: dict[str, _Backoff] = {}
        self._restarted: dict[str, int | None] = {}  # the pid this restarter started
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def reconfigure(self, config: Config) -> None:
        self._config = config

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hear each child's exit (from its waiter thread) on `loop`, from now on and
        for children a reload adds (call `attach` again after one)."""
        self._loop = loop
        for workload in self._workloads.values():
            if isinstance(workload, ProcessWorkload):
                workload.on_exit = self._exited_in_thread

    def _exited_in_thread(self, name: str, pid: int, exit_code: int, requested: bool,
                          ran_s: float) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._exited, name, pid, exit_code, requested,
                                            ran_s)

    def _exited(self, name: str, pid: int, exit_code: int, requested: bool,
                ran_s: float) -> None:
        workload = self._workloads.get(name)
        if requested or workload is None:
            self._backoff.pop(name, None)  # a stop someone asked for ends the sequence
            return
        if self._restarted.pop(name, None) != pid:
            # Started by a switch, an unblock or a person: a new sequence.
            self._backoff.pop(name, None)
        self._guard.observe(name, "die", time.time(), exit_code)
        backoff = self._backoff.setdefault(name, _Backoff())
        if ran_s >= _RESET_AFTER_S:
            backoff.delay_s, backoff.restarts = _FIRST_DELAY_S, 0
        if not _wants_restart(workload.config.restart_policy, exit_code, backoff.restarts):
            return
        max_restarts, window = self._guard.limits(name)
        delay = min(backoff.delay_s, window / (max_restarts + 1))
        backoff.delay_s = min(backoff.delay_s * 2, _MAX_DELAY_S)
        backoff.restarts += 1
        self._spawn(self._restart(name, delay))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        gpu = self._config.gpu_of_workload(name)
        while gpu is not None and self._switcher.switching(gpu):
            await asyncio.sleep(0.25)  # the switch owns the GPU's workloads until it ends
        async with self._supervisor.lock(name):
            # Checked under the lock: a block, a switch or a stop may have come meanwhile.
            if gpu is None or self._guard.holds_down(name) or \
                    self._switcher.switching(gpu) or \
                    name not in self._switcher.allowed_on(gpu) or \
                    (await self._supervisor.status(name)).running:
                return
            try:
                status = await self._supervisor.start_locked(name)
                self._restarted[name] = status.pid
            except WorkloadError as exc:
                self._bus.publish("workload.refused", f"{name}: restart by its policy "
                                  f"failed: {exc}", severity=Severity.ERROR, workload=name,
                                  gpu=gpu, requested_by="restart policy")
                return
        self._bus.publish("workload.started", f"{name} restarted by its restart policy "
                          f"({self._workloads[name].config.restart_policy}) after "
                          f"{delay:.1f} s", workload=name, gpu=gpu,
                          requested_by="restart policy", delay_s=round(delay, 3))
        self._guard.observe(name, "start", time.time())

    async def close(self) -> None:
        self._loop = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
