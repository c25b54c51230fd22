#!/usr/bin/env python3
"""A VRAM holder for the acceptance run: real CUDA memory (PyTorch) or a sim claim.

    acceptance_holder.py --backend torch|sim --name NAME [--mib N] [--ledger DIR] [--control]

Prints JSON lines: {"event": "held", "mib": ..., "torch_free_mib": ..., "torch_total_mib":
..., "time": ...} after each allocation, and {"event": "exiting", "time": ...} on
SIGTERM. With --control it reads commands from stdin: "set MIB" (hold exactly MIB,
allocating or freeing the difference) and "quit".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any


def emit(**fields: Any) -> None:
    print(json.dumps({**fields, "pid": os.getpid(), "time": time.time()}), flush=True)


class TorchHeld:
    def __init__(self) -> None:
        import torch

        self.torch = torch
        torch.cuda.init()
        self.blocks: list[Any] = []
        self.mib = 0

    def set(self, mib: int) -> None:
        torch = self.torch
        # Free first, and hand the freed blocks back to the driver before growing: the
        # caching allocator would otherwise serve the new tensors from them, and NVML
        # would go on seeing the whole cached segments.
        while self.mib > mib and self.blocks:
            # No name may keep the tensor alive: it must be free before empty_cache().
            self.mib -= self.blocks.pop().numel() // 2**20
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        chunk = 1024  # MiB per tensor, so that a step down frees whole tensors
        while self.mib < mib:
            n = min(chunk, mib - self.mib)
            self.blocks.append(torch.empty(n * 2**20, dtype=torch.uint8, device="cuda"))
            self.mib += n
        torch.cuda.synchronize()

    def view(self) -> dict[str, int]:
        free, total = self.torch.cuda.mem_get_info()
        return {"torch_free_mib": free // 2**20, "torch_total_mib": total // 2**20}


class SimHeld:
    def __init__(self, ledger: Path, name: str) -> None:
        ledger.mkdir(parents=True, exist_ok=True)
        self.path = ledger / f"{name}.mib"
        self.path.write_text("0\n")
        self.fd = os.open(self.path, os.O_RDONLY)
        self.mib = 0

    def set(self, mib: int) -> None:
        self.path.write_text(f"{mib}\n")
        self.mib = mib

    def view(self) -> dict[str, int]:
        return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["torch", "sim"], required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--mib", type=int, default=0)
    parser.add_argument("--ledger", type=Path)
    parser.add_argument("--control", action="store_true")
    args = parser.parse_args()

    def stop(signum: int, frame: FrameType | None) -> None:
        emit(event="exiting", name=args.name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    if args.backend == "torch":
        held: TorchHeld | SimHeld = TorchHeld()
    else:
        if args.ledger is None:
            parser.error("--backend sim needs --ledger")
        held = SimHeld(args.ledger, args.name)
    held.set(args.mib)
    emit(event="held", name=args.name, mib=held.mib, **held.view())
    if not args.control:
        while True:
            signal.pause()
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] == "set":
            held.set(max(0, int(words[1])))
            emit(event="held", name=args.name, mib=held.mib, **held.view())
    emit(event="exiting", name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
