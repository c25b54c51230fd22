#!/usr/bin/env python3
"""Benchmark: a critical VRAM alert switching the GPU through a real n8n.

    .venv/bin/python bench/n8n.py [--rounds 10] [--forgeries 50] [--out bench/out]

The example workflow in a real n8n (scripts/n8n.sh installs the pinned one into
~/.cache/gpuwarden on first use, about 5 minutes), deployed as the README says and as
tests/test_n8n.py does, fed by a real gpuwarden daemon on the simulated GPU with
process workloads. Measures:

* from the `vram.tier` critical event to n8n's `POST /v1/mode` starting the switch at
  gpuwarden (`mode.switch.started`, requested_by api:n8n), p50 and worst of `--rounds`;
* forged events accepted: `--forgeries` requests without the header, with a wrong
  header, unsigned, wrongly signed and replayed; how many started a switch (must be 0);
* events lost across an n8n restart: gpuwarden's events sent while n8n was down (or
  coming back) that never reached a workflow execution (must be 0).

Writes n8n.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import write_report  # noqa: E402
from tests.conftest import DaemonProcess, SimNode, run_cli  # noqa: E402
from tests.test_n8n import (  # noqa: E402
    EVENTS_HEADER,
    N8n,
    _n8n_bin,
    _sign,
    critical_alert_switches,
    deploy_example,
    quiet,
)


def _forge(hook: str, deployed: Any, i: int) -> int:
    body = f'{{"event":"vram.tier","to":"critical","gpu":0,"message":"forged {i}"}}'
    now, msg = int(time.time()), f"msg_forged_{uuid.uuid4().hex}"
    kinds: list[dict[str, str]] = [
        {},
        {EVENTS_HEADER: "wrong"},
        {EVENTS_HEADER: deployed.events_token},
        {EVENTS_HEADER: deployed.events_token, "webhook-id": msg,
         "webhook-timestamp": str(now),
         "webhook-signature": _sign("x" * 32, msg, now, body)},
        {EVENTS_HEADER: deployed.events_token, "webhook-id": msg,
         "webhook-timestamp": str(now - 600),
         "webhook-signature": _sign(deployed.key_text, msg, now - 600, body)},
    ]
    resp = httpx.post(hook, content=body, timeout=30,
                      headers={"content-type": "application/json", **kinds[i % len(kinds)]})
    return resp.status_code


def run(rounds: int, forgeries: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="gw-bench-n8n-"))
    n8n = N8n(_n8n_bin(), folder / "n8n")
    n8n.folder.mkdir()
    node = SimNode(folder)
    daemon: DaemonProcess | None = None
    try:
        deployed = deploy_example(n8n, node, folder, "http://127.0.0.1:9/unused")
        daemon = DaemonProcess(deployed.config, node.socket)
        daemon.wait_ready()
        daemon.wait_mode("image")

        # 1. Alert -> switch, `rounds` times (back to image by hand between rounds).
        seconds = []
        for _ in range(rounds):
            seconds.append(critical_alert_switches(daemon, node))
            daemon.wait_mode("llm")
            assert run_cli("--config", str(deployed.config), "mode", "image").returncode == 0
            deadline = time.monotonic() + 30
            while daemon.status()["gpus"][0]["tier"] != "ok":  # before the next alert
                assert time.monotonic() < deadline
                time.sleep(0.05)

        # 2. Forgeries.
        switches = len(daemon.events("mode.switch.started"))
        statuses = [_forge(deployed.hook, deployed, i) for i in range(forgeries)]
        time.sleep(5)  # what the flow would do, it has done by now
        accepted = len(daemon.events("mode.switch.started")) - switches

        # 3. n8n restarted in the middle of a stream of switches.
        mark = quiet(daemon)
        seen = {e["id"] for e in n8n.executions("gpuwardenExample1")}
        n8n.stop()
        for mode in ("llm", "image", "llm", "image"):
            assert run_cli("--config", str(deployed.config), "mode", mode).returncode == 0
        t0 = time.monotonic()
        n8n.start()
        receiver = f"n8n:{deployed.hook}"
        while True:
            sink = daemon.status()["sinks"]["receivers"][0]
            if sink["queued"] == 0 and sink["state"] == "ok":
                break
            if time.monotonic() - t0 > 180:
                raise SystemExit(f"the backlog did not drain: {sink}")
            time.sleep(0.2)
        drained_s = time.monotonic() - t0
        sent = {e["id"] for e in daemon.events() if e["id"] > mark
                and e["severity"] != "debug"
                and not (e["event"].startswith("sink.") and e.get("sink") == receiver)}
        time.sleep(3)  # executions are listed once they are saved
        got = {n8n.received(e["id"]).get("id") for e in n8n.executions("gpuwardenExample1")
               if e["id"] not in seen}
        lost = sorted(sent - got)
    finally:
        if daemon is not None:
            daemon.stop()
        n8n.stop()
        node.kill_holders()
    return {
        "alert_to_switch_s_p50": round(statistics.median(seconds), 3),
        "alert_to_switch_s_max": round(max(seconds), 3),
        "rounds": rounds,
        "forgeries_sent": forgeries,
        "forgeries_refused_at_the_door": statuses.count(403),
        "forgeries_that_switched": accepted,
        "events_sent_across_restart": len(sent),
        "events_lost_across_restart": len(lost),
        "backlog_drained_after_n8n_start_s": round(drained_s, 2),
        "raw": {"alert_to_switch_s": seconds, "lost": lost, "statuses": statuses},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--forgeries", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    write_report(args.out, "n8n", run(args.rounds, args.forgeries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
