"""The NVML backend: against a real GPU where there is one; its failure states anywhere."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

from gpuwarden.gpu.model import GpuFault
from gpuwarden.gpu.nvml import NvmlBackend, fault_of


def _has_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
        pynvml.nvmlShutdown()
        return count > 0
    except Exception:
        return False


HAS_GPU = _has_gpu()


def test_nvml_errors_map_to_fault_states() -> None:
    import pynvml

    assert fault_of(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)) is GpuFault.LOST
    assert fault_of(pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)) is \
        GpuFault.DRIVER_NOT_LOADED
    assert fault_of(pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)) is \
        GpuFault.LIBRARY_NOT_FOUND
    assert fault_of(RuntimeError("x")) is GpuFault.UNKNOWN


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU; the no-GPU path is not reachable")
def test_without_a_gpu_the_backend_reports_a_fault_not_a_crash() -> None:
    backend = NvmlBackend()
    sample = backend.sample()
    assert sample.gpus == ()
    assert sample.fault in (GpuFault.LIBRARY_NOT_FOUND, GpuFault.DRIVER_NOT_LOADED,
                            GpuFault.UNKNOWN)
    assert sample.fault_detail
    backend.close()


@pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU on this machine (NVML found none)")
def test_real_gpu_sample_agrees_with_nvidia_smi() -> None:
    backend = NvmlBackend()
    sample = backend.sample()
    assert sample.fault is None and sample.gpus
    gpu = sample.gpus[0]
    assert gpu.total_bytes > 0 and gpu.used_bytes + gpu.free_bytes <= gpu.total_bytes
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                              "nounits", "-i", "0"], capture_output=True, text=True, check=True)
        assert abs(int(out.stdout.strip()) - gpu.total_mib) <= 1
    backend.close()


# -- the backend's logic against a stand-in driver ---------------------------------------
# The GPU is the one part these machines cannot have: this stand-in answers the pynvml
# calls the backend makes, with the real library's error codes and record shapes.

MIB = 2**20


class StandInNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class Record:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class StandInGpu:
    def __init__(self, name: str, total_mib: int, *, v2: bool = True,
                 temperature: bool = True) -> None:
        self.name, self.total, self.v2, self.temperature = name, total_mib * MIB, v2, temperature
        self.used = 0
        self.reserved = 615 * MIB
        self.compute: list[Record] = []
        self.graphics: list[Record] = []
        self.lost = False


class StandInNvml:
    """The subset of pynvml the backend calls, over a list of StandInGpu."""

    NVMLError = StandInNvmlError
    nvmlMemory_v2 = 0x02000028

    def __init__(self, gpus: list[StandInGpu], *, driver_loaded: bool = True) -> None:
        self.gpus = gpus
        self.driver_loaded = driver_loaded
        self.inits = 0

    def _gpu(self, handle: int) -> StandInGpu:
        gpu = self.gpus[handle]
        if gpu.lost:
            raise StandInNvmlError(15)  # NVML_ERROR_GPU_IS_LOST
        return gpu

    def nvmlInit(self) -> None:
        if not self.driver_loaded:
            raise StandInNvmlError(9)  # NVML_ERROR_DRIVER_NOT_LOADED
        self.inits += 1

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index)
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-standin-{handle}".encode()  # older bindings return bytes

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> Record:
        gpu = self._gpu(handle)
        if version is not None:
            if not gpu.v2:
                raise StandInNvmlError(13)  # NVML_ERROR_FUNCTION_NOT_FOUND
            free = gpu.total - gpu.used - gpu.reserved
            return Record(total=gpu.total, used=gpu.used, free=free, reserved=gpu.reserved)
        used = gpu.used + gpu.reserved  # v1 counts the driver's reservation as used
        return Record(total=gpu.total, used=used, free=gpu.total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Record]:
        return self._gpu(handle).compute

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Record]:
        return self._gpu(handle).graphics

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Record:
        return Record(gpu=87, memory=40)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        if not self._gpu(handle).temperature:
            raise StandInNvmlError(3)  # NVML_ERROR_NOT_SUPPORTED
        return 61

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 250_000  # milliwatts


def test_nvml_backend_reads_memory_v2_falls_back_to_v1_and_merges_processes() -> None:
    a = StandInGpu("NVIDIA H200", 143771)
    b = StandInGpu("NVIDIA RTX 4000 Ada", 20475, v2=False, temperature=False)
    a.used = 6000 * MIB
    a.compute = [Record(pid=10, usedGpuMemory=5000 * MIB)]
    a.graphics = [Record(pid=10, usedGpuMemory=5000 * MIB), Record(pid=11, usedGpuMemory=None)]
    b.used = 1000 * MIB
    backend = NvmlBackend(StandInNvml([a, b]))
    node = backend.sample()
    assert node.fault is None and len(node.gpus) == 2
    first, second = node.gpus
    assert first.uuid == "GPU-standin-0" and first.name == "NVIDIA H200"
    assert first.used_mib == 6000 and first.reserved_bytes == 615 * MIB  # v2: apart
    assert [(p.pid, p.used_mib, p.kind) for p in first.processes] == [
        (10, 5000, "compute"), (11, None, "graphics")]
    assert first.util_gpu_pct == 87 and first.temp_c == 61 and first.power_w == 250.0
    assert second.used_mib == 1000 + 615 and second.reserved_bytes == 0  # v1 fallback
    assert second.temp_c is None and second.ok  # not supported is data, not a fault
    backend.close()


def test_nvml_lost_gpu_is_a_fault_state_and_is_picked_up_again() -> None:
    import gpuwarden.gpu.nvml as nvml_module
    from gpuwarden.config import ThresholdsConfig
    from gpuwarden.events import Event, EventBus
    from gpuwarden.gpu.attribution import AttributedSample
    from gpuwarden.watchdog import Watchdog

    class Collect:
        def __init__(self) -> None:
            self.events: list[Event] = []

        def write(self, event: Event) -> None:
            self.events.append(event)

    a, b = StandInGpu("A", 20475), StandInGpu("B", 20475)
    library = StandInNvml([a, b])
    backend = NvmlBackend(library)
    audit = Collect()
    watchdog = Watchdog(ThresholdsConfig(), EventBus(audit))
    watchdog.observe(AttributedSample(backend.sample(), {}))
    b.lost = True
    node = backend.sample()
    assert node.gpus[0].ok and node.gpus[1].fault is GpuFault.LOST
    watchdog.observe(AttributedSample(node, {}))
    b.lost = False  # reset, driver reloaded
    original = nvml_module._INIT_RETRY_S
    nvml_module._INIT_RETRY_S = 0.0
    try:
        node = backend.sample()  # NVML started afresh after the loss
    finally:
        nvml_module._INIT_RETRY_S = original
    assert all(g.ok for g in node.gpus) and library.inits == 2
    watchdog.observe(AttributedSample(node, {}))
    errors = [e for e in audit.events if e.name == "gpu.error"]
    assert [e.fields.get("fault") for e in errors] == ["lost", None]
    assert errors[1].fields["recovered"] is True and errors[0].fields["gpu"] == 1


def test_nvml_driver_not_loaded_is_a_node_fault_retried_later() -> None:
    library = StandInNvml([StandInGpu("A", 20475)], driver_loaded=False)
    backend = NvmlBackend(library)
    node = backend.sample()
    assert node.gpus == () and node.fault is GpuFault.DRIVER_NOT_LOADED
    library.driver_loaded = True
    assert backend.sample().fault is GpuFault.DRIVER_NOT_LOADED  # not retried at once
    backend._init_failed_at -= 10  # the retry interval (5 s) has passed
    assert backend.sample().fault is None
