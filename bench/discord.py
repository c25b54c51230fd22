#!/usr/bin/env python3
"""Benchmark: the Discord bot through the real discord.py client.

    .venv/bin/python bench/discord.py [--commands 200] [--alerts 100] [--rounds 5]
                                      [--out bench/out]

The daemon runs in this process (simulated GPU, no workloads); discord.py logs in and
connects to the loopback stand-in of Discord's REST API and gateway that the tests
use (tests/discord_standin.py, its own thread and event loop). Measures:

* `/gpu status`: from the stand-in sending INTERACTION_CREATE to the bot's callback
  POST arriving there, p50/p99 (Discord allows 3 s; target p99 < 300 ms);
* an alert: from `vram.tier` being published to the channel message POST arriving,
  p50/p99 (one every 100 ms, so each goes alone);
* the gateway (and REST) down for 3 s, then back: from it listening again to the
  bot's state being `connected`, median and worst over `--rounds`.

Writes discord.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This file is named discord.py: its own folder on the path would shadow discord.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.harness import base_config, write_report  # noqa: E402
from gpuwarden.config import load_config  # noqa: E402
from gpuwarden.daemon import Daemon  # noqa: E402
from gpuwarden.events import Event, Severity  # noqa: E402
from tests.discord_standin import (  # noqa: E402
    CHANNEL_ID,
    GUILD_ID,
    TOKEN,
    DiscordStandIn,
    point_discord_py_at,
)


class Discard:
    def write(self, event: Event) -> None:
        """The audit log is not what is measured here."""


class SetAttr:
    """`monkeypatch.setattr` for a process that ends after the benchmark."""

    @staticmethod
    def setattr(target: Any, name: str, value: Any) -> None:
        setattr(target, name, value)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[max(0, int(len(ordered) * q) - 1)], 2)


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def run(api: DiscordStandIn, config: Path, commands: int, alerts: int,
              rounds: int) -> dict[str, Any]:
    daemon = Daemon(load_config(config), audit=Discard())
    await daemon.setup()
    service = daemon.service
    assert service is not None

    def state() -> str:
        return str(service.status()["discord"]["state"])

    try:
        await _until(lambda: state() == "connected", 60, "the first connection")
        await _until(lambda: service.status()["discord"]["sync"]["state"] == "ok", 60,
                     "the command sync")

        # 1. /gpu status, INTERACTION_CREATE -> callback POST, one at a time.
        command_ms = []
        for _ in range(commands):
            sent = await api.a_interact("status")
            await _until(lambda: sent.callbacks, 10, "a callback")  # noqa: B023
            command_ms.append((sent.callbacks[0]["at"] - sent.sent_at) * 1000)

        # 2. Alert -> channel message POST.
        alert_ms = []
        for i in range(alerts):
            before = len(api.messages)
            t0 = time.monotonic()
            daemon.bus.publish("vram.tier", f"GPU 0 VRAM 91 % ({i})", severity=Severity.ERROR,
                               gpu=0, **{"from": "warn", "to": "alert"})
            await _until(lambda: len(api.messages) > before, 10, "an alert")  # noqa: B023
            alert_ms.append((api.messages[-1]["at"] - t0) * 1000)
            await asyncio.sleep(0.1)

        # 3. Down for 3 s, then back: listening again -> connected.
        back_s = []
        for _ in range(rounds):
            await asyncio.to_thread(api.refuse)
            await _until(lambda: state() != "connected", 30, "the bot to notice")
            await asyncio.sleep(3)
            t0 = time.monotonic()
            await asyncio.to_thread(api.serve)
            await _until(lambda: state() == "connected", 600, "the reconnection")
            back_s.append(time.monotonic() - t0)
    finally:
        await daemon.cleanup()
    return {
        "status_command_ms_p50": _pct(command_ms, 0.5),
        "status_command_ms_p99": _pct(command_ms, 0.99),
        "status_commands": commands,
        "target_status_p99_ms": 300,
        "alert_to_message_ms_p50": _pct(alert_ms, 0.5),
        "alert_to_message_ms_p99": _pct(alert_ms, 0.99),
        "alerts": alerts,
        "gateway_back_to_connected_s_median": round(statistics.median(back_s), 2),
        "gateway_back_to_connected_s_max": round(max(back_s), 2),
        "outage_rounds": rounds,
        "raw": {"status_command_ms": command_ms, "alert_ms": alert_ms, "back_s": back_s},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--alerts", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("discord").setLevel(logging.CRITICAL)  # a traceback per reconnect
    folder = Path(tempfile.mkdtemp(prefix="gw-bench-discord-"))
    (folder / "ledger").mkdir()
    config = folder / "config.toml"
    config.write_text(base_config(folder, folder / "ledger", default_mode="idle") + f"""
[discord]
token = "{TOKEN}"
guild_id = {GUILD_ID}
allowed_role_ids = [4242]
alert_channel_id = {CHANNEL_ID}
alert_min_severity = "warning"
""")
    api = DiscordStandIn().start()
    point_discord_py_at(api, SetAttr())
    try:
        report = asyncio.run(run(api, config, args.commands, args.alerts, args.rounds))
    finally:
        api.stop()
    write_report(args.out, "discord", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
