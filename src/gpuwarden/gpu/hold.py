"""Hold simulated VRAM: `python -m gpuwarden.gpu.hold --ledger DIR --name NAME --mib N`.

Writes the claim `<ledger>[/gpu<N>]/<name>.mib` and keeps it open (and flocked, so a
daemon running as another user finds it too) until the process ends (SIGTERM,
SIGINT, or `--exit-after`, unless the file `--unless-exists` names exists). With
`--leak` the claim keeps counting after the process is gone, until the file is
deleted: a driver that never frees.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuwarden.gpu.hold", description=__doc__)
    parser.add_argument("--ledger", required=True, type=Path, help="the sim ledger_dir")
    parser.add_argument("--name", required=True, help="claim name (file <name>.mib)")
    parser.add_argument("--mib", required=True, type=int, help="MiB to hold")
    parser.add_argument("--gpu", type=int, default=0, help="simulated GPU index")
    parser.add_argument("--leak", action="store_true", help="the claim outlives the process")
    parser.add_argument("--exit-after", type=float, default=None, help="exit after N seconds")
    parser.add_argument("--exit-code", type=int, default=0, help="exit status for --exit-after")
    parser.add_argument("--unless-exists", type=Path, default=None, metavar="PATH",
                        help="ignore --exit-after once PATH exists (a crash that is fixed)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                        help="run COMMAND and hold the claim for as long as it runs (a real "
                             "engine on the simulated GPU); SIGTERM and SIGINT go to it, "
                             "and its exit status is this one's")
    args = parser.parse_args(argv)
    if args.mib < 0:
        parser.error("--mib must be >= 0")
    folder = args.ledger if args.gpu == 0 else args.ledger / f"gpu{args.gpu}"
    folder.mkdir(parents=True, exist_ok=True)
    claim = folder / f"{args.name}.mib"
    claim.write_text(f"{args.mib}{' leak' if args.leak else ''}\n", encoding="ascii")
    fd = os.open(claim, os.O_RDONLY)  # the open descriptor is what holds the VRAM
    fcntl.flock(fd, fcntl.LOCK_SH)  # ... and the lock is what any user can see of it

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        try:
            return _run_holding(command, claim, fd, args.mib)
        finally:
            os.close(fd)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"holding {args.mib} MiB as {claim} (pid {os.getpid()})", flush=True)
    try:
        fixed = args.unless_exists is not None and args.unless_exists.exists()
        if args.exit_after is not None and not fixed:
            time.sleep(args.exit_after)
            return int(args.exit_code)
        while True:
            signal.pause()
    finally:
        os.close(fd)


def _run_holding(command: list[str], claim: Path, fd: int, mib: int) -> int:
    """Run `command` as a child, the claim held (by `fd`) until it exits."""
    child = subprocess.Popen(command)  # the claim's descriptor is not inherited

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(f"holding {mib} MiB as {claim} (pid {os.getpid()}) while pid {child.pid} runs",
          flush=True)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
