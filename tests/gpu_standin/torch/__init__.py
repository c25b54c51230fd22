"""Stand-in for the slice of PyTorch the acceptance holder uses: `torch.empty` on
"cuda", `torch.uint8`, and `torch.cuda` (see `cuda.py`). Memory is simulated on the
card in `standin_device`; nothing is really allocated.
"""

from __future__ import annotations

from . import cuda

__all__ = ["Tensor", "cuda", "empty", "uint8"]


class _Dtype:
    def __init__(self, name: str, itemsize: int) -> None:
        self.name, self.itemsize = name, itemsize

    def __repr__(self) -> str:
        return f"torch.{self.name}"


uint8 = _Dtype("uint8", 1)


class Tensor:
    """A CUDA tensor's footprint: its bytes stay allocated until it is collected."""

    def __init__(self, count: int, dtype: _Dtype) -> None:
        self._count, self._bytes = count, 0
        cuda._allocator.allocate(count * dtype.itemsize)
        self._bytes = count * dtype.itemsize

    def numel(self) -> int:
        return self._count

    def __del__(self) -> None:
        if self._bytes and cuda is not None:  # module globals may be gone at shutdown
            cuda._allocator.free(self._bytes)


def empty(count: int, *, dtype: _Dtype = uint8, device: str = "cpu") -> Tensor:
    if not str(device).startswith("cuda"):
        raise NotImplementedError("the stand-in only allocates on cuda")
    return Tensor(count, dtype)
