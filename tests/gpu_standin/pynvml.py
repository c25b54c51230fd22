"""Stand-in for nvidia-ml-py's `pynvml`: the calls gpuwarden and its scripts make, with
the real library's names, error codes and record shapes, answered from the simulated
card in `standin_device` (which says how to use it). Not installed anywhere: tests put
this folder on PYTHONPATH for the processes that should see a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import standin_device as device

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_TEMPERATURE_GPU = 0
nvmlMemory_v2 = 0x02000028

_initialised = 0


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {
            NVML_ERROR_UNINITIALIZED: "Uninitialized",
            NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
            NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        }.get(self.value, f"NVML error {self.value}")


# The records carry the real library's class and field names.


@dataclass
class c_nvmlMemory_t:
    total: int
    free: int
    used: int


@dataclass
class c_nvmlMemory_v2_t:
    version: int
    total: int
    reserved: int
    free: int
    used: int


@dataclass
class c_nvmlProcessInfo_t:
    pid: int
    usedGpuMemory: int | None
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass
class c_nvmlUtilization_t:
    gpu: int
    memory: int


@dataclass(frozen=True)
class _Handle:
    index: int


def _ready() -> None:
    if not _initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def _check(handle: object) -> None:
    _ready()
    if handle != _Handle(0):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)


def nvmlInit() -> None:
    global _initialised
    if device.folder() is None:
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    _initialised += 1


def nvmlShutdown() -> None:
    global _initialised
    _ready()
    _initialised -= 1


def nvmlSystemGetDriverVersion() -> str:
    _ready()
    return device.DRIVER


def nvmlDeviceGetCount() -> int:
    _ready()
    return 1


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    _ready()
    if index != 0:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _Handle(0)


def nvmlDeviceGetName(handle: _Handle) -> str:
    _check(handle)
    return device.NAME


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    _check(handle)
    return device.UUID


def nvmlDeviceGetMemoryInfo(handle: _Handle, version: int | None = None
                            ) -> c_nvmlMemory_t | c_nvmlMemory_v2_t:
    _check(handle)
    used = device.used_bytes()
    if version is None:  # v1 counts the driver's reservation as used
        used_v1 = used + device.RESERVED_BYTES
        return c_nvmlMemory_t(total=device.TOTAL_BYTES, free=device.TOTAL_BYTES - used_v1,
                              used=used_v1)
    if version != nvmlMemory_v2:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return c_nvmlMemory_v2_t(version=version, total=device.TOTAL_BYTES,
                             reserved=device.RESERVED_BYTES,
                             free=device.TOTAL_BYTES - device.RESERVED_BYTES - used, used=used)


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[c_nvmlProcessInfo_t]:
    _check(handle)
    return [c_nvmlProcessInfo_t(pid=pid, usedGpuMemory=used) for pid, used in device.processes()]


def nvmlDeviceGetGraphicsRunningProcesses(handle: _Handle) -> list[c_nvmlProcessInfo_t]:
    _check(handle)
    return []


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> c_nvmlUtilization_t:
    _check(handle)
    return c_nvmlUtilization_t(gpu=0 if not device.processes() else 35, memory=0)


def nvmlDeviceGetTemperature(handle: _Handle, sensor: int) -> int:
    _check(handle)
    return 34


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:
    _check(handle)
    return 118_000  # milliwatts
