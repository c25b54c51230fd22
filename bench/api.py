#!/usr/bin/env python3
"""Benchmark: GET /v1/status latency under load, while the daemon samples at 1 Hz.

    .venv/bin/python bench/api.py [--rate 200] [--seconds 20] [--out bench/out]

Starts the real daemon (sim backend, two process workloads, the TCP listener with a
token) and an open-loop loopback load generator: requests are sent on a fixed
schedule (`--rate` per second), whether or not earlier ones have answered, so a
slow server shows as latency rather than a lower rate. Then a closed-loop phase
(4 clients back to back) finds the highest rate sustained. Writes api.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.harness import DaemonUnderTest  # noqa: E402
from gpuwarden.demo import demo_config  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def open_loop(url: str, rate: float, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=10) as client:
        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                resp = await client.get("/v1/status")
                if resp.status_code != 200:
                    errors += 1
                    return
            except httpx.HTTPError:
                errors += 1
                return
            latencies.append(time.perf_counter() - t)

        tasks = []
        start = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {"target_rps": rate, "requests": total, "errors": errors,
            "achieved_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
            "max_ms": round(max(latencies) * 1000, 3)}


async def closed_loop(url: str, clients: int, seconds: float) -> dict[str, Any]:
    count = 0
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                resp = await client.get("/v1/status")
                latencies.append(time.perf_counter() - t)
                if resp.status_code == 200:
                    count += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"clients": clients, "rps": round(count / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gw-bench-api-"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = demo_config(folder) + f"""
[api]
listen = "127.0.0.1:{port}"
[api.tokens.bench]
token = "{TOKEN}"
"""
    url = f"http://127.0.0.1:{port}"
    with DaemonUnderTest(folder, config, socket=folder / "gpuwarden.sock"):
        time.sleep(1)
        loaded = asyncio.run(open_loop(url, args.rate, args.seconds))
        maximum = asyncio.run(closed_loop(url, 4, 5))
    import os

    report = {"open_loop": loaded, "closed_loop": maximum, "cpus": os.cpu_count(),
              "target": "p99 < 10 ms at 200 req/s on 2 cores", "sample_interval_s": 1.0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "api.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
