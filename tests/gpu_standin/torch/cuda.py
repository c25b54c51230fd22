"""Stand-in `torch.cuda`: a CUDA context and a caching allocator over the simulated
card. Like PyTorch's, the allocator keeps freed blocks reserved (and visible to NVML)
until `empty_cache()`, and rounds each block up to 2 MiB.
"""

from __future__ import annotations

import atexit
import os

import standin_device as device

__all__ = ["OutOfMemoryError", "empty_cache", "init", "is_available", "mem_get_info",
           "synchronize"]

_BLOCK = 2 * device.MIB


class OutOfMemoryError(RuntimeError):
    pass


class _CachingAllocator:
    def __init__(self) -> None:
        self.started = False
        self.allocated = 0  # bytes in live tensors
        self.reserved = 0  # bytes taken from the card: allocated plus the cache

    def start(self) -> None:
        if not self.started:
            if device.folder() is None:
                raise RuntimeError("Found no NVIDIA driver on your system")
            device.start(os.getpid())
            atexit.register(device.mark_gone, os.getpid())
            self.started = True

    def _publish(self) -> None:
        device.record(os.getpid(), device.CONTEXT_BYTES + self.reserved)

    def allocate(self, size: int) -> None:
        self.start()
        size = -(-size // _BLOCK) * _BLOCK
        cached = self.reserved - self.allocated
        grow = max(0, size - cached)
        if grow:
            free = device.TOTAL_BYTES - device.RESERVED_BYTES - device.used_bytes()
            if grow > free:
                raise OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {size // device.MIB} MiB "
                    f"({free // device.MIB} MiB free)")
            self.reserved += grow
        self.allocated += size
        self._publish()

    def free(self, size: int) -> None:
        self.allocated -= -(-size // _BLOCK) * _BLOCK

    def empty_cache(self) -> None:
        if self.started:
            self.reserved = self.allocated
            self._publish()


_allocator = _CachingAllocator()


def is_available() -> bool:
    return device.folder() is not None


def init() -> None:
    _allocator.start()


def synchronize() -> None:
    _allocator.start()


def empty_cache() -> None:
    _allocator.empty_cache()


def mem_get_info() -> tuple[int, int]:
    """(free, total) bytes of the card, as cudaMemGetInfo reports them."""
    _allocator.start()
    used = device.RESERVED_BYTES + device.used_bytes()
    return device.TOTAL_BYTES - used, device.TOTAL_BYTES
