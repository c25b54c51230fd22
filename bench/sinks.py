#!/usr/bin/env python3
"""Benchmark: outbound delivery through the durable outbox to a real loopback receiver.

    .venv/bin/python bench/sinks.py [--events 5000] [--out bench/out]

An n8n sink (signed, SQLite outbox in a temp folder) and an aiohttp receiver on
127.0.0.1 that answers 204. Measures:

* latency from publish to the receiver's answer, healthy, events at 100/s;
* sustained events/s into one receiver (`--events` published at once);
* bytes on disk per 1,000 queued events (receiver down): the database with its
  write-ahead log, and the database alone after a checkpoint;
* time from the receiver coming back to its backlog of 1,000 drained (backoff_max
  0.5 s, so the first retry after it is back comes within half a second).

Writes sinks.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import write_report  # noqa: E402
from gpuwarden.config import DeliveryConfig  # noqa: E402
from gpuwarden.events import Event, EventBus, Severity  # noqa: E402
from gpuwarden.sinks import N8nSink  # noqa: E402
from tests.standins import free_port  # noqa: E402

SECRET = "whsec_YmVuY2htYXJrLXNlY3JldC0wMTIzNDU2Nzg5"


class Discard:
    def write(self, event: Event) -> None:
        """The audit log is not what is measured here."""


class Receiver:
    """Answers 204 and notes when each event arrived (by its id)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.arrived: dict[int, float] = {}
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _hook(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.arrived.setdefault(int(doc["id"]), time.time())
        return web.Response(status=204)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _publish(bus: EventBus, i: int) -> Event:
    # A realistic alert: figures and top holders, about 600 bytes of JSON.
    return bus.publish(
        "vram.tier", f"GPU 0 VRAM at 91 % (event {i})", severity=Severity.ERROR, gpu=0,
        uuid="GPU-3bb37d76-d0e6-d88d-0000", used_mib=18600, total_mib=20480,
        used_fraction=0.9082, holders=[
            {"pid": 4242, "used_mib": 12000, "workload": "comfyui", "command": "python"},
            {"pid": 4343, "used_mib": 6000, "workload": "ollama", "command": "ollama"}],
        **{"from": "warn", "to": "alert"})


async def _until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("the receiver never got every event")
        await asyncio.sleep(0.005)


async def run(events: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="gw-bench-sinks-"))
    port = free_port()
    receiver = Receiver(port)
    await receiver.start()
    cfg = DeliveryConfig(queue_size=max(events, 1000) + 10, backoff_base=0.05,
                         backoff_max=0.5, timeout=5)
    bus = EventBus(Discard())
    bus.bind_loop(asyncio.get_running_loop())
    async with httpx.AsyncClient() as client:
        sink = N8nSink(f"http://127.0.0.1:{port}/hook", SECRET, cfg, bus, client,
                       Severity.INFO, folder / "outbox")
        await sink.start()
        bus.subscribe(sink.offer)

        # 1. Latency, healthy, at 100 events/s.
        published: dict[int, float] = {}
        for i in range(500):
            event = _publish(bus, i)
            published[event.id] = event.time
            await asyncio.sleep(0.01)
        await _until(lambda: all(k in receiver.arrived for k in published), 60)
        latency_ms = sorted((receiver.arrived[k] - t) * 1000 for k, t in published.items())

        # 2. Sustained rate: `events` at once, until the last one arrived.
        receiver.arrived.clear()
        t0 = time.time()
        ids = [_publish(bus, i).id for i in range(events)]
        await _until(lambda: ids[-1] in receiver.arrived and len(receiver.arrived) >= events,
                     600)
        rate = events / (max(receiver.arrived.values()) - t0)

        await sink.close()
        await receiver.stop()

        # 3. Bytes on disk per 1,000 queued: a fresh outbox, its receiver down.
        backlog_bus = EventBus(Discard())
        backlog_bus.bind_loop(asyncio.get_running_loop())
        backlog_sink = N8nSink(f"http://127.0.0.1:{port}/hook", SECRET, cfg, backlog_bus,
                               client, Severity.INFO, folder / "backlog")
        await backlog_sink.start()
        backlog_bus.subscribe(backlog_sink.offer)
        receiver = Receiver(port)
        backlog = [_publish(backlog_bus, i).id for i in range(1000)]
        await _until(lambda: backlog_sink.queued >= 1000, 60)
        await _until(lambda: backlog_sink.failing_since is not None, 60)
        on_disk = _bytes(folder / "backlog")  # the database and its write-ahead log
        data = _checkpointed_bytes(backlog_sink.outbox_path)

        # 4. Back up: time until the backlog is drained.
        await receiver.start()
        t_up = time.monotonic()
        await _until(lambda: all(k in receiver.arrived for k in backlog), 600)
        drain_s = time.monotonic() - t_up
        await backlog_sink.close()
        await receiver.stop()
    return {
        "latency_ms_p50": round(statistics.median(latency_ms), 2),
        "latency_ms_p99": round(latency_ms[int(len(latency_ms) * 0.99) - 1], 2),
        "latency_ms_max": round(latency_ms[-1], 2),
        "target_p99_ms": 50,
        "sustained_events_per_s": round(rate, 1),
        "sustained_events": events,
        "bytes_on_disk_per_1000_queued": on_disk,
        "bytes_per_1000_queued_after_checkpoint": data,
        "backlog_1000_drain_s": round(drain_s, 3),
        "backoff_max_s": cfg.backoff_max,
    }


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.sqlite*"))


def _checkpointed_bytes(path: Path) -> int:
    """The database file alone once its write-ahead log is folded in: the events' own
    size (the log is bounded at 4 MiB)."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    write_report(args.out, "sinks", asyncio.run(run(args.events)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
