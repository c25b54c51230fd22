"""When demand waiting at a proxy gets the GPU: the policy, one scheduler per GPU.

A demand request for the active mode goes through at once and counts as in flight
until its answer has been sent. One for another mode waits here, in arrival order,
while the scheduler decides when to switch. It switches to the mode of the oldest
waiting request (so neither side starves) only when all of these hold:

- no switch runs on the GPU (a manual one included: it is the operator's);
- no request is in flight to the active mode;
- the active mode's ComfyUI has no job running or queued (its `/queue`, read now;
  unreadable counts as busy), unless the waiting mode has the higher priority and
  its proxy may preempt;
- the active mode has had the GPU for its minimum dwell, if an operator switched to
  it by hand, or demand did and it is still in use (a request in flight, or one that
  ended less than 5 s ago). Demand's mode, idle for 5 s, holds nothing up; idle
  holds nothing.

Once the active mode has had its dwell and another mode waits, new demand for the
active mode waits too (it drains), so a steady stream on one side cannot hold the
other off for ever: a side's wait is bounded by the dwell plus the finite work in
flight. The switch itself is the service's, with every gate it has (blocks, queue,
VRAM fit, verified release); the requests are let through in arrival order once it
has succeeded, and answered 503 with its reason when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import RefusedError
from ..events import EventBus, Severity
from ..workloads.release import QueueUnreadable

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..service import ProxyView, Service

__all__ = ["ROUTER", "DemandScheduler", "ModePolicy", "Rejection", "Ticket"]

log = logging.getLogger(__name__)

# How often a waiting queue is looked at again without news (dwell ends, jobs finish).
_POLL_S = 0.5
# A mode demand switched to, with no demand for this long, is idle: its dwell no
# longer holds the GPU (at most its dwell).
_IDLE_GRACE_S = 5.0
# How long a read of ComfyUI's queue may take before it counts as busy.
_QUEUE_TIMEOUT_S = 5.0


# The model router's name where a proxy's would be: its switches are requested_by
# "router:<client>".
ROUTER = "router"

class Rejection(Exception):
    """A demand request answered 503: why, and when to try again."""

    def __init__(self, reason: str, cause: str, *, retry_after: int, mode: str,
                 active: str, waited_s: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause  # max_wait | queue_full | blocked | switch_failed | stopping
        self.retry_after = retry_after
        self.mode = mode
        self.active = active
        self.waited_s = waited_s

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.reason, "cause": self.cause, "mode": self.mode,
                "active_mode": self.active, "waited_s": round(self.waited_s, 3),
                "retry_after_s": self.retry_after}


@dataclass(frozen=True)
class ModePolicy:
    """What the scheduler needs to know of a mode (from its proxies' config)."""

    dwell_s: float  # minimum time it keeps the GPU while it has work
    priority: int  # its workloads' highest priority
    preempt: bool  # its demand may interrupt a lower-priority mode's ComfyUI jobs


@dataclass(eq=False)
class _Waiter:
    mode: str
    proxy: str
    workload: str
    client: str
    request: str  # "POST /api/chat"
    arrived: float  # monotonic
    future: asyncio.Future[None] = field(repr=False)


class Ticket:
    """A demand request let through: in flight until `done()` (its answer sent).

    A switch that would stop its workload is refused while it is in flight, unless
    forced: then `abort()` ends its answer with an error in the answer's own format."""

    def __init__(self, scheduler: DemandScheduler, mode: str, *, proxy: str, workload: str,
                 client: str, request: str) -> None:
        self._scheduler, self.mode, self._open = scheduler, mode, True
        self.proxy, self.workload, self.client, self.request = proxy, workload, client, request
        self.since = time.time()
        self.aborted: str | None = None  # why a forced switch ended it
        self.on_abort: Callable[[], object] | None = None  # set by the proxy forwarding it
        scheduler._tickets.add(self)

    def describe(self) -> dict[str, Any]:
        return {"proxy": self.proxy, "workload": self.workload, "client": self.client,
                "request": self.request, "mode": self.mode,
                "for_s": round(time.time() - self.since, 1)}

    def abort(self, reason: str) -> None:
        if self._open and self.aborted is None:
            self.aborted = reason
            if self.on_abort is not None:
                self.on_abort()

    def done(self) -> None:
        if self._open:
            self._open = False
            self._scheduler._tickets.discard(self)
            self._scheduler._finished(self.mode)


class DemandScheduler:
    """The demand policy for one GPU (see the module's docstring)."""

    def __init__(self, gpu: int, anchor: str, service: Service, bus: EventBus,
                 policies: dict[str, ModePolicy], metrics: Metrics | None = None) -> None:
        self.gpu = gpu
        self._anchor = anchor  # a proxied workload on this GPU, to read the GPU's state by
        self._service = service
        self._bus = bus
        self._policies = policies
        self._metrics = metrics
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._in_flight: dict[str, int] = {}
        self._tickets: set[Ticket] = set()  # the demand requests in flight
        self._blocker: dict[str, str] = {}  # why each waiting mode still waits
        self._retry_after: dict[str, float] = {}  # and for about how long, in seconds
        self._failed: dict[str, tuple[float, str]] = {}  # a failed switch's hold, and why
        self._queue_error = ""
        self._last_demand: dict[str, float] = {}  # when each mode's last request ended
        self._last_demand_wall: dict[str, float] = {}  # the same, in Unix seconds
        self._demand_entered: dict[str, float | None] = {}  # mode_since of demand's switches
        self._wake = asyncio.Event()
        self._switch: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- front side: the proxies ----------------------------------------------

    async def admit(self, mode: str, *, proxy: str, workload: str, client: str,
                    request: str, max_wait: float, max_waiting: int) -> Ticket:
        """Let a demand request for `mode` through now, or when its mode has the GPU.

        Raises:
            Rejection: its workload is blocked, the queue is full, it waited longer than
                `max_wait`, or the switch for it failed.
        """
        view = self._service.proxy_view(workload)
        blocks = self._blocks_of(mode)
        if blocks is not None:
            raise self._reject(mode, proxy, client, request, Rejection(
                blocks, "blocked", retry_after=60, mode=mode, active=view.mode))
        failed = self._failed.get(mode)
        if failed is not None and view.mode != mode:
            left = failed[0] - time.monotonic()
            if left > 0:
                raise self._reject(mode, proxy, client, request, Rejection(
                    f"{failed[1]}; not tried again for {math.ceil(left)} s", "switch_failed",
                    retry_after=max(1, math.ceil(left)), mode=mode, active=view.mode))
            del self._failed[mode]
        if self._may_pass(mode, workload, view):
            return self._ticket(mode, proxy=proxy, workload=workload, client=client,
                                request=request)
        queue = self._waiting.setdefault(mode, deque())
        if sum(1 for w in queue if w.proxy == proxy) >= max_waiting:
            raise self._reject(mode, proxy, client, request, Rejection(
                f"the queue for mode {mode!r} is full: {max_waiting} request(s) already wait "
                f"(max_waiting)", "queue_full", retry_after=10, mode=mode, active=view.mode))
        waiter = _Waiter(mode, proxy, workload, client, request, time.monotonic(),
                         asyncio.get_running_loop().create_future())
        queue.append(waiter)
        if len(queue) == 1:
            self._blocker.pop(mode, None)
            self._retry_after.pop(mode, None)
            self._bus.publish(
                "proxy.waiting",
                f"GPU {self.gpu}: {request} from {client} waits for mode {mode} "
                f"({self._why_not_now(mode, workload, view)})", proxy=proxy, mode=mode,
                gpu=self.gpu,
                active_mode=view.mode, client=client, request=request)
        self._gauge(proxy)
        self._wake.set()
        try:
            async with asyncio.timeout(max_wait):
                await asyncio.shield(waiter.future)
        except TimeoutError:
            self._forget(waiter)
            if waiter.future.done() and not waiter.future.cancelled() and \
                    waiter.future.exception() is None:
                return self._observe_wait(waiter)  # let through as the time ran out
            waited = time.monotonic() - waiter.arrived
            reason = self._blocker.get(mode) or f"mode {view.mode} keeps the GPU"
            # When to try again: about when what holds it off should be over.
            retry = math.ceil(self._retry_after.get(mode, 10.0))
            raise self._reject(mode, proxy, client, request, Rejection(
                f"waited {waited:.0f} s for mode {mode!r} (max_wait): {reason}", "max_wait",
                retry_after=max(1, min(retry, 300)), mode=mode,
                active=self._service.proxy_view(workload).mode, waited_s=waited)) from None
        except asyncio.CancelledError:  # the client went away
            self._forget(waiter)
            if waiter.future.done() and not waiter.future.cancelled() and \
                    waiter.future.exception() is None:
                self._finished(mode)  # it was let through: give its place back
            raise
        return self._observe_wait(waiter)

    def in_flight_to(self, workloads: set[str]) -> list[Ticket]:
        """The demand requests in flight to any of `workloads`, oldest first."""
        return sorted((t for t in self._tickets if t.workload in workloads),
                      key=lambda t: t.since)

    def waiting(self, mode: str | None = None, proxy: str | None = None) -> list[float]:
        """Ages (s) of the requests waiting, oldest first, for a mode and/or proxy."""
        now = time.monotonic()
        return [now - w.arrived for queue in self._waiting.values() for w in queue
                if (mode is None or w.mode == mode) and (proxy is None or w.proxy == proxy)]

    def in_flight(self, mode: str) -> int:
        return self._in_flight.get(mode, 0)

    def last_used(self, mode: str) -> float | None:
        """When `mode` was last in use by demand (Unix s): now while a request of it is
        in flight, else when its last one ended; None if never."""
        if self._in_flight.get(mode):
            return time.time()
        return self._last_demand_wall.get(mode)

    def busy(self) -> int:
        """Requests waiting for a mode plus demand requests in flight."""
        return sum(len(queue) for queue in self._waiting.values()) + len(self._tickets)

    def blocker(self, mode: str) -> str | None:
        return self._blocker.get(mode) if self._waiting.get(mode) else None

    # -- the loop ---------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        for task in (self._task, self._switch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        now = time.monotonic()
        active = self._view().mode
        for mode, queue in self._waiting.items():
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.set_exception(Rejection(
                        "gpuwarden is stopping; ask again once it is back (systemctl status "
                        "gpuwarden)", "stopping", retry_after=10, mode=mode, active=active,
                        waited_s=now - waiter.arrived))

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_POLL_S if any(self._waiting.values()) else None):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._decide()
            except Exception:  # a bug must not stop the queue for good
                log.exception("demand scheduler of GPU %d", self.gpu)

    async def _decide(self) -> None:
        """One look at the GPU: let requests through, start a switch, or note why not."""
        if self._switch is not None:
            return
        waiting = {m: q for m, q in self._waiting.items() if q}
        if not waiting:
            return
        view = self._view()
        if view.switching_to is not None:
            for mode in waiting:
                self._blocker[mode] = f"a switch to {view.switching_to} is under way"
            return
        active = view.mode
        others = sorted((q[0].arrived, m) for m, q in waiting.items() if m != active)
        target = others[0][1] if others else None
        now = time.time()
        if active in waiting and not (target is not None and self._dwell_over(view, now)):
            if self._runs(active):
                self._let_through(active)
            else:  # demand for the active mode, whose workload is down: heal it
                self._start_switch(active, view, force=False)
                return
        if target is None:
            return
        blocks = self._blocks_of(target)
        if blocks:
            self._reject_all(target, blocks, "blocked", retry_after=60)
            return
        preempt = self._may_preempt(target, active)
        reasons: list[tuple[str, float]] = []  # why it waits, and for about how long
        busy = self.in_flight(active)
        if busy:
            reasons.append((f"GPU busy with {busy} request(s) to mode {active}", 10.0))
        if not preempt and not self._dwell_ok(view, now):
            left = self._dwell(active) - (now - (view.mode_since or now))
            last = self._last_demand.get(active)
            if self._demand_entered.get(active) == view.mode_since and last is not None \
                    and not busy:
                # Demand's mode is left once idle for the grace, before its dwell ends.
                grace = min(_IDLE_GRACE_S, self._dwell(active))
                idle = time.monotonic() - last
                left = min(left, grace - idle)
                reasons.append((f"mode {active} had a request {idle:.0f} s ago: it keeps "
                                f"the GPU until idle for {grace:g} s "
                                f"({max(1, math.ceil(left))} s more)", left))
            else:
                reasons.append((f"mode {active} keeps the GPU for its minimum dwell "
                                f"({max(1, math.ceil(left))} s more)", left))
        if not preempt:
            jobs = await self._jobs(active)
            if jobs is None:
                reasons.append((self._queue_error, 10.0))
            elif jobs:
                reasons.append((f"GPU busy with {jobs} image job(s) in mode {active}", 30.0))
        if reasons:
            self._blocker[target] = "; ".join(text for text, _ in reasons)
            self._retry_after[target] = max(seconds for _, seconds in reasons)
            return
        # Re-read after the wait: a request may have passed, or left, meanwhile.
        if self.in_flight(active) or not self._waiting.get(target) or \
                self._switch is not None:
            return
        self._start_switch(target, view, force=preempt)

    # -- the parts of a decision -------------------------------------------------

    def _view(self) -> ProxyView:
        return self._service.proxy_view(self._anchor)

    def _runs(self, mode: str) -> bool:
        """Every workload the waiting requests of `mode` go to runs."""
        return all(self._service.proxy_view(w.workload).running for w in self._waiting[mode])

    def _may_pass(self, mode: str, workload: str, view: ProxyView) -> bool:
        if view.mode != mode or view.switching_to is not None or not view.running:
            return False
        if self._waiting.get(mode) or self._switch is not None:
            return False  # behind those already waiting
        # Draining: another mode waits and this one has had its dwell.
        return not (any(q for m, q in self._waiting.items() if m != mode)
                    and self._dwell_over(view, time.time()))

    def _why_not_now(self, mode: str, workload: str, view: ProxyView) -> str:
        """Why a request for `mode` was not let through at once (see `_may_pass`)."""
        if view.switching_to is not None:
            return f"a switch to {view.switching_to} is under way"
        if view.mode != mode:
            return f"mode {view.mode} is active"
        if not view.running:
            return f"mode {mode} is active, but {workload} is not running"
        if self._switch is not None:
            return "a switch is under way"
        others = sorted(m for m, q in self._waiting.items() if q and m != mode)
        if others:
            return f"mode {mode} has had its dwell, and mode {others[0]} waits"
        return "behind the requests already waiting"

    def _dwell(self, mode: str) -> float:
        policy = self._policies.get(mode)
        if policy is not None:
            return policy.dwell_s
        # A mode without a proxy: the longest dwell of the proxied modes.
        return max((p.dwell_s for p in self._policies.values()), default=0.0)

    def _dwell_over(self, view: ProxyView, now: float) -> bool:
        return view.mode_since is None or now - view.mode_since >= self._dwell(view.mode)

    def _dwell_ok(self, view: ProxyView, now: float) -> bool:
        """Whether the active mode may be left now, as far as its dwell goes. A mode
        switched to by hand (or restored at start) keeps the GPU for its dwell; one that
        demand switched to keeps it only while it is in use: once it has had no demand
        for a few seconds, holding an idle GPU would only make the other side wait."""
        if view.mode == "idle" or self._dwell_over(view, now):
            return True
        if self._demand_entered.get(view.mode) != view.mode_since:
            return False  # entered by hand: the operator's choice holds for the dwell
        if self.in_flight(view.mode):
            return False
        last = self._last_demand.get(view.mode)
        grace = min(_IDLE_GRACE_S, self._dwell(view.mode))
        return last is None or time.monotonic() - last >= grace

    def _may_preempt(self, target: str, active: str) -> bool:
        policy, current = self._policies.get(target), self._policies.get(active)
        if policy is None or not policy.preempt:
            return False
        return policy.priority > (current.priority if current is not None else
                                  self._service.config.mode_priority(active))

    def _blocks_of(self, mode: str) -> str | None:
        blocked = []
        for name in self._service.workload_names(mode):
            reason = self._service.block_of(name)
            if reason is not None:
                blocked.append(f"{name} is blocked after a crash loop ({reason}); "
                               f"gpuwarden unblock {name}")
        return "; ".join(blocked) or None

    async def _jobs(self, mode: str) -> int | None:
        """The jobs running or queued in `mode`'s ComfyUI (None: unreadable, and why in
        `_queue_error`)."""
        total = 0
        for name in self._service.workload_names(mode):
            if not self._service.proxy_view(name).running:
                continue
            try:
                jobs = await self._service.queued_jobs(name, _QUEUE_TIMEOUT_S)
            except QueueUnreadable as exc:
                self._queue_error = f"cannot tell whether {name} has jobs ({exc})"
                return None
            total += jobs
        return total

    # -- outcomes -------------------------------------------------------------

    def _ticket(self, mode: str, *, proxy: str, workload: str, client: str,
                request: str) -> Ticket:
        self._in_flight[mode] = self._in_flight.get(mode, 0) + 1
        return Ticket(self, mode, proxy=proxy, workload=workload, client=client,
                      request=request)

    def _finished(self, mode: str) -> None:
        self._last_demand[mode] = time.monotonic()
        self._last_demand_wall[mode] = time.time()
        self._in_flight[mode] = max(0, self._in_flight.get(mode, 0) - 1)
        if self._in_flight[mode] == 0 and any(self._waiting.values()):
            self._wake.set()  # what waits for the GPU to be free may go on

    def _let_through(self, mode: str) -> None:
        """Every waiting request of `mode`, in arrival order."""
        queue = self._waiting.pop(mode, deque())
        self._blocker.pop(mode, None)
        for waiter in queue:
            if not waiter.future.done():
                # Counted in flight now, before its handler runs: the scheduler must not
                # switch away between the two.
                self._in_flight[mode] = self._in_flight.get(mode, 0) + 1
                waiter.future.set_result(None)
            self._gauge(waiter.proxy)

    def _observe_wait(self, waiter: _Waiter) -> Ticket:
        if self._metrics is not None:
            self._metrics.proxy_wait.labels(waiter.proxy).observe(
                time.monotonic() - waiter.arrived)
        # Counted in flight by _let_through.
        return Ticket(self, waiter.mode, proxy=waiter.proxy, workload=waiter.workload,
                      client=waiter.client, request=waiter.request)

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.mode)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
        self._gauge(waiter.proxy)
        self._wake.set()  # a switch nobody waits for any more is not started

    def _reject(self, mode: str, proxy: str, client: str, request: str,
                rejection: Rejection) -> Rejection:
        self._bus.publish(
            "proxy.rejected", f"GPU {self.gpu}: {request} from {client} for mode {mode} "
            f"answered 503: {rejection.reason}", severity=Severity.WARNING, proxy=proxy,
            mode=mode, gpu=self.gpu, client=client, request=request,
            cause=rejection.cause, reason=rejection.reason,
            waited_s=round(rejection.waited_s, 3))
        if self._metrics is not None:
            self._metrics.proxy_rejected.labels(proxy, rejection.cause).inc()
        return rejection

    def _reject_all(self, mode: str, reason: str, cause: str, *, retry_after: int) -> None:
        if cause == "switch_failed":
            # Not tried again at once: each try stops what runs now (a client retrying
            # a broken model would unload and reload the working one again and again).
            self._failed[mode] = (time.monotonic() + retry_after, reason)
        queue = self._waiting.pop(mode, deque())
        self._blocker.pop(mode, None)
        now = time.monotonic()
        active = self._view().mode
        for waiter in queue:
            if waiter.future.done():
                continue
            waiter.future.set_exception(self._reject(
                mode, waiter.proxy, waiter.client, waiter.request, Rejection(
                    reason, cause, retry_after=retry_after, mode=mode, active=active,
                    waited_s=now - waiter.arrived)))
            waiter.future.exception()  # retrieved here; its handler re-raises it
            self._gauge(waiter.proxy)

    def _gauge(self, proxy: str) -> None:
        if self._metrics is not None:
            self._metrics.proxy_waiting.labels(proxy).set(len(self.waiting(proxy=proxy)))

    # -- the switch ---------------------------------------------------------------

    def _start_switch(self, target: str, view: ProxyView, *, force: bool) -> None:
        first = self._waiting[target][0]
        cause = {"proxy": first.proxy, "request": first.request, "client": first.client,
                 "waiting": len(self._waiting[target]), "from": view.mode,
                 "waited_s": round(time.monotonic() - first.arrived, 3),
                 "preempted": force}
        self._blocker[target] = f"switching to {target}"
        self._switch = asyncio.get_running_loop().create_task(
            self._do_switch(target, f"{ROUTER if first.proxy == ROUTER else 'proxy'}:"
                                    f"{first.client}", cause, force))

    async def _do_switch(self, target: str, requested_by: str, cause: dict[str, Any],
                         force: bool) -> None:
        try:
            result = await self._service.switch_mode(
                target, gpu=self.gpu, requested_by=requested_by, force=force, cause=cause)
        except RefusedError as exc:
            if isinstance(exc.detail, dict) and (exc.detail.get("jobs") is not None
                                                 or "id" in exc.detail):
                # Jobs came in meanwhile, or another switch started: try again later.
                self._blocker[target] = str(exc)
            else:
                self._reject_all(target, f"switch to {target} refused: {exc}",
                                 "switch_failed", retry_after=30)
        except Exception as exc:
            log.exception("demand switch to %s", target)
            self._reject_all(target, f"switch to {target} failed: {exc!r}", "switch_failed",
                             retry_after=30)
        else:
            if result.ok:
                # Entered for demand: its dwell holds only while it is in use.
                self._demand_entered[target] = self._service.proxy_view(self._anchor).mode_since
                if self._metrics is not None:
                    self._metrics.proxy_switches.labels(str(self.gpu), target).inc()
                if self._runs_now(target):
                    self._let_through(target)
            else:
                self._reject_all(target, f"switch to {target} failed: {result.error}",
                                 "switch_failed", retry_after=30)
        finally:
            self._switch = None
            self._wake.set()

    def _runs_now(self, mode: str) -> bool:
        return bool(self._waiting.get(mode)) and self._runs(mode)
