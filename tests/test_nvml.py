"""The NVML backend: against a real GPU where there is one; its failure states anywhere."""

from __future__ import annotations

import shutil
import subprocess

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
