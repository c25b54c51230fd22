"""Prometheus metrics (own registry), names in the spirit of DCGM exporter's.

GPU gauges are refreshed from each sample; switch and release durations, crash-loop
blocks and events are counted as the events happen; outbound deliveries by sink.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .events import Event
from .gpu.attribution import AttributedSample
from .workloads.base import WorkloadStatus

__all__ = ["Metrics"]

_GPU = ("gpu", "uuid", "name")
_TIERS = {"ok": 0, "warn": 1, "alert": 2, "critical": 3}
_SWITCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_RELEASE_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60)
_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


_FAILURE_REASONS = ("release_timeout", "start_failed", "internal")


def _failure_reason(error: str) -> str:
    if error.startswith("VRAM release not verified"):
        return "release_timeout"
    if error.startswith("internal error"):
        return "internal"
    return "start_failed"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.used = Gauge("gpuwarden_gpu_memory_used_bytes", "VRAM in use (nvidia-smi "
                          "memory.used)", _GPU, registry=r)
        self.free = Gauge("gpuwarden_gpu_memory_free_bytes", "VRAM free", _GPU, registry=r)
        self.total = Gauge("gpuwarden_gpu_memory_total_bytes", "VRAM total", _GPU, registry=r)
        self.reserved = Gauge("gpuwarden_gpu_memory_reserved_bytes",
                              "VRAM reserved by the driver", _GPU, registry=r)
        self.util = Gauge("gpuwarden_gpu_utilization_percent", "GPU utilization", _GPU,
                          registry=r)
        self.temp = Gauge("gpuwarden_gpu_temperature_celsius", "GPU temperature", _GPU,
                          registry=r)
        self.power = Gauge("gpuwarden_gpu_power_watts", "GPU power draw", _GPU, registry=r)
        self.up = Gauge("gpuwarden_gpu_up", "1 when the GPU could be read", _GPU, registry=r)
        self.tier = Gauge("gpuwarden_gpu_vram_tier",
                          "VRAM tier: 0 ok, 1 warn, 2 alert, 3 critical", ("gpu",), registry=r)
        self.mode = Gauge("gpuwarden_gpu_mode", "1 for the GPU's active mode", ("gpu", "mode"),
                          registry=r)
        self.workload_up = Gauge("gpuwarden_workload_running", "1 while the workload runs",
                                 ("workload", "kind"), registry=r)
        self.workload_blocked = Gauge("gpuwarden_workload_blocked",
                                      "1 while blocked after a crash loop", ("workload",),
                                      registry=r)
        self.switch_seconds = Histogram("gpuwarden_mode_switch_duration_seconds",
                                        "Completed mode switches", ("gpu",),
                                        buckets=_SWITCH_BUCKETS, registry=r)
        self.release_seconds = Histogram("gpuwarden_release_verify_duration_seconds",
                                         "Time from stop to VRAM release verified", ("gpu",),
                                         buckets=_RELEASE_BUCKETS, registry=r)
        self.blocks = Counter("gpuwarden_crashloop_blocks", "Crash-loop blocks",
                              ("workload",), registry=r)
        self.events = Counter("gpuwarden_events", "Events by name", ("event",), registry=r)
        self.switch_failures = Counter(
            "gpuwarden_mode_switch_failures", "Mode switches that did not reach their mode, "
            "by reason (release_timeout: VRAM release not verified, so nothing started; "
            "start_failed: the mode's workloads did not start; internal)",
            ("gpu", "reason"), registry=r)
        self.leak = Gauge("gpuwarden_gpu_vram_leak", "1 while a VRAM leak is open, by kind "
                          "(device: used beyond what processes hold; process: GPU processes "
                          "no workload owns)", ("gpu", "kind"), registry=r)
        self.start_time = Gauge("gpuwarden_daemon_start_time_seconds",
                                "When this daemon started (Unix time): a change is a restart",
                                registry=r)
        self.start_time.set(time.time())
        self.deliveries = Counter("gpuwarden_deliveries", "Outbound webhook deliveries by "
                                  "receiver (named without secrets) and outcome (delivered, "
                                  "retried, failed, dropped, failing)",
                                  ("sink", "outcome"), registry=r)
        # Per receiver, named without its secrets (scheme://host:port/path).
        self.receiver_failing = Gauge("gpuwarden_receiver_failing",
                                      "1 while an outbound receiver is failing",
                                      ("receiver",), registry=r)
        self.receiver_queued = Gauge("gpuwarden_receiver_queued",
                                     "Events waiting for an outbound receiver",
                                     ("receiver",), registry=r)
        # The receivers' states, read when metrics are rendered.
        self.receivers: Callable[[], list[dict[str, Any]]] = list
        self.auth_failures = Counter("gpuwarden_api_auth_failures",
                                     "Failed API authentications by reason", ("reason",),
                                     registry=r)
        self.api_connections = Gauge("gpuwarden_api_connections",
                                     "Open API connections by door (tcp, socket)",
                                     ("door",), registry=r)
        self.api_refused = Counter("gpuwarden_api_connections_refused",
                                   "API connections answered 503 because the door was full",
                                   ("door",), registry=r)
        # The demand proxies (proxy: the workload's name).
        self.proxy_waiting = Gauge("gpuwarden_proxy_waiting",
                                   "Demand requests waiting for their mode", ("proxy",),
                                   registry=r)
        self.proxy_wait = Histogram("gpuwarden_proxy_wait_seconds",
                                    "How long demand requests waited before being forwarded",
                                    ("proxy",), buckets=_WAIT_BUCKETS, registry=r)
        self.proxy_requests = Counter("gpuwarden_proxy_requests",
                                      "Requests by outcome (forwarded, cached, local, "
                                      "rejected, unavailable, error, forbidden, cut_by_switch)",
                                      ("proxy", "outcome"), registry=r)
        self.proxy_rejected = Counter("gpuwarden_proxy_rejected",
                                      "Demand requests answered 503, by cause (max_wait, "
                                      "queue_full, blocked, switch_failed)",
                                      ("proxy", "cause"), registry=r)
        self.proxy_switches = Counter("gpuwarden_proxy_demand_switches",
                                      "Mode switches made for waiting demand",
                                      ("gpu", "mode"), registry=r)
        self.proxy_connections_refused = Counter(
            "gpuwarden_proxy_connections_refused",
            "Proxy connections answered 503 because its max_connections were all open",
            ("proxy",), registry=r)
        self.proxy_connections_cut = Counter(
            "gpuwarden_proxy_connections_cut",
            "Proxy connections closed for sending too slowly, by reason (head: a request "
            "head begun and not finished within idle_timeout; body: a body paused past "
            "body_timeout)",
            ("proxy", "reason"), registry=r)
        self.proxy_connections = Gauge("gpuwarden_proxy_connections",
                                       "Open connections per demand proxy", ("proxy",),
                                       registry=r)
        self.proxy_connections_max = Gauge(
            "gpuwarden_proxy_connections_max",
            "Each demand proxy's connection budget (max_connections, as fitted to the "
            "open-files limit)", ("proxy",), registry=r)
        # Open connections and budget per proxy, read when metrics are rendered.
        self.proxy_budgets: Callable[[], dict[str, tuple[int, int]]] = dict
        # Open connections per door, read when metrics are rendered.
        self.connections: Callable[[], dict[str, int]] = dict

    def on_event(self, event: Event) -> None:
        self.events.labels(event.name).inc()
        f = event.fields
        gpu = str(f.get("gpu", ""))
        if event.name == "mode.switch.completed" and isinstance(f.get("timings"), dict):
            self.switch_seconds.labels(gpu).observe(float(f["timings"].get("total_s", 0.0)))
        elif event.name == "release.verified" and "release_s" in f:
            self.release_seconds.labels(gpu).observe(float(f["release_s"]))
        elif event.name == "crashloop.blocked":
            self.blocks.labels(str(f.get("workload"))).inc()
        elif event.name == "mode.switch.failed":
            self.switch_failures.labels(gpu, _failure_reason(str(f.get("error", "")))).inc()
        elif event.name == "vram.leak":
            self.leak.labels(gpu, str(f.get("kind"))).set(0 if f.get("recovered") else 1)

    def on_auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def on_connection_refused(self, door: str) -> None:
        self.api_refused.labels(door).inc()

    def on_delivery(self, sink: str, outcome: str) -> None:
        self.deliveries.labels(sink, outcome).inc()

    def observe(self, sample: AttributedSample, tiers: dict[int, str],
                modes: dict[int, str | None], modes_on_gpu: dict[int, list[str]],
                statuses: dict[str, tuple[str, WorkloadStatus]], blocked: set[str]) -> None:
        for gpu in sample.node.gpus:
            labels = (str(gpu.index), gpu.uuid, gpu.name)
            self.up.labels(*labels).set(1 if gpu.ok else 0)
            if not gpu.ok:
                continue
            self.used.labels(*labels).set(gpu.used_bytes)
            self.free.labels(*labels).set(gpu.free_bytes)
            self.total.labels(*labels).set(gpu.total_bytes)
            self.reserved.labels(*labels).set(gpu.reserved_bytes)
            for gauge, value in ((self.util, gpu.util_gpu_pct), (self.temp, gpu.temp_c),
                                 (self.power, gpu.power_w)):
                if value is not None:
                    gauge.labels(*labels).set(value)
        for index, tier in tiers.items():
            self.tier.labels(str(index)).set(_TIERS[tier])
            # Failure counters exist at 0 from the start: Prometheus sees no increase in
            # a series that is born at 1.
            for reason in _FAILURE_REASONS:
                self.switch_failures.labels(str(index), reason)
            for kind in ("device", "process"):
                self.leak.labels(str(index), kind)  # 0 until a leak opens
        for index, active in modes.items():
            for mode in modes_on_gpu.get(index, []):
                self.mode.labels(str(index), mode).set(1 if mode == active else 0)
        for name, (kind, status) in statuses.items():
            self.workload_up.labels(name, kind).set(1 if status.running else 0)
            self.workload_blocked.labels(name).set(1 if name in blocked else 0)

    def render(self) -> bytes:
        for door, count in self.connections().items():
            self.api_connections.labels(door).set(count)
        for proxy, (open_now, limit) in self.proxy_budgets().items():
            self.proxy_connections.labels(proxy).set(open_now)
            self.proxy_connections_max.labels(proxy).set(limit)
        for receiver in self.receivers():
            self.receiver_failing.labels(receiver["sink"]).set(
                1 if receiver["state"] == "failing" else 0)
            self.receiver_queued.labels(receiver["sink"]).set(receiver["queued"])
        return bytes(generate_latest(self.registry))
