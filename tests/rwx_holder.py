#!/usr/bin/env python3
"""A process workload that needs what gpuwarden's sandbox forbids: it maps memory
writable and executable (as a JIT compiler such as Triton does), then holds
simulated VRAM. Standard library only.

    rwx_holder.py LEDGER NAME MIB REPORT

Under MemoryDenyWriteExecute= the mapping fails (EPERM) and it exits 1 before it
claims anything. Otherwise it writes REPORT (JSON: its user, pid, whether the RWX
mapping worked), claims MIB in LEDGER/NAME.mib (open and flocked, as the simulated
GPU's ledger asks of another user's process) and waits for SIGTERM.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import pwd
import signal
import sys
from pathlib import Path


def main() -> int:
    ledger, name, mib, report = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    try:
        code = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        code.write(b"\xc3")  # a `ret`, written into memory that may be executed
    except OSError as exc:
        print(f"cannot map RWX memory: {exc}", file=sys.stderr, flush=True)
        return 1
    claim = ledger / f"{name}.mib"
    claim.write_text(f"{mib}\n")
    held = open(claim)  # noqa: SIM115 - held until the end
    fcntl.flock(held, fcntl.LOCK_SH)
    Path(report).write_text(json.dumps({"user": pwd.getpwuid(os.getuid()).pw_name,
                                        "pid": os.getpid(), "rwx": True}))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
