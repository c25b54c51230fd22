"""The GPU as the daemon sees it: samples from NVML or from the simulated node."""

from .backend import GpuBackend, open_backend
from .model import GpuFault, GpuProcess, GpuSample, NodeSample

__all__ = ["GpuBackend", "GpuFault", "GpuProcess", "GpuSample", "NodeSample", "open_backend"]
