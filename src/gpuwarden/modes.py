"""The mode switcher: plan, release, stop, verify the VRAM came back, start.

A GPU mode is a named set of workloads that may hold a GPU; modes on one GPU exclude
each other. A switch records itself in the state file before acting, asks the
workloads to release VRAM gracefully, stops them, and *proves* through the GPU
backend that their memory is free before it starts anything. When it cannot prove
that within `release.timeout` it fails closed: nothing is started and the GPU is
left in `idle` with the failure in status.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .config import IDLE_MODE, Config
from .errors import ConflictError, NotFoundError, RefusedError, WorkloadError
from .events import EventBus, Severity
from .gpu.attribution import AttributedSample
from .state import State, StateStore, Transition
from .workloads.base import Workload, WorkloadStatus
from .workloads.release import check_release_allowed, graceful_release, probe_ready

__all__ = ["ModeSwitcher", "ReleaseVerifier", "SwitchResult", "Verdict"]

Sampler = Callable[[], AttributedSample]


@dataclass
class SwitchResult:
    ok: bool
    gpu: int
    from_mode: str | None
    to_mode: str
    transition_id: str
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        if not self.ok:
            return {"ok": False, "gpu": self.gpu, "from": self.from_mode, "to": self.to_mode,
                    "id": self.transition_id, "error": self.error, "detail": self.detail}
        return {"ok": True, "gpu": self.gpu, "from": self.from_mode, "to": self.to_mode,
                "id": self.transition_id, "timings": self.timings}


@dataclass
class Verdict:
    """What a release check saw: clear or not, with the figures and the holders."""

    clear: bool
    used_mib: int
    allowed_mib: int
    holders: list[dict[str, Any]]
    reason: str = ""


class ReleaseVerifier:
    """Decides, from one sample, whether the given workloads' VRAM is back.

    Clear means: no GPU process of a released workload remains, none that the GPU lists
    is missing from /proc, and the device's used memory is at most what the other
    processes (unowned ones, and workloads that keep running) hold, plus
    `tolerance_mib`. A listed PID with no /proc entry cannot be attributed: most likely
    it is a released holder that has exited while the driver still frees its memory,
    so it never counts as someone else's.
    """

    def __init__(self, tolerance_mib: int) -> None:
        self.tolerance_mib = tolerance_mib

    def check(self, sample: AttributedSample, gpu: int, released: set[str]) -> Verdict:
        reading = sample.node.gpu(gpu)
        if reading is None or not reading.ok:
            detail = "not in the sample" if reading is None else f"{reading.fault}"
            return Verdict(False, 0, 0, [], f"GPU {gpu} unreadable ({detail}): cannot prove")
        holders: list[dict[str, Any]] = []
        unseen: list[dict[str, Any]] = []
        others_mib = 0
        for proc in reading.processes:
            owner = sample.owners.get(proc.pid)
            workload = owner.workload if owner else None
            if workload is not None and workload in released:
                holders.append({"pid": proc.pid, "used_mib": proc.used_mib, "workload": workload,
                                "command": owner.command if owner else ""})
            elif workload is None and not (owner and owner.visible):
                unseen.append({"pid": proc.pid, "used_mib": proc.used_mib, "workload": None,
                               "command": ""})
            else:
                others_mib += proc.used_mib or 0
        allowed = others_mib + self.tolerance_mib
        if holders:
            names = ", ".join(sorted({str(h["workload"]) for h in holders}))
            return Verdict(False, reading.used_mib, allowed, holders + unseen,
                           f"processes of {names} still hold VRAM")
        if unseen:
            pids = ", ".join(str(h["pid"]) for h in unseen)
            return Verdict(False, reading.used_mib, allowed, unseen,
                           f"the GPU lists PIDs {pids}, which are not in /proc: exited with "
                           "their VRAM not yet freed, or in another PID namespace "
                           "(gpuwarden must run in the host's)")
        if reading.used_mib > allowed:
            return Verdict(False, reading.used_mib, allowed, [],
                           f"{reading.used_mib} MiB used, more than the {allowed} MiB that "
                           "running processes account for (leaked or not yet freed)")
        return Verdict(True, reading.used_mib, allowed, [])


@dataclass
class _Running:
    transition: Transition
    gpu: int
    future: asyncio.Future[SwitchResult]


def _from_to(tr: Transition) -> dict[str, Any]:
    # "from" is a keyword: event fields named from/to travel as a dict.
    return {"from": tr.from_mode, "to": tr.to_mode}


class ModeSwitcher:
    """Switches each GPU between its modes, one switch at a time per GPU."""

    def __init__(
        self,
        config: Config,
        workloads: dict[str, Workload],
        store: StateStore,
        state: State,
        bus: EventBus,
        sampler: Sampler,
        http: httpx.AsyncClient,
    ) -> None:
        self._config = config
        self._workloads = workloads
        self._store = store
        self._state = state
        self._bus = bus
        self._sampler = sampler
        self._http = http
        self._verifier = ReleaseVerifier(config.release.tolerance_mib)
        self._running: dict[int, _Running] = {}
        self._tasks: set[asyncio.Task[SwitchResult]] = set()

    # -- queries ---------------------------------------------------------------

    def mode_of(self, gpu: int) -> str | None:
        return self._state.gpu(gpu).mode

    def mode_since(self, gpu: int) -> float | None:
        return self._state.gpu(gpu).mode_since

    def transition_of(self, gpu: int) -> Transition | None:
        """The switch under way on a GPU, or one interrupted by a restart that restore()
        has yet to finish (step "recovering")."""
        running = self._running.get(gpu)
        return running.transition if running else self._state.gpu(gpu).transition

    def allowed_on(self, gpu: int) -> set[str]:
        """Workloads that may run on a GPU right now.

        Between switches: the active mode's. During a switch: none until it starts
        the target's (a workload of the old mode started by hand mid-switch is not
        allowed either).
        """
        running = self._running.get(gpu)
        if running is not None:
            tr = running.transition
            return set(self._config.all_modes()[tr.to_mode].workloads) \
                if tr.step == "starting" else set()
        mode = self.mode_of(gpu)
        modes = self._config.all_modes()
        return set(modes[mode].workloads) if mode in modes else set()

    def switching(self, gpu: int) -> bool:
        return gpu in self._running

    def workloads_on(self, gpu: int) -> list[str]:
        return [name for name in self._workloads if self._config.gpu_of_workload(name) == gpu]

    def resolve(self, mode: str, gpu: int | None) -> int:
        """The GPU a switch to `mode` acts on. Raises NotFoundError or RefusedError."""
        modes = self._config.all_modes()
        if mode not in modes:
            raise NotFoundError(
                f"unknown mode {mode!r} (modes: {', '.join(sorted(modes))})",
                {"mode": mode, "modes": sorted(modes)},
            )
        gpus = self._config.gpu_indices()
        if mode == IDLE_MODE:
            target = 0 if gpu is None else gpu
            if target not in gpus:
                raise NotFoundError(f"no modes are configured for GPU {target}", {"gpu": target})
            return target
        target = modes[mode].gpu
        if gpu is not None and gpu != target:
            raise RefusedError(f"mode {mode!r} runs on GPU {target}, not GPU {gpu}",
                               {"mode": mode, "gpu": gpu})
        return target

    # -- switching -------------------------------------------------------------

    async def switch(
        self,
        mode: str,
        *,
        gpu: int | None = None,
        requested_by: str,
        force: bool = False,
        wait: bool = True,
        reconcile: bool = False,
    ) -> SwitchResult:
        """Switch a GPU to `mode`.

        With `wait=False` returns as soon as the switch is under way (its result then
        has `ok=True` and no timings; the outcome is in the events and status).

        Raises:
            NotFoundError: unknown mode.
            ConflictError: another switch runs on that GPU toward another mode, a
                ComfyUI has jobs queued (without force), or a target workload is blocked.
        """
        index = self.resolve(mode, gpu)
        running = self._running.get(index)
        if running is not None:
            if running.transition.to_mode == mode:
                return await running.future if wait else self._pending(running)
            raise ConflictError(
                f"a switch to {running.transition.to_mode!r} is already running on GPU {index} "
                f"(id {running.transition.id})",
                {"id": running.transition.id, "to": running.transition.to_mode, "gpu": index},
            )
        current = self.mode_of(index)
        keep = set(self._config.all_modes()[mode].workloads)
        to_stop = [w for w in self.workloads_on(index) if w not in keep]
        blocked = sorted(w for w in keep if w in self._state.blocks)
        if blocked:
            raise ConflictError(
                f"workload(s) {', '.join(blocked)} of mode {mode!r} are blocked after a crash "
                "loop; unblock them first (gpuwarden unblock WORKLOAD)",
                {"blocked": blocked, "mode": mode},
            )
        if not reconcile and current == mode and self._state.gpu(index).failure is None:
            return SwitchResult(True, index, current, mode, "", {"total_s": 0.0})
        transition = Transition(
            id=uuid.uuid4().hex[:12],
            from_mode=current or IDLE_MODE,
            to_mode=mode,
            step="planned",
            requested_by=requested_by,
            started_at=time.time(),
        )
        loop = asyncio.get_running_loop()
        entry = _Running(transition, index, loop.create_future())
        # Claim the GPU before the first await, so a concurrent request sees this one.
        self._running[index] = entry
        try:
            for name in to_stop:
                await check_release_allowed(self._http, name, self._workloads[name].config,
                                            force=force)
        except RefusedError as exc:
            self._running.pop(index, None)
            entry.future.set_exception(exc)  # a request that joined meanwhile gets it too
            entry.future.exception()  # retrieved: no "never retrieved" warning
            raise
        await self._record(index, transition, "planned")
        task = loop.create_task(self._run(entry, keep, to_stop, force))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await entry.future if wait else self._pending(entry)

    @staticmethod
    def _pending(entry: _Running) -> SwitchResult:
        tr = entry.transition
        return SwitchResult(True, entry.gpu, tr.from_mode, tr.to_mode, tr.id)

    async def _record(self, gpu: int, transition: Transition | None, step: str = "") -> None:
        """Persist the transition's step (or its end) before acting on it: write-ahead."""
        st = self._state.gpu(gpu)
        if transition is not None:
            transition.step = step
        st.transition = transition
        await self._store.save_async(self._state)

    async def _run(
        self, entry: _Running, keep: set[str], to_stop: list[str], force: bool
    ) -> SwitchResult:
        tr, gpu = entry.transition, entry.gpu
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        self._bus.publish(
            "mode.switch.started", f"GPU {gpu}: {tr.from_mode} -> {tr.to_mode}",
            requested_by=tr.requested_by, gpu=gpu, transition_id=tr.id, mode=tr.to_mode,
            **_from_to(tr),
        )
        try:
            result = await self._steps(entry, keep, to_stop, force, timings, t0)
        except Exception as exc:  # an unexpected bug must still fail closed and be seen
            result = await self._fail(entry, timings, t0, f"internal error: {exc!r}", {})
        self._running.pop(gpu, None)
        entry.future.set_result(result)
        return result

    async def _steps(
        self, entry: _Running, keep: set[str], to_stop: list[str], force: bool,
        timings: dict[str, float], t0: float,
    ) -> SwitchResult:
        tr, gpu = entry.transition, entry.gpu
        statuses = await self._statuses(to_stop)
        running_stop = [n for n in to_stop if statuses[n].running]

        await self._record(gpu, tr, "releasing")
        t = time.monotonic()
        reports = await asyncio.gather(*(
            graceful_release(self._http, n, self._workloads[n].config, force=force)
            for n in running_stop
        ))
        timings["graceful_s"] = time.monotonic() - t

        await self._record(gpu, tr, "stopping")
        t = time.monotonic()
        results = await asyncio.gather(
            *(asyncio.to_thread(self._workloads[n].stop) for n in to_stop), return_exceptions=True
        )
        timings["stop_s"] = time.monotonic() - t
        for name, res in zip(to_stop, results, strict=True):
            if isinstance(res, BaseException):
                return await self._fail(entry, timings, t0, f"could not stop {name}: {res}",
                                  {"workload": name})
            if name in running_stop:
                self._bus.publish("workload.stopped", f"{name} stopped for a switch",
                                  requested_by=tr.requested_by, workload=name, gpu=gpu,
                                  transition_id=tr.id)

        await self._record(gpu, tr, "verifying")
        verdict = await self._verify_release(
            tr, gpu, set(to_stop), timings, "release_s", starting=tr.to_mode,
            stop_s=round(timings["stop_s"], 4), graceful=[r.actions + r.errors for r in reports])
        if not verdict.clear:
            figures = {"used_mib": verdict.used_mib, "allowed_mib": verdict.allowed_mib,
                       "holders": verdict.holders}
            return await self._fail(entry, timings, t0,
                                    f"VRAM release not verified: {verdict.reason}", figures)

        await self._record(gpu, tr, "starting")
        t = time.monotonic()
        error = await self.start_workloads(sorted(keep), tr.requested_by, gpu, tr.id)
        timings["start_s"] = time.monotonic() - t
        if error is not None:
            await asyncio.gather(*(asyncio.to_thread(self._workloads[n].stop) for n in keep),
                                 return_exceptions=True)
            if self._config.daemon.roll_back_failed_start:
                return await self._roll_back(entry, keep, error, timings, t0)
            return await self._fail(entry, timings, t0, error, {})

        timings["total_s"] = time.monotonic() - t0
        st = self._state.gpu(gpu)
        if st.mode != tr.to_mode or st.mode_since is None:
            st.mode_since = time.time()  # a reconcile to the same mode keeps its lease running
        st.mode, st.failure = tr.to_mode, None
        await self._record(gpu, None)
        rounded = {k: round(v, 4) for k, v in timings.items()}
        self._bus.publish(
            "mode.switch.completed",
            f"GPU {gpu}: {tr.from_mode} -> {tr.to_mode} in {timings['total_s']:.2f} s",
            requested_by=tr.requested_by, gpu=gpu, transition_id=tr.id, mode=tr.to_mode,
            **_from_to(tr), timings=rounded,
        )
        return SwitchResult(True, gpu, tr.from_mode, tr.to_mode, tr.id, rounded)

    async def _roll_back(
        self, entry: _Running, failed: set[str], error: str, timings: dict[str, float],
        t0: float,
    ) -> SwitchResult:
        """After a failed start: prove the target's VRAM is back, then bring the previous
        mode back up, so a bad image or a broken workload does not also take down what
        ran before. Anything short of that fails closed to idle."""
        tr, gpu = entry.transition, entry.gpu
        back = tr.from_mode
        back_workloads = sorted(self._config.all_modes()[back].workloads) \
            if back in self._config.all_modes() else []
        if back in (IDLE_MODE, tr.to_mode) or any(w in self._state.blocks
                                                    for w in back_workloads):
            return await self._fail(entry, timings, t0, error, {})
        # Write-ahead as a switch of its own: a daemon killed from here on finishes the
        # roll back at its next start (restore() switches to the recorded target).
        rollback = Transition(id=tr.id, from_mode=tr.to_mode, to_mode=back, step="verifying",
                              requested_by=tr.requested_by, started_at=time.time())
        # It stays the running transition to the end: what it allows (nothing while
        # verifying, `back`'s workloads once starting) is what the mode guard enforces.
        entry.transition = rollback
        await self._record(gpu, rollback, "verifying")
        verdict = await self._verify_release(tr, gpu, failed, timings, "rollback_release_s",
                                             starting=back)
        if not verdict.clear:
            return await self._fail(entry, timings, t0, f"{error}; no roll back to {back}: "
                                    f"VRAM release not verified: {verdict.reason}", {},
                                    switch=tr)
        await self._record(gpu, rollback, "starting")
        t = time.monotonic()
        back_error = await self.start_workloads(back_workloads, tr.requested_by, gpu, tr.id)
        timings["rollback_start_s"] = time.monotonic() - t
        if back_error is not None:
            await asyncio.gather(*(asyncio.to_thread(self._workloads[n].stop)
                                   for n in back_workloads), return_exceptions=True)
            return await self._fail(entry, timings, t0,
                                    f"{error}; roll back to {back} failed too: {back_error}", {},
                                    switch=tr)
        return await self._fail(entry, timings, t0, error, {}, switch=tr, rolled_back_to=back)

    async def _fail(
        self, entry: _Running, timings: dict[str, float], t0: float, error: str,
        detail: dict[str, Any], *, switch: Transition | None = None,
        rolled_back_to: str | None = None,
    ) -> SwitchResult:
        """End a switch that did not reach its target. The GPU is left idle (fail closed:
        whatever ran was stopped, nothing new runs), or in `rolled_back_to`, the previous
        mode, brought back after its VRAM was proven free. `switch`: the switch that
        failed, when a roll back has taken its place as the running transition."""
        tr, gpu = switch or entry.transition, entry.gpu
        timings["total_s"] = time.monotonic() - t0
        mode = rolled_back_to or IDLE_MODE
        st = self._state.gpu(gpu)
        st.mode, st.mode_since = mode, time.time()
        st.failure = {"id": tr.id, "to": tr.to_mode, "error": error, "at": time.time(),
                      "requested_by": tr.requested_by, "rolled_back_to": rolled_back_to}
        await self._record(gpu, None)
        rounded = {k: round(v, 4) for k, v in timings.items()}
        back = ""
        if rolled_back_to:
            back = f"; rolled back to {rolled_back_to}"
            detail = {**detail, "rolled_back_to": rolled_back_to}
        self._bus.publish(
            "mode.switch.failed", f"GPU {gpu}: switch to {tr.to_mode} failed: {error}{back}",
            severity=Severity.ERROR, requested_by=tr.requested_by, gpu=gpu, transition_id=tr.id,
            mode=mode, **_from_to(tr), error=error, rolled_back_to=rolled_back_to,
            timings=rounded,
        )
        return SwitchResult(False, gpu, tr.from_mode, tr.to_mode, tr.id, rounded,
                            error + back, detail)

    async def _statuses(self, names: list[str]) -> dict[str, WorkloadStatus]:
        found = await asyncio.gather(*(asyncio.to_thread(self._workloads[n].status)
                                       for n in names))
        return dict(zip(names, found, strict=True))

    async def _verify_release(
        self, tr: Transition, gpu: int, released: set[str], timings: dict[str, float],
        timing: str, *, starting: str, **fields: Any,
    ) -> Verdict:
        """Wait for the released workloads' VRAM (timed as `timings[timing]`) and say how
        it went: `release.verified`, or `release.timeout` and `starting` is not started."""
        t = time.monotonic()
        verdict = await self._verify(gpu, released)
        seconds = timings[timing] = time.monotonic() - t
        common: dict[str, Any] = {
            "requested_by": tr.requested_by, "gpu": gpu, "transition_id": tr.id,
            "workloads": sorted(released), "release_s": round(seconds, 4),
            "used_mib": verdict.used_mib, "allowed_mib": verdict.allowed_mib}
        if verdict.clear:
            self._bus.publish("release.verified",
                              f"GPU {gpu}: VRAM free after {seconds * 1000:.0f} ms",
                              **common, **fields)
        else:
            self._bus.publish(
                "release.timeout",
                f"GPU {gpu}: VRAM not proven free after {seconds:.1f} s: {verdict.reason}; "
                f"{starting} is NOT started", severity=Severity.CRITICAL,
                holders=verdict.holders, **common, **fields)
        return verdict

    async def _verify(self, gpu: int, released: set[str]) -> Verdict:
        """Poll the GPU until the released workloads' VRAM is back, or time out."""
        rel = self._config.release
        deadline = time.monotonic() + rel.timeout
        while True:
            sample = await asyncio.to_thread(self._sampler)
            verdict = self._verifier.check(sample, gpu, released)
            if verdict.clear or time.monotonic() >= deadline:
                return verdict
            await asyncio.sleep(rel.poll_interval)

    async def start_workloads(self, names: list[str], requested_by: str, gpu: int,
                              tid: str) -> str | None:
        """Start workloads one by one, each through the VRAM gate and its readiness check.

        Returns None on success, or why the first one could not start.
        """
        for name in names:
            workload = self._workloads[name]
            if name in self._state.blocks:
                return f"{name} is blocked after a crash loop"
            refusal = await self._vram_gate(workload, gpu)
            if refusal is not None:
                self._bus.publish("workload.refused", refusal, severity=Severity.ERROR,
                                  requested_by=requested_by, workload=name, gpu=gpu,
                                  transition_id=tid)
                return refusal
            try:
                await asyncio.to_thread(workload.start)
            except WorkloadError as exc:
                return str(exc)
            error = await self._wait_ready(workload)
            if error is not None:
                return error
            self._bus.publish("workload.started", f"{name} started", requested_by=requested_by,
                              workload=name, gpu=gpu, transition_id=tid)
        return None

    async def _vram_gate(self, workload: Workload, gpu: int) -> str | None:
        """Refuse a start into a card without the workload's `expected_mib` free."""
        need = workload.config.expected_mib
        if not need:
            return None
        status = await asyncio.to_thread(workload.status)
        if status.running:
            return None  # already holds its share
        sample = await asyncio.to_thread(self._sampler)
        reading = sample.node.gpu(gpu)
        if reading is None or not reading.ok:
            return f"not starting {workload.name}: GPU {gpu} unreadable, free VRAM unknown"
        if reading.free_mib < need:
            return (f"not starting {workload.name}: it needs {need} MiB but GPU {gpu} has "
                    f"{reading.free_mib} MiB free ({reading.used_mib}/{reading.total_mib} used)")
        return None

    async def _wait_ready(self, workload: Workload) -> str | None:
        deadline = time.monotonic() + workload.config.ready_timeout
        while True:
            status = await asyncio.to_thread(workload.status)
            if not status.running:
                return f"{workload.name} exited while starting ({status.detail})"
            # A slow answer still counts while the deadline allows (a busy ComfyUI can
            # take seconds for /system_stats); a refused connection returns at once.
            left = max(0.5, deadline - time.monotonic())
            if await probe_ready(self._http, workload.config, timeout=min(10.0, left)):
                return None
            if time.monotonic() >= deadline:
                return (f"{workload.name} not ready within {workload.config.ready_timeout:g} s "
                        f"({workload.config.url} does not answer)")
            await asyncio.sleep(0.25)

    async def restore(self) -> None:
        """At start: finish an interrupted switch, or bring each GPU to its recorded mode."""
        for gpu in self._config.gpu_indices():
            st = self._state.gpu(gpu)
            if st.transition is not None:
                interrupted = st.transition
                self._bus.publish(
                    "mode.recovery",
                    f"GPU {gpu}: a switch to {interrupted.to_mode} was interrupted at "
                    f"{interrupted.step}; finishing it",
                    severity=Severity.WARNING, gpu=gpu, transition_id=interrupted.id,
                    step=interrupted.step, to=interrupted.to_mode,
                )
                # Kept until the switch below replaces it: status shows the GPU as still
                # switching, not as settled in a mode whose workloads may be down.
                interrupted.step = "recovering"
                target = interrupted.to_mode
                requested_by = interrupted.requested_by
            else:
                target = st.mode or self._config.daemon.default_mode
                requested_by = "daemon"
            if target not in self._config.all_modes() or (
                target != IDLE_MODE and self._config.all_modes()[target].gpu != gpu
            ):
                target = IDLE_MODE
            await self._report_drift(gpu, target)
            try:
                await self.switch(target, gpu=gpu, requested_by=requested_by, force=True,
                                  reconcile=True)
            except RefusedError as exc:
                if st.transition is not None:
                    st.transition = None
                    await self._store.save_async(self._state)
                # A blocked workload: the mode stays as recorded, its workload stays down
                # until a person unblocks it; strays are stopped by the mode guard.
                self._bus.publish("mode.switch.failed", f"GPU {gpu}: cannot restore {target}: "
                                  f"{exc}", severity=Severity.ERROR, gpu=gpu, to=target,
                                  requested_by=requested_by, error=str(exc))

    async def _report_drift(self, gpu: int, target: str) -> None:
        keep = set(self._config.all_modes()[target].workloads)
        names = self.workloads_on(gpu)
        statuses = await self._statuses(names)
        strays = sorted(n for n in names if statuses[n].running and n not in keep)
        missing = sorted(n for n in keep if not statuses[n].running)
        if strays:
            self._bus.publish(
                "mode.drift",
                f"GPU {gpu}: {', '.join(strays)} running outside mode {target}; stopping them",
                severity=Severity.WARNING, gpu=gpu, mode=target, running=strays,
                not_running=missing,
            )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
