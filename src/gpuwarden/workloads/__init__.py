"""Things that hold VRAM and can be started and stopped: Docker containers, processes."""

from .base import Workload, WorkloadState, WorkloadStatus

__all__ = ["Workload", "WorkloadState", "WorkloadStatus"]
