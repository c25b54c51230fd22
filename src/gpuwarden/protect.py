"""Protective actions at critical: free VRAM before the card hits its ceiling.

Taken in the configured order, once per escalation to critical, each reported as a
`vram.protect` event with what it did and what it freed. The defaults only ask
Ollama and ComfyUI to let go of memory; stopping a workload happens only when
`stop_lowest_priority` is configured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from .config import Config
from .events import EventBus, Severity
from .modes import Sampler
from .workloads.base import Workload, WorkloadStatus
from .workloads.release import graceful_release
from .workloads.supervisor import WorkloadSupervisor

__all__ = ["ProtectiveActions"]


class ProtectiveActions:
    def __init__(self, config: Config, workloads: dict[str, Workload],
                 supervisor: WorkloadSupervisor, bus: EventBus, http: httpx.AsyncClient,
                 sampler: Sampler, statuses: Callable[[], dict[str, WorkloadStatus]]) -> None:
        self._config = config
        self._workloads = workloads
        self._supervisor = supervisor
        self._bus = bus
        self._http = http
        self._sampler = sampler
        self._statuses = statuses
        self._running: set[int] = set()

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config (the workloads dict is shared, and changed in place)."""
        self._config = config

    def _used_mib(self, gpu: int) -> int | None:
        reading = self._sampler().node.gpu(gpu)
        return reading.used_mib if reading is not None and reading.ok else None

    async def run(self, gpu: int) -> None:
        """Take the configured actions on `gpu` until it is below critical again."""
        if gpu in self._running:
            return
        self._running.add(gpu)
        try:
            for action in self._config.watchdog.protect_actions:
                if not await self._critical(gpu):
                    break
                await self._take(action, gpu)
        finally:
            self._running.discard(gpu)

    async def _critical(self, gpu: int) -> bool:
        reading = (await asyncio.to_thread(self._sampler)).node.gpu(gpu)
        if reading is None or not reading.ok:
            return False
        return reading.used_fraction >= self._config.thresholds.critical

    def _running_on(self, gpu: int) -> list[str]:
        statuses = self._statuses()
        return [n for n, w in self._workloads.items()
                if self._config.gpu_of_workload(n) == gpu and n in statuses
                and statuses[n].running]

    async def _take(self, action: str, gpu: int) -> None:
        before = await asyncio.to_thread(self._used_mib, gpu)
        did: list[str] = []
        errors: list[str] = []
        targets: list[str] = []
        running = self._running_on(gpu)
        if action in ("ollama_unload", "comfyui_free"):
            kind = "ollama" if action == "ollama_unload" else "comfyui"
            targets = [n for n in running if self._workloads[n].config.release == kind]
            for name in targets:
                report = await graceful_release(self._http, name, self._workloads[name].config,
                                                force=False)
                did.extend(report.actions)
                errors.extend(report.errors)
        elif action == "stop_lowest_priority" and running:
            victim = min(running, key=lambda n: self._workloads[n].config.priority)
            targets = [victim]
            try:
                await self._supervisor.stop(victim, by="protective action",
                                            reason=f"GPU {gpu} critical",
                                            requested_by="watchdog")
                did.append(f"stopped {victim} (priority "
                           f"{self._workloads[victim].config.priority})")
            except Exception as exc:
                errors.append(f"stop {victim}: {exc}")
        after = await self._settle(gpu, before) if did else before
        freed = None if before is None or after is None else before - after
        self._bus.publish(
            "vram.protect",
            f"GPU {gpu} critical: {action}: "
            + ("; ".join(did) if did else "nothing to do") + (
                f"; freed {freed} MiB" if freed is not None and did else ""),
            severity=Severity.WARNING if did else Severity.INFO, gpu=gpu, action=action,
            workloads=targets, did=did, errors=errors, used_before_mib=before,
            used_after_mib=after, freed_mib=freed, requested_by="watchdog",
        )

    async def _settle(self, gpu: int, before: int | None) -> int | None:
        """Wait up to `protect_settle` for the memory to come down; the last reading."""
        deadline = time.monotonic() + self._config.watchdog.protect_settle
        after = before
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            after = await asyncio.to_thread(self._used_mib, gpu)
            if before is not None and after is not None and after < before:
                # Keep polling briefly: a release may come in steps.
                await asyncio.sleep(0.3)
                return await asyncio.to_thread(self._used_mib, gpu)
        return after
