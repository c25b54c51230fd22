"""Plain, frozen records of what one sampling pass saw. Memory is in bytes."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

__all__ = ["MIB", "GpuFault", "GpuProcess", "GpuSample", "NodeSample"]

MIB = 1024 * 1024


class GpuFault(enum.StrEnum):
    """Why a GPU (or the whole backend) could not be read."""

    LIBRARY_NOT_FOUND = "library_not_found"  # libnvidia-ml.so is not installed
    DRIVER_NOT_LOADED = "driver_not_loaded"  # the kernel module is not loaded
    DRIVER_MISMATCH = "driver_mismatch"  # library/kernel version mismatch (reload the module)
    NO_PERMISSION = "no_permission"
    NOT_SUPPORTED = "not_supported"
    LOST = "lost"  # fell off the bus; needs a reset or a reboot
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process holding memory on a GPU, by host PID (NVML reports host PIDs)."""

    pid: int
    used_bytes: int | None  # None where the driver does not say (MIG, WDDM)
    kind: str = "compute"  # "compute" | "graphics"

    @property
    def used_mib(self) -> int | None:
        return None if self.used_bytes is None else self.used_bytes // MIB


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one instant. With `fault` set, only index/uuid/name are meaningful."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    reserved_bytes: int = 0  # driver/firmware reservation, apart from `used` (memory info v2)
    util_gpu_pct: int | None = None
    temp_c: int | None = None
    power_w: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    fault: GpuFault | None = None
    fault_detail: str = ""
    taken_at: float = 0.0  # time.monotonic() of the read

    @property
    def ok(self) -> bool:
        return self.fault is None

    @property
    def total_mib(self) -> int:
        return self.total_bytes // MIB

    @property
    def used_mib(self) -> int:
        return self.used_bytes // MIB

    @property
    def free_mib(self) -> int:
        return self.free_bytes // MIB

    @property
    def used_fraction(self) -> float:
        return self.used_bytes / self.total_bytes if self.total_bytes else 0.0


@dataclass(frozen=True, slots=True)
class NodeSample:
    """Every GPU of the node from one pass; `fault` set when the backend itself failed."""

    gpus: tuple[GpuSample, ...]
    fault: GpuFault | None = None
    fault_detail: str = ""
    taken_at: float = 0.0  # time.monotonic() at the start of the pass
    duration_s: float = 0.0
    # Unix time the pass ended, for people and for other machines' clocks.
    taken_at_wall: float = field(default_factory=time.time)

    def gpu(self, index: int) -> GpuSample | None:
        for sample in self.gpus:
            if sample.index == index:
                return sample
        return None
