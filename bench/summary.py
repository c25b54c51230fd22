#!/usr/bin/env python3
"""The summary table of every benchmark's JSON in a folder: `bench/summary.py DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def rows(folder: Path) -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []
    sample = load(folder, "sample.json")
    if sample:
        s, d = sample["sample"], sample["daemon"]
        out.append(("full sample, gpuwarden", f"{s['gpuwarden_sample_us']:.1f} us",
                    f"backend {s['backend']}", ""))
        if "ratio_vs_raw" in s:
            out.append(("  vs raw pynvml calls", f"{s['ratio_vs_raw']:.2f}x", "<= 2x",
                        "PASS" if s["ratio_vs_raw"] <= 2 else "FAIL"))
        if "nvidia_smi_vs_gpuwarden" in s:
            ratio = s["nvidia_smi_vs_gpuwarden"]
            out.append(("  nvidia-smi subprocess / gpuwarden", f"{ratio:.0f}x", ">= 500x",
                        "PASS" if ratio >= 500 else "FAIL"))
        run = f"1 Hz, {d['duration_s']:.0f} s, {d.get('backend', 'sim')}"
        out.append((f"daemon resident memory ({run})", f"{d['rss_mb']} MB", "< 80 MB",
                    "PASS" if d["rss_mb"] < 80 else "FAIL"))
        out.append((f"daemon CPU ({run})", f"{d['cpu_pct_of_one_core']}% of a core",
                    "< 0.5%", "PASS" if d["cpu_pct_of_one_core"] < 0.5 else "FAIL"))
    switch = load(folder, "switch.json")
    if switch:
        out.append(("switch overhead (median of "
                    f"{switch['switches']})", f"{switch['overhead_s_median']:.3f} s",
                    "<= 0.3 s", "PASS" if switch["overhead_s_median"] <= 0.3 else "FAIL"))
        out.append(("  release verified after stop (median)",
                    f"{switch['release_verified_s_median']:.3f} s",
                    f"sim delay {switch['release_delay_s']} s", ""))
    crash = load(folder, "crashloop.json")
    if crash:
        beyond = crash["restarts_beyond_threshold_total"]
        out.append((f"crash loops: restarts beyond threshold ({crash['loops']} loops)",
                    str(beyond), "0", "PASS" if beyond == 0 else "FAIL"))
        out.append(("  crash -> restart policy 'no' (median / max)",
                    f"{crash['crash_to_policy_no_s_median'] * 1000:.1f} / "
                    f"{crash['crash_to_policy_no_s_max'] * 1000:.1f} ms", "", ""))
        out.append(("  VRAM leaked per loop, guarded vs unguarded",
                    f"{crash['leaked_mib_per_loop_median']:.0f} vs "
                    f"{crash['baseline']['leaked_mib']} MiB "
                    f"({crash['baseline']['seconds']:.0f} s)", "", ""))
    api = load(folder, "api.json")
    if api:
        o = api["open_loop"]
        out.append((f"GET /v1/status at {o['target_rps']:.0f} req/s, p50 / p99",
                    f"{o['p50_ms']:.2f} / {o['p99_ms']:.2f} ms", "p99 < 10 ms",
                    "PASS" if o["p99_ms"] < 10 and o["errors"] == 0 else "FAIL"))
        if "with_idle" in api:
            idle = api["with_idle"]
            out.append((f"  with {idle['idle_connections']:,} idle connections held, p50 / p99",
                        f"{idle['tcp']['p50_ms']:.2f} / {idle['tcp']['p99_ms']:.2f} ms "
                        f"({api['idle_p99_ratio']:.2f}x)", "p99 within 2x",
                        "PASS" if api["idle_p99_ratio"] <= 2 and idle["tcp"]["errors"] == 0
                        else "FAIL"))
            out.append(("  CLI status over the socket meanwhile, p50 / p99",
                        f"{idle['cli_socket']['p50_ms']:.2f} / "
                        f"{idle['cli_socket']['p99_ms']:.2f} ms", "", ""))
        out.append(("  closed loop, 4 clients", f"{api['closed_loop']['rps']:.0f} req/s",
                    "", ""))
    proxy = load(folder, "proxy.json")
    if proxy and "added_latency_p50_ms" in proxy:
        ok = proxy["added_latency_p50_ms"] <= 1 and proxy["added_latency_p99_ms"] <= 5
        out.append(("demand proxy: added latency p50 / p99",
                    f"{proxy['added_latency_p50_ms']:.2f} / {proxy['added_latency_p99_ms']:.2f} ms",
                    "<= 1 / 5 ms", "PASS" if ok else "FAIL"))
        out.append(("  stream lines/s, proxy / direct", f"{proxy['stream_rate_ratio']:.2f}",
                    ">= 0.95", "PASS" if proxy["stream_rate_ratio"] >= 0.95 else "FAIL"))
        out.append(("  16 clients, 20 ms answers, proxy / direct",
                    f"{proxy['rps_16_20ms_ratio']:.2f} (instant: {proxy['rps_ratio']:.2f})",
                    ">= 0.8", "PASS" if proxy["rps_16_20ms_ratio"] >= 0.8 else "FAIL"))
        out.append(("  demand switch: first byte - switch",
                    f"{proxy['demand_added_ms_median']:.0f} ms", "<= 50 ms",
                    "PASS" if proxy["demand_added_ms_median"] <= 50 else "FAIL"))
    fleet = load(folder, "fleet.json")
    if fleet:
        out.append(("fleet status, 2 / 10 nodes / 10 + 1 unreachable",
                    f"{fleet['2_nodes_wall_s_median']:.2f} / {fleet['10_nodes_wall_s_median']:.2f}"
                    f" / {fleet['10_nodes_1_unreachable_wall_s_median']:.2f} s", "", ""))
    sinks = load(folder, "sinks.json")
    if sinks:
        out.append(("delivery latency, publish -> receiver (p50 / p99)",
                    f"{sinks['latency_ms_p50']:.1f} / {sinks['latency_ms_p99']:.1f} ms",
                    "p99 < 50 ms", "PASS" if sinks["latency_ms_p99"] < 50 else "FAIL"))
        out.append(("  sustained into one receiver", f"{sinks['sustained_events_per_s']:.0f}"
                    " events/s", "", ""))
        out.append(("  1,000 queued on disk (with WAL / data)",
                    f"{sinks['bytes_on_disk_per_1000_queued'] / 1e6:.1f} / "
                    f"{sinks['bytes_per_1000_queued_after_checkpoint'] / 1e6:.2f} MB", "", ""))
        out.append(("  backlog of 1,000 drained after the receiver is back",
                    f"{sinks['backlog_1000_drain_s']:.1f} s", "", ""))
    bot = load(folder, "discord.json")
    if bot:
        out.append(("/gpu status, INTERACTION_CREATE -> callback (p50 / p99)",
                    f"{bot['status_command_ms_p50']:.1f} / {bot['status_command_ms_p99']:.1f} ms",
                    "p99 < 300 ms",
                    "PASS" if bot["status_command_ms_p99"] < 300 else "FAIL"))
        out.append(("  alert -> channel message (p50 / p99)",
                    f"{bot['alert_to_message_ms_p50']:.1f} / "
                    f"{bot['alert_to_message_ms_p99']:.1f} ms", "", ""))
        out.append(("  gateway back -> connected (median / worst)",
                    f"{bot['gateway_back_to_connected_s_median']:.2f} / "
                    f"{bot['gateway_back_to_connected_s_max']:.2f} s", "", ""))
    flow = load(folder, "n8n.json")
    if flow:
        out.append(("critical alert -> switch started, through n8n (p50 / worst)",
                    f"{flow['alert_to_switch_s_p50'] * 1000:.0f} / "
                    f"{flow['alert_to_switch_s_max'] * 1000:.0f} ms", "", ""))
        out.append(("  forged events that switched the GPU",
                    f"{flow['forgeries_that_switched']} of {flow['forgeries_sent']}", "0",
                    "PASS" if flow["forgeries_that_switched"] == 0 else "FAIL"))
        out.append(("  events lost across an n8n restart",
                    f"{flow['events_lost_across_restart']} of "
                    f"{flow['events_sent_across_restart']}", "0",
                    "PASS" if flow["events_lost_across_restart"] == 0 else "FAIL"))
    acc = load(folder, "gpu-acceptance.json")
    if acc:
        ok = sum(c["ok"] for c in acc["checks"])
        out.append((f"acceptance ({acc['backend']}, {acc.get('gpu', 'no GPU')})",
                    f"{ok}/{len(acc['checks'])} checks", "all",
                    "PASS" if ok == len(acc["checks"]) else "FAIL"))
        figures = acc["figures"]
        if "exit_to_release_verified_s" in figures:
            out.append(("  holder exit -> release.verified",
                        f"{figures['exit_to_release_verified_s'] * 1000:.0f} ms",
                        "<= 300 ms (real GPU)", ""))
        if figures.get("tier_event_latency_s"):
            worst = max(figures["tier_event_latency_s"])
            out.append(("  tier event after the crossing (worst)", f"{worst * 1000:.0f} ms",
                        "<= 1 sample interval (+ read)", ""))
    return out


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out")
    table = rows(folder)
    width = max((len(r[0]) for r in table), default=10)
    print(f"\n{'benchmark':<{width}}  {'figure':<28} {'target':<22} result")
    for name, figure, target, result in table:
        print(f"{name:<{width}}  {figure:<28} {target:<22} {result}")
    failed = [r for r in table if r[3] == "FAIL"]
    print(f"\n{len(table)} figures, {len(failed)} off target; JSON in {folder}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
