"""The device behind the stand-in `pynvml` and `torch` modules in this folder.

These machines have no NVIDIA GPU, yet the acceptance script and the sample benchmark
have code paths that only run against NVML and PyTorch. Putting this folder first on
PYTHONPATH and `GPUWARDEN_STANDIN_GPU` naming a shared folder gives every process (the
daemon, its workloads, the script) one simulated card that behaves like the measured
H200 (figures measured on a real card):

- total 143771 MiB; memory v2 reports 615 MiB driver-reserved apart from `used`;
- a process's VRAM is its CUDA context (500 MiB, taken at `torch.cuda.init`) plus what
  its caching allocator has reserved; NVML lists it by host PID;
- VRAM is back 150 ms after the holding process exits or is killed, not at once, and
  until then NVML lists the process by its PID, which may be gone from /proc already.

Each process records its usage in `<folder>/<pid>.bytes`; whoever first sees the
process gone writes `<folder>/<pid>.gone` with the time, and the usage counts until
that time plus the release delay.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

MIB = 2**20
TOTAL_BYTES = 143771 * MIB
RESERVED_BYTES = 615 * MIB
CONTEXT_BYTES = 500 * MIB
# `GPUWARDEN_STANDIN_RELEASE_DELAY` (seconds) stands for a card slower to free.
RELEASE_DELAY_S = float(os.environ.get("GPUWARDEN_STANDIN_RELEASE_DELAY", "0.15"))
NAME = "NVIDIA H200 (stand-in)"
UUID = "GPU-5a1d0000-0000-4000-8000-standin00000"
DRIVER = "580.95.05 (stand-in)"


def folder() -> Path | None:
    value = os.environ.get("GPUWARDEN_STANDIN_GPU")
    return Path(value) if value else None


def start(pid: int) -> None:
    """A new CUDA process: forget any earlier process that had the same PID."""
    base = folder()
    if base is None:
        raise RuntimeError("GPUWARDEN_STANDIN_GPU is not set")
    with contextlib.suppress(FileNotFoundError):
        (base / f"{pid}.gone").unlink()
    record(pid, CONTEXT_BYTES)


def record(pid: int, used_bytes: int) -> None:
    """This process now holds `used_bytes` of VRAM (0: none)."""
    base = folder()
    if base is None:
        raise RuntimeError("GPUWARDEN_STANDIN_GPU is not set")
    tmp = base / f".{pid}.tmp"
    tmp.write_text(str(used_bytes))
    tmp.replace(base / f"{pid}.bytes")


def mark_gone(pid: int, when: float | None = None) -> None:
    """`pid` has exited; its VRAM comes back RELEASE_DELAY_S after `when`."""
    base = folder()
    if base is None:
        return
    with contextlib.suppress(FileExistsError):
        fd = os.open(base / f"{pid}.gone", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as out:
            out.write(repr(time.time() if when is None else when))


def _alive(pid: int) -> bool:
    # A zombie has torn down its CUDA context already: the driver frees at exit.
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def processes() -> list[tuple[int, int]]:
    """(host PID, bytes) of every process that holds VRAM on the card now."""
    base = folder()
    if base is None:
        return []
    now = time.time()
    found: list[tuple[int, int]] = []
    for path in sorted(base.glob("*.bytes")):
        pid = int(path.stem)
        try:
            used = int(path.read_text() or 0)
        except (OSError, ValueError):
            continue
        gone = base / f"{pid}.gone"
        if not gone.exists() and not _alive(pid):
            mark_gone(pid, now)
        if gone.exists():
            try:
                gone_at = float(gone.read_text() or now)
            except (OSError, ValueError):
                gone_at = now
            if now >= gone_at + RELEASE_DELAY_S:
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
        if used > 0:
            found.append((pid, used))
    return found


def used_bytes() -> int:
    return sum(used for _, used in processes())
