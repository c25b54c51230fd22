#!/usr/bin/env python3
"""`gpuwarden fleet status`: wall time for 2 and 10 nodes, and with one unreachable.

    .venv/bin/python bench/fleet.py [--runs 10]

Starts 10 real daemons on simulated GPUs, each with its TCP API and a token, lists
them in a nodes file, and times the CLI (a fresh process each run, as a person runs
it) over the first 2, over all 10, and over the 10 plus a node that accepts
connections and never answers (--timeout 2). Writes fleet.json to bench/out (or $OUT).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DaemonUnderTest, base_config, free_port, write_report

OUT = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "out"))
TOKEN = "f" * 40




def timed(env: dict[str, str], *args: str) -> tuple[float, int]:
    t = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gpuwarden.cli", "fleet", "status", *args],
                            env=env, capture_output=True, text=True, timeout=60)
    return time.perf_counter() - t, result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gw-bench-fleet-"))
    daemons: list[DaemonUnderTest] = []
    ports: list[int] = []
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        for i in range(10):
            folder = root / f"node{i}"
            folder.mkdir()
            (folder / "ledger").mkdir()
            port = free_port()
            config = base_config(folder, folder / "ledger", default_mode="idle") + f"""
[api]
listen = "127.0.0.1:{port}"
[api.tokens.fleet]
token = "{TOKEN}"
"""
            daemons.append(DaemonUnderTest(folder, config))
            ports.append(port)
        for daemon in daemons:
            daemon.wait_healthy()

        def nodes_file(count: int, unreachable: bool) -> dict[str, str]:
            path = root / f"nodes-{count}-{int(unreachable)}.toml"
            text = "".join(f'[nodes.node{i}]\nurl = "http://127.0.0.1:{ports[i]}"\n'
                           f'token = "{TOKEN}"\n\n' for i in range(count))
            if unreachable:
                text += (f'[nodes.silent]\nurl = "http://127.0.0.1:'
                         f'{silent.getsockname()[1]}"\n')
            path.write_text(text)
            return {**os.environ, "GPUWARDEN_NODES": str(path)}

        report: dict[str, object] = {"runs": args.runs}
        for label, count, unreachable, extra in (("2_nodes", 2, False, ()),
                                                 ("10_nodes", 10, False, ()),
                                                 ("10_nodes_1_unreachable", 10, True,
                                                  ("--timeout", "2"))):
            env = nodes_file(count, unreachable)
            times, codes = [], set()
            for _ in range(args.runs):
                seconds, code = timed(env, *extra)
                times.append(seconds)
                codes.add(code)
            report[f"{label}_wall_s_median"] = round(statistics.median(times), 3)
            report[f"{label}_wall_s_max"] = round(max(times), 3)
            report[f"{label}_exit_codes"] = sorted(codes)
        write_report(args.out, "fleet", report)
    finally:
        silent.close()
        for daemon in daemons:
            daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
