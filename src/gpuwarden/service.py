"""The one facade every front end (CLI socket, HTTP API, Discord) calls.

Front ends never reach Docker or NVML themselves: they ask the service, so a switch
from Discord, from n8n and from the CLI is checked and audited the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from .config import IDLE_MODE, Config
from .crashloop import CrashLoopGuard
from .errors import ConflictError, NotFoundError
from .events import Event, EventBus, Severity
from .gpu.attribution import AttributedSample, OwnerIndex
from .gpu.backend import GpuBackend
from .metrics import Metrics
from .modes import ModeSwitcher, SwitchResult
from .state import State
from .watchdog import Watchdog
from .workloads.base import Workload, WorkloadState, WorkloadStatus
from .workloads.process import ProcessWorkload
from .workloads.release import QueueUnreadable, comfyui_queue, comfyui_queue_size
from .workloads.supervisor import WorkloadSupervisor, describe_stop

__all__ = ["ProxyView", "Service"]


@dataclass(frozen=True)
class ProxyView:
    """What a demand proxy needs to know of its workload's GPU, read in one go."""

    gpu: int
    mode: str  # the GPU's mode now ("idle" when none)
    mode_since: float | None  # Unix time it became active
    switching_to: str | None  # the mode a switch under way heads for
    running: bool  # the workload runs (as last sampled)


class Service:
    """Status, mode switches and events, for every front end alike."""

    def __init__(
        self,
        config: Config,
        backend: GpuBackend,
        owners: OwnerIndex,
        workloads: dict[str, Workload],
        state: State,
        bus: EventBus,
        watchdog: Watchdog,
    ) -> None:
        self.config = config
        self.bus = bus
        self._backend = backend
        self.owners = owners  # which processes are whose, for workloads a reload adds
        self._workloads = workloads
        self._state = state
        self._watchdog = watchdog
        self.switcher: ModeSwitcher | None = None
        self.supervisor: WorkloadSupervisor | None = None
        self.crashloop: CrashLoopGuard | None = None
        self.metrics: Metrics | None = None
        # Extra status sections from other parts (e.g. "discord": the bot's state).
        self.status_sections: dict[str, Callable[[], dict[str, Any] | list[dict[str, Any]]]] = {}
        self._snapshot: AttributedSample | None = None
        self._statuses: dict[str, WorkloadStatus] = {}
        self._started_at = time.time()
        self.http: httpx.AsyncClient | None = None  # the daemon's, for ComfyUI queues
        # The active mode's lease on a GPU, if any (set by the daemon: the mode guard).
        self.lease_of: Callable[[int], dict[str, Any] | None] = lambda gpu: None
        # Read the config again and apply what can change live (set by the daemon).
        self.reload: Callable[[str], Awaitable[dict[str, Any]]] | None = None
        # Each GPU's VRAM over the last minutes, for the node page's chart: (Unix
        # seconds, used MiB, total MiB) per sample, ten minutes' worth.
        self._history: dict[int, deque[tuple[float, int, int]]] = {}
        self._history_len = max(60, min(3600, int(600 / config.daemon.sample_interval)))
        # Each running ComfyUI's jobs as last read (read_queues), for status.
        self._jobs: dict[str, dict[str, Any]] = {}

    # -- sampling (called by the daemon's scheduler) ---------------------------

    def sample_blocking(self) -> AttributedSample:
        """One GPU read with its processes attributed (blocking: run in a thread)."""
        return self.owners.attribute(self._backend.sample())

    def _observe_blocking(self) -> tuple[AttributedSample, dict[str, WorkloadStatus]]:
        sample = self.sample_blocking()
        statuses = {name: w.status() for name, w in self._workloads.items()}
        return sample, statuses

    def _report_crashes(self, statuses: dict[str, WorkloadStatus]) -> None:
        """`workload.crashed` once for a workload that stopped without being asked."""
        for name, now in statuses.items():
            before = self._statuses.get(name)
            # A child's exit is told as it happens, by its restart policy's watcher.
            if isinstance(self._workloads.get(name), ProcessWorkload):
                continue
            if before is not None and before.running and not now.running and now.crashed:
                self.bus.publish(
                    "workload.crashed", f"{name} ended on its own ({now.detail})",
                    severity=Severity.ERROR, workload=name,
                    gpu=self.config.gpu_of_workload(name), exit_code=now.exit_code,
                )

    async def refresh(self) -> None:
        """Re-read the node and the workloads now (after a switch), without judging it:
        the watchdog sees the next regular sample, so no tier change is lost."""
        self._snapshot, self._statuses = await asyncio.to_thread(self._observe_blocking)

    async def tick(self) -> list[int]:
        """Sample the node, refresh workload states, and let the watchdog judge it.

        Returns the GPUs that just escalated to critical (for protective actions).
        """
        sample, statuses = await asyncio.to_thread(self._observe_blocking)
        self._report_crashes(statuses)
        self._snapshot, self._statuses = sample, statuses
        for reading in sample.node.gpus:
            if reading.ok:
                self._history.setdefault(reading.index, deque(maxlen=self._history_len))\
                    .append((round(sample.node.taken_at_wall, 2), reading.used_mib,
                             reading.total_mib))
        running: dict[int, set[str]] = {}
        for name, status in statuses.items():
            gpu = self.config.gpu_of_workload(name)
            if status.running and gpu is not None:
                running.setdefault(gpu, set()).add(name)
        switcher = self.switcher
        quiet = {g for g in self.config.gpu_indices() if switcher and switcher.switching(g)}
        critical = self._watchdog.observe(sample, running, quiet)
        if self.metrics is not None:
            self.metrics.observe(
                sample,
                tiers={g.index: self._watchdog.tier(g.index).label for g in sample.node.gpus},
                modes={g: self._state.gpu(g).mode for g in self.config.gpu_indices()},
                modes_on_gpu={g: self.config.modes_on_gpu(g) for g in self.config.gpu_indices()},
                statuses={n: (w.kind, statuses[n]) for n, w in self._workloads.items()},
                blocked=set(self._state.blocks),
            )
        return critical

    @property
    def watchdog(self) -> Watchdog:
        return self._watchdog

    @property
    def workload_statuses(self) -> dict[str, WorkloadStatus]:
        return dict(self._statuses)

    # -- queries ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The status document (README, "The CLI"): GPUs, tiers, modes, workloads, blocks."""
        sample = self._snapshot
        gpus: list[dict[str, Any]] = []
        if sample is not None:
            for gpu in sample.node.gpus:
                gpus.append(self._gpu_status(sample, gpu.index))
        switcher = self.switcher
        workloads = []
        for name, workload in self._workloads.items():
            st = self._statuses.get(name, WorkloadStatus(WorkloadState.UNKNOWN, "not sampled"))
            block = self._state.blocks.get(name)
            record = self.supervisor.last_stop(name) if self.supervisor else None
            stopped = None if st.state is WorkloadState.UNKNOWN else describe_stop(
                st, record, None if block is None else block.reason,
                None if block is None else block.blocked_at)
            workloads.append({
                "name": name,
                "kind": workload.kind,
                "state": st.state.value,
                "detail": st.detail,
                "pid": st.pid,
                "exit_code": st.exit_code,
                "stopped": stopped,
                "blocked": block is not None,
                "block": None if block is None else {"since": block.blocked_at,
                                                     "reason": block.reason},
                "gpu": self.config.gpu_of_workload(name),
                "priority": workload.config.priority,
                "jobs": self._jobs.get(name) if st.running else None,
            })
        modes = {
            name: {"workloads": list(mode.workloads), "gpu": mode.gpu, "lease_s": mode.lease}
            for name, mode in self.config.all_modes().items()
        }
        doc: dict[str, Any] = {
            "backend": self._backend.name,
            # Unix seconds, like every other time in the document; the monotonic clock
            # of the daemon's host is kept for telling samples apart.
            "sampled_at": None if sample is None else round(sample.node.taken_at_wall, 3),
            "sampled_at_monotonic": None if sample is None else sample.node.taken_at,
            "fault": None if sample is None or sample.node.fault is None else {
                "fault": str(sample.node.fault), "detail": sample.node.fault_detail},
            "gpus": gpus,
            "workloads": workloads,
            "modes": modes,
            "daemon": {"started_at": self._started_at,
                       "switching": switcher is not None and any(
                           switcher.transition_of(g) for g in self.config.gpu_indices())},
        }
        for section, provider in self.status_sections.items():
            doc[section] = provider()
        doc["last_alert"] = self._last_alert()
        return doc

    def _gpu_status(self, sample: AttributedSample, index: int) -> dict[str, Any]:
        gpu = sample.node.gpu(index)
        assert gpu is not None
        switcher = self.switcher
        st = self._state.gpu(index)
        transition = switcher.transition_of(index) if switcher else None
        processes = []
        for proc in sorted(gpu.processes, key=lambda p: p.used_bytes or 0, reverse=True):
            owner = sample.owners.get(proc.pid)
            processes.append({
                "pid": proc.pid,
                "used_mib": proc.used_mib,
                "workload": owner.workload if owner else None,
                "command": owner.command if owner else "",
                "visible": owner.visible if owner else False,
            })
        return {
            "index": gpu.index,
            "uuid": gpu.uuid,
            "name": gpu.name,
            "total_mib": gpu.total_mib,
            "used_mib": gpu.used_mib,
            "free_mib": gpu.free_mib,
            "reserved_mib": gpu.reserved_bytes // (1024 * 1024),
            "used_fraction": round(gpu.used_fraction, 4),
            "tier": self._watchdog.tier(index).label,
            "fault": None if gpu.ok else {"fault": str(gpu.fault), "detail": gpu.fault_detail},
            "utilization_pct": gpu.util_gpu_pct,
            "temperature_c": gpu.temp_c,
            "power_w": gpu.power_w,
            "mode": st.mode,
            "mode_since": st.mode_since,
            "last_switch": self._last_switch(index),
            "lease": self.lease_of(index),
            "transition": None if transition is None else {
                "id": transition.id, "from": transition.from_mode, "to": transition.to_mode,
                "step": transition.step, "requested_by": transition.requested_by,
                "started_at": transition.started_at},
            "last_failure": st.failure,
            "processes": processes,
        }

    def vram_history(self) -> dict[int, list[tuple[float, int, int]]]:
        """Each GPU's samples over the last ten minutes: (Unix s, used MiB, total MiB)."""
        return {gpu: list(samples) for gpu, samples in self._history.items()}

    def open_alerts(self) -> list[dict[str, Any]]:
        """Every alert (warning and above) whose resolution has not come, newest first:
        the last event of each alert group in the event ring, unless it resolves it."""
        latest: dict[str, Event] = {}
        for event in self.bus.since(0, 1_000_000):
            group = event.fields.get("group_key")
            if isinstance(group, str) and group:
                latest[group] = event
        return sorted((e.to_dict() for e in latest.values()
                       if not e.fields.get("resolved") and e.severity >= Severity.WARNING),
                      key=lambda doc: -doc["id"])

    def _last_alert(self) -> dict[str, Any] | None:
        """The last alert at error or critical (a tier, a leak, a crash loop, a GPU or
        receiver failing...), with `resolved_at` once its resolution came."""
        alert = self.bus.last(lambda e: e.severity >= Severity.ERROR
                              and bool(e.fields.get("group_key"))
                              and not e.fields.get("resolved"))
        if alert is None:
            return None
        group = alert.fields["group_key"]
        latest = self.bus.last(lambda e: e.fields.get("group_key") == group)
        resolved = latest is not None and latest.id > alert.id and \
            bool(latest.fields.get("resolved"))
        return {**alert.to_dict(), "resolved_at": latest.time if resolved and latest else None}

    def _last_switch(self, gpu: int) -> dict[str, Any] | None:
        """The last completed switch on `gpu` this daemon made: when, from, to, by whom,
        how long (None before the first, or once it left the event ring)."""
        event = self.bus.last(lambda e: e.name == "mode.switch.completed"
                              and e.fields.get("gpu") == gpu)
        if event is None:
            return None
        timings = event.fields.get("timings") or {}
        return {"at": event.time, "from": event.fields.get("from"),
                "to": event.fields.get("to"), "requested_by": event.requested_by,
                "total_s": timings.get("total_s") if isinstance(timings, dict) else None,
                "timings": timings if isinstance(timings, dict) else {},
                "transition_id": event.fields.get("transition_id")}

    def modes(self) -> dict[str, Any]:
        """Each GPU's mode and the modes it may take."""
        gpus = []
        for index in self.config.gpu_indices():
            st = self._state.gpu(index)
            tr = self.switcher.transition_of(index) if self.switcher else None
            gpus.append({
                "gpu": index,
                "mode": st.mode,
                "transition": None if tr is None else {"id": tr.id, "to": tr.to_mode,
                                                       "step": tr.step},
                "last_failure": st.failure,
                "modes": sorted(self.config.modes_on_gpu(index)),
            })
        return {"gpus": gpus, "idle": IDLE_MODE}

    def switch_state(self, transition_id: str) -> dict[str, Any]:
        """A switch by id: under way (`done: false`, its step) or its result.

        Raises:
            NotFoundError: no such switch (unknown, or too old to be kept).
        """
        found = self.switcher.switch_state(transition_id) if self.switcher else None
        if found is None:
            raise NotFoundError(f"no switch with id {transition_id!r} (unknown, or finished "
                                "too long ago)", {"id": transition_id})
        return found

    def events_since(self, event_id: int, limit: int = 500) -> list[Event]:
        return self.bus.since(event_id, limit)

    def last_event_id(self) -> int:
        return self.bus.last_id()

    async def wait_for_events(self, after_id: int, timeout: float) -> bool:
        """Wait (at most `timeout`) for an event after `after_id`; False once the
        daemon is stopping and followers should let go."""
        await self.bus.wait_after(after_id, timeout)
        return not self.bus.streams_closed

    def proxy_view(self, workload: str) -> ProxyView:
        """The state of `workload`'s GPU as its demand proxy sees it."""
        gpu = self.config.gpu_of_workload(workload)
        assert gpu is not None, "a proxied workload is in a mode (checked with the config)"
        st = self._state.gpu(gpu)
        transition = self.switcher.transition_of(gpu) if self.switcher else None
        status = self._statuses.get(workload)
        return ProxyView(
            gpu=gpu, mode=st.mode or IDLE_MODE, mode_since=st.mode_since,
            switching_to=None if transition is None else transition.to_mode,
            running=status is not None and status.running,
        )

    def workload_names(self, mode: str) -> tuple[str, ...]:
        """The workloads of `mode` (none for a mode the config no longer has, such as
        one a state file from an older config names)."""
        found = self.config.all_modes().get(mode)
        return tuple(found.workloads) if found is not None else ()

    def block_of(self, workload: str) -> str | None:
        """Why `workload` is blocked after a crash loop (None: it is not)."""
        block = self._state.blocks.get(workload)
        return None if block is None else block.reason

    async def read_queues(self, timeout: float = 2.0) -> None:
        """Read each running ComfyUI's queue, for status: its running and queued jobs,
        or why the queue cannot be read."""
        for name, workload in self._workloads.items():
            config, status = workload.config, self._statuses.get(name)
            if config.release != "comfyui" or not config.url or self.http is None or \
                    status is None or not status.running:
                self._jobs.pop(name, None)
                continue
            try:
                running, pending = await comfyui_queue(self.http, config.url.rstrip("/"),
                                                       timeout)
            except QueueUnreadable as exc:
                self._jobs[name] = {"running": None, "pending": None, "error": str(exc)}
            else:
                self._jobs[name] = {"running": running, "pending": pending, "error": None}

    async def queued_jobs(self, workload: str, timeout: float) -> int:
        """ComfyUI's running plus pending jobs (0 for a workload without a queue).

        Raises:
            QueueUnreadable: the queue did not answer within `timeout`, or not as a queue.
        """
        config = self._workloads[workload].config
        if config.release != "comfyui" or not config.url or self.http is None:
            return 0
        return await comfyui_queue_size(self.http, config.url.rstrip("/"), timeout)

    # -- actions ---------------------------------------------------------------

    async def unblock(self, workload: str, *, requested_by: str) -> dict[str, Any]:
        """Lift a crash-loop block (see CrashLoopGuard.unblock for what it refuses)."""
        if workload not in self._workloads:
            raise NotFoundError(f"unknown workload {workload!r} "
                                f"(workloads: {', '.join(sorted(self._workloads))})",
                                {"workload": workload})
        if self.crashloop is None:
            raise ConflictError(f"workload {workload!r} is not blocked (only Docker and "
                                "systemd workloads restart on their own)",
                                {"workload": workload})
        result = await self.crashloop.unblock(workload, requested_by)
        await self.refresh()
        return result

    async def switch_mode(
        self, mode: str, *, gpu: int | None = None, requested_by: str, force: bool = False,
        wait: bool = True, cause: dict[str, Any] | None = None,
    ) -> SwitchResult:
        """Switch a GPU's mode (see ModeSwitcher.switch for what it refuses and why).
        `cause`: what made a front end ask (the demand proxy's request), audited with
        the switch's events."""
        assert self.switcher is not None, "the daemon wires the switcher before serving"
        # The switcher refreshes the figures before it gives out a result, so a status
        # read right after shows the new mode's.
        return await self.switcher.switch(
            mode, gpu=gpu, requested_by=requested_by, force=force, wait=wait, cause=cause
        )
