"""Every start and stop gpuwarden makes, one at a time per workload, and why each stopped.

The mode switcher, the mode guard, the crash-loop guard and protective actions all act
on workloads through this. A lock per workload serializes their actions: a decision
taken while holding it ("this one runs outside its mode, stop it") cannot be overtaken
by a start another part has in flight, and the reverse. Each stop gpuwarden makes is
remembered with its reason, so status can say why a workload is down.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .base import Workload, WorkloadState, WorkloadStatus

__all__ = ["StopRecord", "WorkloadSupervisor", "describe_stop"]

_T = TypeVar("_T")


async def _to_the_end(action: Callable[[], _T]) -> _T:
    """Run a blocking start or stop in a thread and await its end even when cancelled.

    A thread cannot be cancelled: a start already under way spawns its process anyway.
    Returning early would release the workload's lock while that happens, and whoever
    takes it next (the mode guard, the daemon's shutdown) would decide on a workload
    about to change under it, or miss a child it must stop. So the cancel waits."""
    running = asyncio.ensure_future(asyncio.to_thread(action))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        while not running.done():
            try:
                await asyncio.shield(running)
            except asyncio.CancelledError:
                continue  # cancelled again: still wait for the thread
            except BaseException:  # its own failure; the cancel is what the caller gets
                break
        raise


@dataclass(frozen=True, slots=True)
class StopRecord:
    """A stop gpuwarden made itself."""

    at: float  # unix seconds the stop was asked for
    by: str  # "switch", "mode guard", "crash-loop guard", "protective action"
    reason: str  # for people: "switch to image (id 3f2a…)"
    requested_by: str | None = None


class WorkloadSupervisor:
    """Starts and stops workloads (blocking calls in threads), one action at a time each."""

    def __init__(self, workloads: dict[str, Workload]) -> None:
        self._workloads = workloads
        self._locks: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in workloads}
        self._stops: dict[str, StopRecord] = {}

    def lock(self, name: str) -> asyncio.Lock:
        """Held for the whole of one start or stop of `name`, and by whoever decides one."""
        # setdefault: a reload may add workloads.
        return self._locks.setdefault(name, asyncio.Lock())

    async def status(self, name: str) -> WorkloadStatus:
        return await asyncio.to_thread(self._workloads[name].status)

    async def statuses(self, names: list[str]) -> dict[str, WorkloadStatus]:
        found = await asyncio.gather(*(self.status(n) for n in names))
        return dict(zip(names, found, strict=True))

    async def start_locked(self, name: str) -> WorkloadStatus:
        """Start `name`; the caller holds its lock. Raises WorkloadError."""
        status = await _to_the_end(self._workloads[name].start)
        self._stops.pop(name, None)
        return status

    async def stop_locked(self, name: str, *, by: str, reason: str,
                          requested_by: str | None = None, grace: float | None = None,
                          before: WorkloadStatus | None = None) -> WorkloadStatus:
        """Stop `name`; the caller holds its lock. Raises WorkloadError.

        `grace`: seconds it has to end before it is killed (default: its stop_timeout).
        `before`: its status, when the caller has just read it under the lock.
        A workload that is already down is stopped all the same (a crashed leader may
        have left children holding VRAM), but its stop record keeps saying why it went
        down in the first place."""
        if before is None:
            before = await self.status(name)
        if before.running or before.state is WorkloadState.UNKNOWN:
            self._stops[name] = StopRecord(time.time(), by, reason, requested_by)
        workload = self._workloads[name]
        return await _to_the_end(lambda: workload.stop(grace))

    async def stop(self, name: str, *, by: str, reason: str,
                   requested_by: str | None = None) -> WorkloadStatus:
        async with self._locks[name]:
            return await self.stop_locked(name, by=by, reason=reason,
                                          requested_by=requested_by)

    def note_stop(self, name: str, *, by: str, reason: str) -> None:
        """Remember a stop made outside stop_locked (the daemon's start stopping what
        an earlier daemon left running), so status says why the workload is down."""
        self._stops[name] = StopRecord(time.time(), by, reason)

    def last_stop(self, name: str) -> StopRecord | None:
        return self._stops.get(name)


def _signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def describe_stop(status: WorkloadStatus, record: StopRecord | None,
                  blocked_reason: str | None, blocked_at: float | None) -> dict[str, Any] | None:
    """Why and when a workload that is not running stopped, or None while it runs.

    gpuwarden's own stop explains it unless the workload was started again since (a
    container started by hand that then died): then its exit does.
    """
    if status.running:
        return None
    exit_code = status.exit_code
    sig: str | None = None
    if exit_code is not None and exit_code < 0:
        sig = _signal_name(-exit_code)  # a process workload killed by a signal
    elif exit_code is not None and exit_code > 128:
        sig = _signal_name(exit_code - 128)  # a shell's / Docker's 128+N convention
    if status.oom_killed:
        cause = "killed for lack of memory (OOM)"
    elif sig is not None and exit_code is not None and exit_code < 0:
        cause = f"killed by {sig}"
    elif exit_code is not None:
        cause = f"exited with code {exit_code}" + (f" ({sig})" if sig else "")
    else:
        cause = status.detail or str(status.state)
    doc: dict[str, Any] = {"at": status.finished_at, "by": "exit", "reason": cause,
                           "exit_code": exit_code, "signal": sig, "oom": status.oom_killed,
                           "requested_by": None}
    if record is not None and (status.started_at is None or status.started_at <= record.at):
        doc.update(at=record.at, by=record.by, reason=f"stopped by {record.by}: "
                   f"{record.reason}", requested_by=record.requested_by)
    if blocked_reason is not None:
        doc.update(by="crash-loop guard", reason=f"blocked after a crash loop "
                   f"({blocked_reason})", at=blocked_at if doc["at"] is None else doc["at"])
    return doc
