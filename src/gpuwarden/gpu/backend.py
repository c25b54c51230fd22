"""The one interface both GPU backends offer, and the factory that picks one."""

from __future__ import annotations

from typing import Protocol

from ..config import Config
from .model import NodeSample

__all__ = ["GpuBackend", "open_backend"]


class GpuBackend(Protocol):
    """Reads every GPU of the node. `sample()` blocks and never raises."""

    name: str

    def sample(self) -> NodeSample: ...

    def close(self) -> None: ...


def open_backend(config: Config) -> GpuBackend:
    """The backend named by `gpu.backend`; nothing is read until the first sample."""
    if config.gpu.backend == "sim":
        from .sim import SimBackend

        sim = config.gpu.sim
        return SimBackend(
            sim.ledger_dir,
            total_mib=sim.total_mib,
            count=sim.count,
            release_delay=sim.release_delay,
            gpu_name=sim.name,
        )
    from .nvml import NvmlBackend

    return NvmlBackend()
