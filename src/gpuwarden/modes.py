"""The mode switcher: plan, release, stop, verify the VRAM came back, start.

A GPU mode is a named set of workloads that may hold a GPU; modes on one GPU exclude
each other. A switch first makes every refusal it can (blocked workloads, queued
ComfyUI jobs, a target that will not fit in VRAM) while nothing has changed; then it
records itself in the state file before acting, asks the workloads to release VRAM
gracefully, stops them, and *proves* through the GPU backend that their memory is
free before it starts anything. When it cannot prove
that within `release.timeout` it fails closed: nothing is started and the GPU is
left in `idle` with the failure in status.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from .config import IDLE_MODE, Config
from .errors import ConflictError, NotFoundError, RefusedError, WorkloadError
from .events import EventBus, Severity
from .gpu.attribution import AttributedSample
from .state import State, StateStore, Transition
from .watchdog import top_holders
from .workloads.base import Workload, WorkloadStatus
from .workloads.process import ProcessWorkload
from .workloads.release import check_release_allowed, graceful_release, probe_ready
from .workloads.supervisor import WorkloadSupervisor

__all__ = ["ModeSwitcher", "ReleaseVerifier", "SwitchResult", "Verdict"]

Sampler = Callable[[], AttributedSample]


class InFlightRequests(Protocol):
    """Requests in flight to workloads through gpuwarden (the demand proxies)."""

    def in_flight(self, workloads: set[str]) -> list[dict[str, Any]]:
        """Each request in flight to one of `workloads`: proxy, client, request, for_s."""
        ...

    def end_in_flight(self, workloads: set[str], reason: str) -> int:
        """End each with an error in its answer's own format; how many."""
        ...

log = logging.getLogger(__name__)


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
    started: list[str] = field(default_factory=list)  # workloads this switch started
    stopped: list[str] = field(default_factory=list)  # running workloads it stopped
    pending: bool = False  # under way: the outcome comes later (wait=False)
    limit_s: float | None = None  # pending: the longest it may take, by its timeouts
    # Forced: the proxies' requests it cut (cut_requests), ComfyUI jobs dropped.
    forced: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        head = {"gpu": self.gpu, "from": self.from_mode, "to": self.to_mode,
                "id": self.transition_id}
        if not self.ok:
            return {"ok": False, **head, "error": self.error, "detail": self.detail}
        if self.pending:
            return {"ok": True, **head, "pending": True, "limit_s": self.limit_s}
        return {"ok": True, **head, "timings": self.timings, "started": self.started,
                "stopped": self.stopped, **self.forced}


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
                           f"{reading.used_mib} MiB used where {allowed} MiB may be "
                           f"({others_mib} MiB of the processes still running, "
                           f"{self.tolerance_mib} MiB tolerance): leaked or not yet freed")
        return Verdict(True, reading.used_mib, allowed, [])


@dataclass(frozen=True)
class _Ending:
    name: str
    message: str
    severity: Severity
    fields: dict[str, Any]


@dataclass
class _Running:
    """The transition that owns a GPU, and which workloads it lets run at this moment."""

    transition: Transition
    gpu: int
    future: asyncio.Future[SwitchResult]
    outgoing: frozenset[str]  # the workloads of the mode being left
    incoming: frozenset[str]  # the workloads of the mode being entered
    released: bool = False  # the outgoing workloads' VRAM is proven back
    cause: dict[str, Any] | None = None  # what made a front end ask, for the audit
    limit_s: float = 0.0  # the longest this switch may take, by its configured timeouts
    # A forced switch: the proxies' requests it cut, the ComfyUI jobs its stop dropped.
    forced: dict[str, Any] = field(default_factory=dict)
    # The event that ends the switch (completed, failed, reconcile), published only once
    # its result is kept and the switch lets go of the GPU: see ModeSwitcher._run.
    ending: _Ending | None = None

    def audit(self) -> dict[str, Any]:
        """Event fields every event of this switch carries."""
        return {} if self.cause is None else {"cause": self.cause}

    def begin(self, transition: Transition, outgoing: frozenset[str],
              incoming: frozenset[str]) -> None:
        """Hand the GPU to a follow-on transition (a roll back) without letting go of it."""
        self.transition, self.outgoing, self.incoming = transition, outgoing, incoming
        self.released = False

    def allowed(self) -> set[str]:
        # Until the release is proven, the switcher is still stopping the outgoing
        # workloads: they are its to stop, not the mode guard's. The incoming ones are
        # its to start. Anything else on the GPU is a third mode's and is stopped.
        return set(self.incoming) if self.released else set(self.incoming | self.outgoing)


@dataclass(frozen=True)
class _Plan:
    """What a switch will do, decided (and every refusal made) before it acts."""

    keep: list[str]  # the target mode's workloads
    to_stop: list[str]  # every other workload on the GPU
    running_stop: list[str]  # those of to_stop that were running
    to_start: list[str]  # target workloads that were not running
    heal: bool  # a switch to the mode already active: start what is down


def _from_to(tr: Transition) -> dict[str, Any]:
    # "from" is a keyword: event fields named from/to travel as a dict.
    return {"from": tr.from_mode, "to": tr.to_mode}


# Finished switches kept for GET /v1/switches/{id}.
_KEPT_RESULTS = 64


class ModeSwitcher:
    """Switches each GPU between its modes, one switch at a time per GPU.

    While a switch (or its roll back) runs on a GPU, it alone starts and stops that
    GPU's workloads: the mode guard asks `allowed_on()` and stops only what the running
    transition does not own.
    """

    def __init__(
        self,
        config: Config,
        workloads: dict[str, Workload],
        supervisor: WorkloadSupervisor,
        store: StateStore,
        state: State,
        bus: EventBus,
        sampler: Sampler,
        http: httpx.AsyncClient,
        on_settled: Callable[[], Awaitable[None]] | None = None,
        requests: InFlightRequests | None = None,
    ) -> None:
        """`on_settled` runs after each switch ends and before its result is given
        out, so a status read right after shows the new mode's figures. `requests`:
        the demand proxies' requests in flight, which a switch must not cut."""
        self._config = config
        self._workloads = workloads
        self._supervisor = supervisor
        self._store = store
        self._state = state
        self._bus = bus
        self._sampler = sampler
        self._http = http
        self._on_settled = on_settled
        self._requests = requests
        self._verifier = ReleaseVerifier(config.release.tolerance_mib)
        self._running: dict[int, _Running] = {}
        self._results: OrderedDict[str, SwitchResult] = OrderedDict()
        self._tasks: set[asyncio.Task[SwitchResult]] = set()
        self._closed = False

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config; only workloads and modes not in use change (the
        workloads dict is shared, and changed in place)."""
        self._config = config

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

        Between switches: the active mode's. During a switch: the outgoing and the
        incoming mode's until the outgoing one's release is proven, then the incoming
        mode's only.
        """
        running = self._running.get(gpu)
        if running is not None:
            return running.allowed()
        return self._workloads_of(self.mode_of(gpu))

    def switching(self, gpu: int) -> bool:
        return gpu in self._running

    def workloads_on(self, gpu: int) -> list[str]:
        return [name for name in self._workloads if self._config.gpu_of_workload(name) == gpu]

    def _workloads_of(self, mode: str | None) -> set[str]:
        modes = self._config.all_modes()
        return set(modes[mode].workloads) if mode in modes else set()

    def switch_state(self, transition_id: str) -> dict[str, Any] | None:
        """A switch by id: under way (with its step), or its result; None if unknown."""
        for entry in self._running.values():
            tr = entry.transition
            if tr.id == transition_id and not entry.future.done():
                return {"id": tr.id, "done": False, "gpu": entry.gpu, "from": tr.from_mode,
                        "to": tr.to_mode, "step": tr.step, "started_at": tr.started_at}
        result = self._results.get(transition_id)
        if result is None:
            return None
        return {"done": True, **result.to_dict(), "detail": result.detail}

    def resolve(self, mode: str, gpu: int | None) -> int:
        """The GPU a switch to `mode` acts on. Raises NotFoundError: no such mode, or
        none on the GPU asked for (like `idle` on a GPU with no modes)."""
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
            raise NotFoundError(f"mode {mode!r} runs on GPU {target}, not GPU {gpu}",
                                {"mode": mode, "gpu": gpu, "runs_on": target})
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
        cause: dict[str, Any] | None = None,
    ) -> SwitchResult:
        """Switch a GPU to `mode`, or, when `mode` is already active, start those of its
        workloads that are down (a heal: `mode.reconcile`).

        Every refusal comes before anything is stopped, changes nothing and is audited
        as `mode.switch.refused`. With `wait=False` returns as soon as the switch is
        under way (`pending`; the outcome is in the events, status and
        `switch_state(id)`). `reconcile` makes a pass over an active mode even when
        nothing looks down (the daemon's start). `cause` (e.g. the request a demand proxy
        holds) is audited with the switch's events.

        Raises:
            NotFoundError: unknown mode.
            RefusedError: the mode runs on another GPU than `gpu`.
            ConflictError: another switch runs on that GPU toward another mode, a target
                workload is blocked, a ComfyUI to stop has jobs queued or an unreadable
                queue (without force), or the target will not fit in VRAM.
        """
        index = self.resolve(mode, gpu)
        self._refuse_if_closed()
        current = self.mode_of(index) or IDLE_MODE
        transition = Transition(
            id=uuid.uuid4().hex[:12], from_mode=current, to_mode=mode, step="planned",
            requested_by=requested_by, started_at=time.time(),
        )
        running = self._running.get(index)
        if running is not None:
            if running.transition.to_mode == mode:
                return await asyncio.shield(running.future) if wait \
                    else self._pending(running)
            other = running.transition
            raise self._refused(transition, index, force, ConflictError(
                f"a switch to {other.to_mode!r} is already running on GPU {index} "
                f"(id {other.id}, step {other.step}); ask again once it has ended "
                f"(`gpuwarden mode` shows it; `gpuwarden mode {other.to_mode}` waits for it)",
                {"id": other.id, "to": other.to_mode, "gpu": index}),
                cause)
        loop = asyncio.get_running_loop()
        outgoing = frozenset(self._workloads_of(current))
        incoming = frozenset(self._workloads_of(mode))
        entry = _Running(transition, index, loop.create_future(), outgoing, incoming,
                         cause=cause, limit_s=self._limit_s(index, incoming))
        # Claim the GPU before the first await, so a concurrent request sees this one.
        self._running[index] = entry
        t0 = time.monotonic()  # the switch's time includes its planning
        try:
            plan = await self._plan(entry, force=force, reconcile=reconcile)
        except BaseException as exc:
            self._running.pop(index, None)
            if isinstance(exc, RefusedError):
                entry.future.set_exception(exc)  # a request that joined meanwhile gets it too
                entry.future.exception()  # retrieved: no "never retrieved" warning
                # ...and one that joined without waiting finds it by id.
                self._keep(SwitchResult(False, index, current, mode, transition.id,
                                        error=str(exc), detail={"refused": exc.detail}))
                raise self._refused(transition, index, force, exc, cause) from None
            entry.future.cancel()
            raise
        if self._closed:  # the daemon began stopping while this was planned
            self._running.pop(index, None)
            entry.future.cancel()
            self._refuse_if_closed()
        if plan is None:  # the mode is active and whole: nothing to do
            self._running.pop(index, None)
            result = SwitchResult(True, index, current, mode, "", {"total_s": 0.0})
            self._keep(result, transition.id)  # one that joined meanwhile asks by this id
            entry.future.set_result(result)
            return result
        task = loop.create_task(self._run(entry, plan, force, t0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(entry.future) if wait else self._pending(entry)

    def _keep(self, result: SwitchResult, transition_id: str | None = None) -> None:
        """Remember how a switch ended, for `switch_state()`; the oldest are forgotten."""
        self._results[transition_id or result.transition_id] = result
        while len(self._results) > _KEPT_RESULTS:
            self._results.popitem(last=False)

    def _refused(self, tr: Transition, gpu: int, force: bool,
                 exc: RefusedError, cause: dict[str, Any] | None = None) -> RefusedError:
        """Audit a refusal (nothing was changed) and hand it back to be raised."""
        self._bus.publish(
            "mode.switch.refused", f"GPU {gpu}: switch to {tr.to_mode} refused: {exc}",
            severity=Severity.WARNING, requested_by=tr.requested_by, gpu=gpu,
            mode=tr.from_mode, **_from_to(tr), reason=str(exc), figures=exc.detail,
            force=force, transition_id=tr.id, **({} if cause is None else {"cause": cause}),
        )
        return exc

    async def _plan(self, entry: _Running, *, force: bool, reconcile: bool) -> _Plan | None:
        """Decide what the switch does and make every refusal, before anything changes.
        None: a heal with nothing to heal."""
        tr, gpu = entry.transition, entry.gpu
        keep = sorted(entry.incoming)
        blocked = [w for w in keep if w in self._state.blocks]
        if blocked:
            raise ConflictError(
                f"workload(s) {', '.join(blocked)} of mode {tr.to_mode!r} are blocked after a "
                "crash loop; unblock them first (gpuwarden unblock WORKLOAD)",
                {"blocked": blocked, "mode": tr.to_mode},
            )
        on_gpu = self.workloads_on(gpu)
        statuses = await self._supervisor.statuses(sorted(set(on_gpu) | set(keep)))
        to_stop = [w for w in on_gpu if w not in entry.incoming]
        running_stop = [w for w in to_stop if statuses[w].running]
        to_start = [w for w in keep if not statuses[w].running]
        heal = tr.from_mode == tr.to_mode
        if heal and not (reconcile or to_start or running_stop
                         or self._state.gpu(gpu).failure is not None):
            return None
        if not force:
            self._refuse_requests_in_flight(set(running_stop))
            for name in running_stop:
                await check_release_allowed(self._http, name, self._workloads[name].config,
                                            timeout=self._config.release.queue_timeout)
        await self._predict_fit(gpu, tr.to_mode, to_start, running_stop)
        return _Plan(keep, to_stop, running_stop, to_start, heal)

    def _refuse_requests_in_flight(self, stopping: set[str]) -> None:
        """Refuse a switch that would cut answers under way through a demand proxy (a
        chat's stream): Ollama's unload waits for them, a stop does not."""
        busy = self._requests.in_flight(stopping) if self._requests and stopping else []
        if not busy:
            return
        shown = "; ".join(f"{r['request']} from {r['client']} to {r['workload']} for "
                          f"{r['for_s']:g} s" for r in busy[:5])
        more = f" and {len(busy) - 5} more" if len(busy) > 5 else ""
        raise ConflictError(
            f"{len(busy)} request(s) in flight through the demand proxy would be cut "
            f"({shown}{more}); wait for them, or switch with --force (each answer then "
            "ends with an error)",
            {"in_flight": busy, "workloads": sorted({r["workload"] for r in busy})})

    async def _predict_fit(self, gpu: int, mode: str, to_start: list[str],
                           running_stop: list[str]) -> None:
        """Refuse a switch whose workloads cannot fit once the others have stopped: free
        VRAM now plus what the workloads to stop hold must cover their `expected_mib`
        plus the release tolerance."""
        need = sum(self._workloads[n].config.expected_mib or 0 for n in to_start)
        if not need:
            return
        tolerance = self._config.release.tolerance_mib
        sample = await asyncio.to_thread(self._sampler)
        reading = sample.node.gpu(gpu)
        if reading is None or not reading.ok:
            raise ConflictError(
                f"GPU {gpu} is unreadable: cannot tell whether mode {mode!r} fits "
                f"({need} MiB needed)", {"gpu": gpu, "need_mib": need})
        freed = 0
        for proc in reading.processes:
            owner = sample.owners.get(proc.pid)
            if owner is not None and owner.workload in running_stop:
                freed += proc.used_mib or 0
        available = reading.free_mib + freed
        if available >= need + tolerance:
            return
        stopping = f" after stopping {', '.join(running_stop)}" if running_stop else ""
        raise ConflictError(
            f"mode {mode!r} needs {need} MiB (+{tolerance} MiB tolerance) but GPU {gpu} would "
            f"have {available} MiB free{stopping} ({reading.free_mib} MiB free now, "
            f"{freed} MiB held by the workloads to stop; {reading.used_mib}/"
            f"{reading.total_mib} MiB used)",
            {"gpu": gpu, "need_mib": need, "tolerance_mib": tolerance,
             "free_mib": reading.free_mib, "freed_mib": freed, "available_mib": available,
             "used_mib": reading.used_mib, "total_mib": reading.total_mib,
             "holders": top_holders(sample, reading)},
        )

    @staticmethod
    def _pending(entry: _Running) -> SwitchResult:
        tr = entry.transition
        return SwitchResult(True, entry.gpu, tr.from_mode, tr.to_mode, tr.id, pending=True,
                            limit_s=entry.limit_s)

    def _limit_s(self, gpu: int, incoming: frozenset[str]) -> float:
        """The longest a switch to `incoming` may take if every step uses its whole
        timeout: planning (a queue read), graceful release, stops, the verified release,
        each start up to its readiness; and a roll back's release and starts once more.
        A follower that waits past it is told the switch overran its limits."""
        cfg = self._config.release
        on_gpu = self.workloads_on(gpu)

        def starts(names: list[str] | frozenset[str]) -> float:
            return sum(self._workloads[n].config.ready_timeout + 10.0 for n in names)

        # Each HTTP call of a step is bounded by its client timeout (10 s), a stop by
        # stop_timeout and 10 s more for SIGKILL to land.
        stop = max((self._workloads[n].config.stop_timeout for n in on_gpu),
                   default=0.0) + 10.0
        start = starts(incoming)
        back = starts([n for n in on_gpu if n not in incoming])
        limit = cfg.queue_timeout + 10.0 + stop + cfg.timeout + start
        if self._config.daemon.roll_back_failed_start:
            limit += stop + cfg.timeout + back
        return round(limit, 1)

    async def _record(self, gpu: int, transition: Transition | None, step: str = "") -> None:
        """Persist the transition's step (or its end) before acting on it: write-ahead."""
        st = self._state.gpu(gpu)
        if transition is not None:
            transition.step = step
        st.transition = transition
        await self._store.save_async(self._state)
        if transition is not None and step:
            # For followers (`gpuwarden mode` on a terminal); debug: not sent on.
            self._bus.publish("mode.switch.step", f"GPU {gpu}: {transition.from_mode} -> "
                              f"{transition.to_mode}: {step}", severity=Severity.DEBUG,
                              requested_by=transition.requested_by, gpu=gpu,
                              transition_id=transition.id, step=step, **_from_to(transition))

    async def _run(self, entry: _Running, plan: _Plan, force: bool, t0: float
                   ) -> SwitchResult:
        tr, gpu = entry.transition, entry.gpu
        timings: dict[str, float] = {"plan_s": time.monotonic() - t0}
        if not plan.heal:
            self._bus.publish(
                "mode.switch.started", f"GPU {gpu}: {tr.from_mode} -> {tr.to_mode}",
                requested_by=tr.requested_by, gpu=gpu, transition_id=tr.id, mode=tr.to_mode,
                **_from_to(tr), **entry.audit(),
            )
        result: SwitchResult | None = None
        try:
            try:
                result = await self._steps(entry, plan, force, timings, t0)
            except Exception as exc:  # an unexpected bug must still fail closed and be seen
                result = await self._fail(entry, timings, t0, f"internal error: {exc!r}", {})
            if self._on_settled is not None:
                # Still the GPU's owner meanwhile: whoever asks sees the switch under way
                # until its figures are fresh.
                try:
                    await self._on_settled()
                except Exception:
                    log.exception("refreshing status after switch %s failed", tr.id)
        finally:
            # One step of the loop, no await: the switch lets go of the GPU, its result
            # is kept and its end is published together. So a request for the same mode
            # never joins a switch whose end is already out, and a follower either sees
            # the end in its stream or finds the result when it asks by id.
            self._running.pop(gpu, None)
            if result is not None:
                self._keep(result)
            if entry.ending is not None:
                end = entry.ending
                self._bus.publish(end.name, end.message, severity=end.severity, **end.fields)
            if entry.future.done():
                pass
            elif result is None:  # cancelled (daemon stopping): waiters must not hang
                entry.future.cancel()
            else:
                entry.future.set_result(result)
        return result

    async def _stop(self, names: list[str] | set[str], tr: Transition,
                    why: str) -> list[BaseException | WorkloadStatus]:
        return await asyncio.gather(*(
            self._supervisor.stop(n, by="switch", reason=f"{why} (id {tr.id})",
                                  requested_by=tr.requested_by)
            for n in sorted(names)), return_exceptions=True)

    async def _steps(
        self, entry: _Running, plan: _Plan, force: bool, timings: dict[str, float],
        t0: float,
    ) -> SwitchResult:
        tr, gpu = entry.transition, entry.gpu
        await self._record(gpu, tr, "releasing")
        t = time.monotonic()
        cut: list[dict[str, Any]] = []
        if force and self._requests is not None and plan.running_stop:
            # Their answers end with an error in their own format, not a cut connection.
            stopping = set(plan.running_stop)
            cut = self._requests.in_flight(stopping)
            self._requests.end_in_flight(
                stopping, f"gpuwarden: the GPU is switching to {tr.to_mode} (forced by "
                f"{tr.requested_by}, switch {tr.id}); this answer ends here")
        reports = await asyncio.gather(*(
            graceful_release(self._http, n, self._workloads[n].config, force=force)
            for n in plan.running_stop
        ))
        timings["graceful_s"] = time.monotonic() - t
        forced: dict[str, Any] = {}
        if cut:
            forced["cut_requests"] = cut
        dropped = {r.workload: r.dropped_jobs for r in reports if r.dropped_jobs}
        if dropped:
            forced["dropped_jobs"] = dropped
        entry.forced = forced

        await self._record(gpu, tr, "stopping")
        t = time.monotonic()
        why = f"not part of mode {tr.to_mode}" if plan.heal else f"switch to {tr.to_mode}"
        results = await self._stop(plan.to_stop, tr, why)
        timings["stop_s"] = time.monotonic() - t
        for name, res in zip(sorted(plan.to_stop), results, strict=True):
            if isinstance(res, BaseException):
                return await self._fail(entry, timings, t0, f"could not stop {name}: {res}",
                                        {"workload": name},
                                        settle_in=tr.to_mode if plan.heal else None)
            if name in plan.running_stop:
                self._bus.publish("workload.stopped", f"{name} stopped for a switch",
                                  requested_by=tr.requested_by, workload=name, gpu=gpu,
                                  transition_id=tr.id)

        await self._record(gpu, tr, "verifying")
        verdict = await self._verify_release(
            tr, gpu, set(plan.to_stop), timings, "release_s", starting=tr.to_mode,
            also_free=set(plan.to_start),
            stop_s=round(timings["stop_s"], 4),
            graceful={r.workload: r.actions + r.errors for r in reports})
        if not verdict.clear:
            figures = {"used_mib": verdict.used_mib, "allowed_mib": verdict.allowed_mib,
                       "holders": verdict.holders}
            return await self._fail(entry, timings, t0,
                                    f"VRAM release not verified: {verdict.reason}", figures,
                                    settle_in=tr.to_mode if plan.heal else None)
        entry.released = True

        await self._record(gpu, tr, "starting")
        t = time.monotonic()
        started, error = await self.start_workloads(plan.keep, tr.requested_by, gpu, tr.id)
        timings["start_s"] = time.monotonic() - t
        if error is not None:
            if plan.heal:
                # What ran before the heal keeps running; what it tried to start stays down.
                await self._stop(plan.to_start, tr, f"failed start in mode {tr.to_mode}")
                return await self._fail(entry, timings, t0, error, {}, settle_in=tr.to_mode)
            await self._stop(plan.keep, tr, f"failed start of mode {tr.to_mode}")
            if self._config.daemon.roll_back_failed_start:
                return await self._roll_back(entry, set(plan.keep), error, timings, t0)
            return await self._fail(entry, timings, t0, error, {})

        timings["total_s"] = time.monotonic() - t0
        st = self._state.gpu(gpu)
        if st.mode != tr.to_mode or st.mode_since is None:
            st.mode_since = time.time()  # a heal keeps the mode's lease running
        st.mode, st.failure = tr.to_mode, None
        await self._record(gpu, None)
        rounded = {k: round(v, 4) for k, v in timings.items()}
        if plan.heal:
            done = [f"started {', '.join(started)}" if started else "",
                    f"stopped {', '.join(plan.running_stop)}" if plan.running_stop else ""]
            entry.ending = _Ending(
                "mode.reconcile",
                f"GPU {gpu}: mode {tr.to_mode}: "
                + ("; ".join(d for d in done if d) or "nothing to start or stop"),
                Severity.INFO,
                dict(requested_by=tr.requested_by, gpu=gpu, transition_id=tr.id,
                     mode=tr.to_mode, started=started, stopped=plan.running_stop,
                     timings=rounded, **entry.audit()),
            )
        else:
            entry.ending = _Ending(
                "mode.switch.completed",
                f"GPU {gpu}: {tr.from_mode} -> {tr.to_mode} in {timings['total_s']:.2f} s",
                Severity.INFO,
                dict(requested_by=tr.requested_by, gpu=gpu, transition_id=tr.id,
                     mode=tr.to_mode, **_from_to(tr), timings=rounded, started=started,
                     **entry.forced, **entry.audit()),
            )
        return SwitchResult(True, gpu, tr.from_mode, tr.to_mode, tr.id, rounded,
                            started=started, stopped=plan.running_stop,
                            forced=entry.forced)

    async def _roll_back(
        self, entry: _Running, failed: set[str], error: str, timings: dict[str, float],
        t0: float,
    ) -> SwitchResult:
        """After a failed start: prove the target's VRAM is back, then bring the previous
        mode back up, so a bad image or a broken workload does not also take down what
        ran before. Anything short of that fails closed to idle."""
        tr, gpu = entry.transition, entry.gpu
        back = tr.from_mode
        back_workloads = sorted(self._workloads_of(back))
        if back in (IDLE_MODE, tr.to_mode) or any(w in self._state.blocks
                                                    for w in back_workloads):
            return await self._fail(entry, timings, t0, error, {})
        # Write-ahead as a switch of its own: a daemon killed from here on finishes the
        # roll back at its next start (restore() switches to the recorded target).
        rollback = Transition(id=tr.id, from_mode=tr.to_mode, to_mode=back, step="verifying",
                              requested_by=tr.requested_by, started_at=time.time())
        # It owns the GPU to the end, like any transition: the mode guard leaves both
        # modes' workloads to it until the failed ones' release is proven.
        entry.begin(rollback, frozenset(failed), frozenset(back_workloads))
        await self._record(gpu, rollback, "verifying")
        verdict = await self._verify_release(tr, gpu, failed, timings, "rollback_release_s",
                                             starting=back, also_free=set(back_workloads))
        if not verdict.clear:
            return await self._fail(entry, timings, t0, f"{error}; no roll back to {back}: "
                                    f"VRAM release not verified: {verdict.reason}", {},
                                    switch=tr)
        entry.released = True
        await self._record(gpu, rollback, "starting")
        t = time.monotonic()
        _, back_error = await self.start_workloads(back_workloads, tr.requested_by, gpu,
                                                   tr.id)
        timings["rollback_start_s"] = time.monotonic() - t
        if back_error is not None:
            await self._stop(back_workloads, tr, f"failed roll back to {back}")
            return await self._fail(entry, timings, t0,
                                    f"{error}; roll back to {back} failed too: {back_error}", {},
                                    switch=tr)
        return await self._fail(entry, timings, t0, error, {}, switch=tr, rolled_back_to=back)

    async def _fail(
        self, entry: _Running, timings: dict[str, float], t0: float, error: str,
        detail: dict[str, Any], *, switch: Transition | None = None,
        rolled_back_to: str | None = None, settle_in: str | None = None,
    ) -> SwitchResult:
        """End a switch that did not reach its target. The GPU is left idle (fail closed:
        whatever ran was stopped, nothing new runs), or in `rolled_back_to`, the previous
        mode, brought back after its VRAM was proven free, or (a failed heal) in
        `settle_in`, the mode that stayed active. `switch`: the switch that failed, when
        a roll back has taken its place as the running transition."""
        tr, gpu = switch or entry.transition, entry.gpu
        timings["total_s"] = time.monotonic() - t0
        mode = rolled_back_to or settle_in or IDLE_MODE
        st = self._state.gpu(gpu)
        if st.mode != mode or st.mode_since is None:
            st.mode_since = time.time()
        st.mode = mode
        st.failure = {"id": tr.id, "to": tr.to_mode, "error": error, "at": time.time(),
                      "requested_by": tr.requested_by, "rolled_back_to": rolled_back_to}
        await self._record(gpu, None)
        rounded = {k: round(v, 4) for k, v in timings.items()}
        back = ""
        if rolled_back_to:
            back = f"; rolled back to {rolled_back_to}"
            detail = {**detail, "rolled_back_to": rolled_back_to}
        entry.ending = _Ending(
            "mode.switch.failed", f"GPU {gpu}: switch to {tr.to_mode} failed: {error}{back}",
            Severity.ERROR,
            dict(requested_by=tr.requested_by, gpu=gpu, transition_id=tr.id, mode=mode,
                 **_from_to(tr), error=error, rolled_back_to=rolled_back_to,
                 timings=rounded, **entry.forced, **entry.audit()),
        )
        return SwitchResult(False, gpu, tr.from_mode, tr.to_mode, tr.id, rounded,
                            error + back, detail)

    async def _verify_release(
        self, tr: Transition, gpu: int, released: set[str], timings: dict[str, float],
        timing: str, *, starting: str, also_free: set[str], **fields: Any,
    ) -> Verdict:
        """Wait for the released workloads' VRAM (timed as `timings[timing]`) and say how
        it went: `release.verified`, or `release.timeout` and `starting` is not started.
        `also_free`: workloads about to start, which must hold nothing either (what a
        crashed one left behind)."""
        t = time.monotonic()
        verdict = await self._verify(gpu, released | also_free, tr)
        seconds = timings[timing] = time.monotonic() - t
        common: dict[str, Any] = {
            "requested_by": tr.requested_by, "gpu": gpu, "transition_id": tr.id,
            "workloads": sorted(released), "release_s": round(seconds, 4),
            "used_mib": verdict.used_mib, "allowed_mib": verdict.allowed_mib}
        if verdict.clear:
            # "Free" would mislead: the incoming mode's workloads may hold theirs.
            self._bus.publish("release.verified",
                              f"GPU {gpu}: release verified in {seconds * 1000:.0f} ms "
                              f"({verdict.used_mib} MiB in use)", **common, **fields)
        else:
            self._bus.publish(
                "release.timeout",
                f"GPU {gpu}: VRAM not proven free after {seconds:.1f} s: {verdict.reason}; "
                f"{starting} is NOT started", severity=Severity.CRITICAL,
                holders=verdict.holders, **common, **fields)
        return verdict

    async def verify_released(self, gpu: int, released: set[str]) -> Verdict:
        """Wait (up to release.timeout) until `released` hold no VRAM on `gpu`."""
        return await self._verify(gpu, released)

    async def _verify(self, gpu: int, released: set[str],
                      tr: Transition | None = None) -> Verdict:
        """Poll the GPU until the released workloads' VRAM is back, or time out. With
        `tr`, what is left is published about once a second, for followers."""
        rel = self._config.release
        deadline = time.monotonic() + rel.timeout
        reported = 0.0
        while True:
            sample = await asyncio.to_thread(self._sampler)
            verdict = self._verifier.check(sample, gpu, released)
            if verdict.clear or time.monotonic() >= deadline:
                return verdict
            if tr is not None and time.monotonic() - reported >= 1.0:
                reported = time.monotonic()
                left = max(0, verdict.used_mib - verdict.allowed_mib)
                self._bus.publish(
                    "mode.switch.step", f"GPU {gpu}: {left} MiB not back yet: "
                    f"{verdict.reason}", severity=Severity.DEBUG,
                    requested_by=tr.requested_by, gpu=gpu, transition_id=tr.id,
                    step="verifying", left_mib=left, **_from_to(tr))
            await asyncio.sleep(rel.poll_interval)

    async def start_workloads(self, names: list[str], requested_by: str, gpu: int,
                              tid: str) -> tuple[list[str], str | None]:
        """Start workloads one by one, each through the VRAM gate and its readiness check.

        Returns the ones it started (those already running are left as they are), and
        None, or why the first one could not start.
        """
        started: list[str] = []
        for name in names:
            workload = self._workloads[name]
            if name in self._state.blocks:
                return started, f"{name} is blocked after a crash loop"
            async with self._supervisor.lock(name):
                was_running = (await self._supervisor.status(name)).running
                if not was_running:
                    refusal = await self._vram_gate(workload, gpu)
                    if refusal is not None:
                        self._bus.publish("workload.refused", refusal, severity=Severity.ERROR,
                                          requested_by=requested_by, workload=name, gpu=gpu,
                                          transition_id=tid)
                        return started, refusal
                try:
                    await self._supervisor.start_locked(name)
                except WorkloadError as exc:
                    return started, str(exc)
            error = await self._wait_ready(workload)
            if error is not None:
                return started, error
            if not was_running:
                started.append(name)
                self._bus.publish("workload.started", f"{name} started",
                                  requested_by=requested_by, workload=name, gpu=gpu,
                                  transition_id=tid)
        return started, None

    async def _vram_gate(self, workload: Workload, gpu: int) -> str | None:
        """Refuse a start into a card without the workload's `expected_mib` free."""
        need = workload.config.expected_mib
        if not need:
            return None
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
            status = await self._supervisor.status(workload.name)
            if not status.running:
                why = f"{workload.name} exited while starting ({status.detail})"
                if isinstance(workload, ProcessWorkload):
                    # What it said last is usually the reason (a wrong model path).
                    said = await asyncio.to_thread(workload.last_output)
                    why += (f"; it said: {said}" if said else "") + \
                        f" (its output: {workload.log_path})"
                return why
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
            # A first boot has nothing to restore: it starts the default mode.
            what = "restore" if st.transition is not None or st.mode else \
                "start the default mode"
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
                self._bus.publish("mode.switch.failed", f"GPU {gpu}: cannot {what} {target}: "
                                  f"{exc}", severity=Severity.ERROR, gpu=gpu, to=target,
                                  requested_by=requested_by, error=str(exc))

    async def _report_drift(self, gpu: int, target: str) -> None:
        keep = self._workloads_of(target)
        names = self.workloads_on(gpu)
        statuses = await self._supervisor.statuses(names)
        strays = sorted(n for n in names if statuses[n].running and n not in keep)
        missing = sorted(n for n in keep if not statuses[n].running)
        if strays:
            self._bus.publish(
                "mode.drift",
                f"GPU {gpu}: {', '.join(strays)} running outside mode {target}; stopping them",
                severity=Severity.WARNING, gpu=gpu, mode=target, running=strays,
                not_running=missing,
            )

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise ConflictError("gpuwarden is stopping; no switch starts now", {})

    async def close(self) -> None:
        """Refuse new switches and end those under way (a start or stop in progress
        finishes first; see WorkloadSupervisor); the next start recovers them."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
