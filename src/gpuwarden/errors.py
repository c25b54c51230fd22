"""Every error gpuwarden raises on purpose.

* GpuwardenError
  x ConfigError          -- the configuration is invalid (each problem by key path)
  x WorkloadError        -- a workload could not be started, stopped or inspected
  x RefusedError         -- a request was understood and refused (why is in the message)
    - NotFoundError      -- it names a mode or workload that does not exist
    - ConflictError      -- it collides with something already happening
  x DaemonUnreachable    -- the CLI found no daemon answering on the socket or URL
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConflictError",
    "DaemonUnreachable",
    "GpuwardenError",
    "NotFoundError",
    "RefusedError",
    "WorkloadError",
]


class GpuwardenError(Exception):
    """Base of every error gpuwarden raises on purpose."""


class ConfigError(GpuwardenError):
    """The configuration is invalid; `problems` lists each one as 'key.path: message'."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"invalid configuration {source}".rstrip()
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


class WorkloadError(GpuwardenError):
    """A workload could not be started, stopped or inspected."""


class RefusedError(GpuwardenError):
    """A request was understood and refused; the message says why."""

    def __init__(self, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.detail = detail


class NotFoundError(RefusedError):
    """The request names a mode or workload that does not exist."""


class ConflictError(RefusedError):
    """The request collides with something already happening (a running switch, a block)."""


class DaemonUnreachable(GpuwardenError):
    """No gpuwarden daemon answered on the control socket or URL; `denied` when one
    may be there but this user may not talk to it (the socket's permissions)."""

    def __init__(self, message: str, *, denied: bool = False) -> None:
        super().__init__(message)
        self.denied = denied
