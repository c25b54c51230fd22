"""What every workload kind offers the switcher. All methods block: call them in a thread."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from ..config import WorkloadConfig

__all__ = ["Workload", "WorkloadState", "WorkloadStatus"]


class WorkloadState(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    MISSING = "missing"  # docker: no container of that name
    UNKNOWN = "unknown"  # cannot tell (Docker unreachable)


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    state: WorkloadState
    detail: str = ""
    pid: int | None = None  # root process (host PID) while running
    container_id: str | None = None
    exit_code: int | None = None
    restart_policy: str | None = None
    restart_count: int | None = None
    # Stopped without gpuwarden asking (process workloads; Docker crashes come as events).
    crashed: bool = False
    oom_killed: bool = False  # docker: the kernel's OOM killer ended it
    started_at: float | None = None  # unix seconds of the last start, where known
    finished_at: float | None = None  # unix seconds it last stopped, where known

    @property
    def running(self) -> bool:
        return self.state is WorkloadState.RUNNING


class Workload(Protocol):
    name: str
    kind: str
    config: WorkloadConfig

    def status(self) -> WorkloadStatus:
        """Current state; never raises (an unreachable backend is UNKNOWN)."""
        ...

    def start(self) -> WorkloadStatus:
        """Start it (a no-op when running). Raises WorkloadError with the reason."""
        ...

    def stop(self, grace: float | None = None) -> WorkloadStatus:
        """Stop it within `grace` seconds (default: its `stop_timeout`), then kill.
        Raises WorkloadError if it survives."""
        ...

    def close(self) -> None:
        """Release what the workload object holds (clients, handles); not the workload."""
        ...
