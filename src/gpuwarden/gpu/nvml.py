"""The real GPU backend over NVML (the `pynvml` module of nvidia-ml-py).

This is the only module that imports pynvml. Every NVML call goes through
`NvmlBackend._call`; NVML errors become `GpuFault` states on the sample, never
exceptions into the daemon. All calls block (microseconds, but a wedged driver can
hang them), so the daemon runs `sample()` in a worker thread.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .model import GpuFault, GpuProcess, GpuSample, NodeSample

__all__ = ["NvmlBackend", "fault_of"]

# How long a failed nvmlInit is left alone before it is tried again.
_INIT_RETRY_S = 5.0

# NVML return codes (nvml.h); kept here so the mapping works without the library.
_FAULTS: dict[int, GpuFault] = {
    3: GpuFault.NOT_SUPPORTED,
    4: GpuFault.NO_PERMISSION,
    9: GpuFault.DRIVER_NOT_LOADED,
    12: GpuFault.LIBRARY_NOT_FOUND,
    15: GpuFault.LOST,
    16: GpuFault.LOST,  # reset required
    18: GpuFault.DRIVER_MISMATCH,
}
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_FUNCTION_NOT_FOUND = 13
_ARGUMENT_VERSION_MISMATCH = 25


def fault_of(exc: BaseException) -> GpuFault:
    """The fault an NVML error stands for (UNKNOWN for anything unexpected)."""
    return _FAULTS.get(getattr(exc, "value", -1), GpuFault.UNKNOWN)


@dataclass
class _Device:
    """Static facts of one GPU, cached after the first successful read."""

    handle: Any
    uuid: str
    name: str
    memory_v2: bool = True


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """Samples every GPU through NVML; initialises once and keeps the handles."""

    name = "nvml"

    def __init__(self, library: ModuleType | Any = None) -> None:
        """`library`: the pynvml module, imported on first use when not given (tests
        pass a stand-in for a driver they do not have)."""
        self._lock = threading.Lock()
        self._library = library
        self._nvml: Any = None
        self._devices: list[_Device] | None = None
        self._init_fault: tuple[GpuFault, str] | None = None
        self._init_failed_at = -_INIT_RETRY_S
        self._reinit_at = -_INIT_RETRY_S

    def _init(self) -> None:
        pynvml = self._library
        if pynvml is None:
            try:
                pynvml = importlib.import_module("pynvml")
            except ImportError as exc:
                self._init_fault = (GpuFault.LIBRARY_NOT_FOUND,
                                    f"nvidia-ml-py is not installed: {exc}")
                return
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            devices = []
            for index in range(count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                devices.append(
                    _Device(
                        handle=handle,
                        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                        name=_text(pynvml.nvmlDeviceGetName(handle)),
                    )
                )
        except pynvml.NVMLError as exc:
            self._init_fault = (fault_of(exc), f"NVML initialisation failed: {exc}")
            return
        self._nvml, self._devices, self._init_fault = pynvml, devices, None

    def sample(self) -> NodeSample:
        """One pass over every GPU. Never raises: failures are faults in the result."""
        started = time.monotonic()
        with self._lock:
            if self._devices is None and started - self._init_failed_at >= _INIT_RETRY_S:
                self._init()
                if self._devices is None:
                    self._init_failed_at = started
            if self._devices is None or self._nvml is None:
                fault, detail = self._init_fault or (GpuFault.UNKNOWN, "NVML not initialised")
                return NodeSample(gpus=(), fault=fault, fault_detail=detail, taken_at=started)
            gpus = tuple(self._read(i, dev, self._nvml) for i, dev in enumerate(self._devices))
            if any(g.fault is GpuFault.LOST for g in gpus) and \
                    started - self._reinit_at >= _INIT_RETRY_S:
                # A lost GPU's handle stays dead: start NVML afresh on the next sample, in
                # case the GPU came back (reset, driver reload).
                self._reinit_at = started
                self._shutdown()
        return NodeSample(gpus=gpus, taken_at=started, duration_s=time.monotonic() - started)

    def _read(self, index: int, dev: _Device, nvml: Any) -> GpuSample:
        now = time.monotonic()
        try:
            total, used, free, reserved = self._memory(dev, nvml)
            processes = self._processes(dev, nvml)
        except nvml.NVMLError as exc:
            return GpuSample(
                index=index, uuid=dev.uuid, name=dev.name, total_bytes=0, used_bytes=0,
                free_bytes=0, fault=fault_of(exc), fault_detail=str(exc), taken_at=now,
            )
        util = self._optional(nvml.nvmlDeviceGetUtilizationRates, dev.handle, nvml)
        temp = self._optional(nvml.nvmlDeviceGetTemperature, dev.handle, nvml, 0)
        power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, dev.handle, nvml)
        return GpuSample(
            index=index,
            uuid=dev.uuid,
            name=dev.name,
            total_bytes=total,
            used_bytes=used,
            free_bytes=free,
            reserved_bytes=reserved,
            util_gpu_pct=None if util is None else int(util.gpu),
            temp_c=None if temp is None else int(temp),
            power_w=None if power_mw is None else power_mw / 1000.0,
            processes=processes,
            taken_at=now,
        )

    @staticmethod
    def _memory(dev: _Device, nvml: Any) -> tuple[int, int, int, int]:
        # v1's `used` includes driver-reserved memory (615 MiB on an idle H200); v2
        # reports it apart. Fall back to v1 for good on drivers without v2.
        if dev.memory_v2:
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(dev.handle, version=nvml.nvmlMemory_v2)
                return int(mem.total), int(mem.used), int(mem.free), int(mem.reserved)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) not in (
                    _FUNCTION_NOT_FOUND, _ARGUMENT_VERSION_MISMATCH, _NOT_SUPPORTED
                ):
                    raise
                dev.memory_v2 = False
            except (AttributeError, TypeError):  # bindings too old for the version argument
                dev.memory_v2 = False
        mem = nvml.nvmlDeviceGetMemoryInfo(dev.handle)
        return int(mem.total), int(mem.used), int(mem.free), 0

    @staticmethod
    def _processes(dev: _Device, nvml: Any) -> tuple[GpuProcess, ...]:
        found: dict[int, GpuProcess] = {}
        for kind, fn in (
            ("compute", nvml.nvmlDeviceGetComputeRunningProcesses),
            ("graphics", nvml.nvmlDeviceGetGraphicsRunningProcesses),
        ):
            try:
                procs = fn(dev.handle)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) in (_NOT_SUPPORTED, _NO_PERMISSION):
                    continue
                raise
            for proc in procs:
                used = proc.usedGpuMemory
                if proc.pid not in found:
                    found[proc.pid] = GpuProcess(pid=int(proc.pid), used_bytes=used, kind=kind)
        return tuple(found.values())

    @staticmethod
    def _optional(fn: Any, handle: Any, nvml: Any, *args: Any) -> Any:
        """A reading some GPUs do not offer: None when NVML says so."""
        try:
            return fn(handle, *args)
        except nvml.NVMLError:
            return None

    def _shutdown(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
        self._nvml, self._devices = None, None
        self._init_failed_at = -_INIT_RETRY_S

    def close(self) -> None:
        with self._lock:
            self._shutdown()
