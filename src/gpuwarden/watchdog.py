"""VRAM tiers, leaks and GPU faults, turned into events.

A tier escalates only after `sustain` consecutive samples above it, and clears only
once usage falls `clear_margin` below the tier's threshold, so a reading hovering
around 80 % gives one `vram.tier` event, not one per sample. Leaks (memory nobody
accounts for on an idle GPU, or GPU processes no workload owns) are one `vram.leak`
per episode, a reminder at an interval, and one recovery.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from .config import ThresholdsConfig, WatchdogConfig
from .events import EventBus, Severity
from .gpu.attribution import AttributedSample
from .gpu.model import GpuSample

__all__ = ["LeakDetector", "Tier", "TierTracker", "Watchdog", "top_holders"]


class Tier(enum.IntEnum):
    OK = 0
    WARN = 1
    ALERT = 2
    CRITICAL = 3

    @property
    def label(self) -> str:
        return self.name.lower()


_SEVERITY = {
    Tier.OK: Severity.INFO,
    Tier.WARN: Severity.WARNING,
    Tier.ALERT: Severity.ERROR,
    Tier.CRITICAL: Severity.CRITICAL,
}


class TierTracker:
    """The tier of one GPU, fed one used fraction per sample."""

    def __init__(self, thresholds: ThresholdsConfig) -> None:
        self.set_thresholds(thresholds)
        self.tier = Tier.OK
        self._above: list[Tier] = []  # raw tiers of consecutive samples above `tier`

    def set_thresholds(self, thresholds: ThresholdsConfig) -> None:
        self._limits = {
            Tier.WARN: thresholds.warn,
            Tier.ALERT: thresholds.alert,
            Tier.CRITICAL: thresholds.critical,
        }
        self._margin = thresholds.clear_margin
        self._sustain = thresholds.sustain

    def _raw(self, fraction: float, margin: float = 0.0) -> Tier:
        tier = Tier.OK
        for candidate, limit in self._limits.items():
            if fraction >= limit - margin:
                tier = candidate
        return tier

    def observe(self, fraction: float) -> Tier | None:
        """Feed one sample; returns the new tier when it changed."""
        raw = self._raw(fraction)
        if raw > self.tier:
            self._above.append(raw)
            if len(self._above) >= self._sustain:
                # Escalate to the level every sample of the streak reached.
                self.tier = min(self._above[-self._sustain :])
                self._above.clear()
                return self.tier
            return None
        self._above.clear()
        if self.tier > Tier.OK and fraction < self._limits[self.tier] - self._margin:
            # Clear: the highest tier the reading still holds with the margin applied.
            self.tier = min(self._raw(fraction, self._margin), Tier(self.tier - 1))
            return self.tier
        return None


def top_holders(
    sample: AttributedSample, gpu: GpuSample, limit: int = 3
) -> list[dict[str, object]]:
    procs = sorted(gpu.processes, key=lambda p: p.used_bytes or 0, reverse=True)[:limit]
    holders: list[dict[str, object]] = []
    for proc in procs:
        owner = sample.owners.get(proc.pid)
        holders.append(
            {
                "pid": proc.pid,
                "used_mib": proc.used_mib,
                "workload": owner.workload if owner else None,
                "command": owner.command if owner else "",
            }
        )
    return holders


@dataclass
class _GpuWatch:
    tracker: TierTracker
    fault: str | None = None
    tier_sent_at: float = 0.0


@dataclass
class _Episode:
    streak: int = 0
    open: bool = False
    last_sent: float = 0.0
    opened_at: float = 0.0
    details: dict[str, object] = field(default_factory=dict)


class LeakDetector:
    """`vram.leak` for memory nobody accounts for and for GPU processes nobody owns.

    * device: no managed workload runs on the GPU, yet it holds more than the
      processes no workload owns plus `tolerance_mib` (a driver that did not free).
    * process: a GPU process belongs to no workload and is not in
      `[watchdog] allowed_processes`.

    Each needs `sustain` consecutive samples; then one event per episode, a reminder
    every `leak_reminder`, and one recovery event when it ends.
    """

    def __init__(self, sustain: int, config: WatchdogConfig, tolerance_mib: int,
                 bus: EventBus) -> None:
        self._sustain = sustain
        self._allowed = set(config.allowed_processes)
        self._reminder = config.leak_reminder
        self._tolerance = tolerance_mib
        self._bus = bus
        self._episodes: dict[tuple[int, str], _Episode] = {}

    def observe(self, sample: AttributedSample, gpu: GpuSample, running: set[str],
                quiet: bool) -> None:
        """`running`: managed workloads running on this GPU; `quiet`: a switch is under
        way (memory is legitimately in flight), so no episode starts or ends."""
        if quiet:
            return
        unowned = [
            p for p in gpu.processes
            if (o := sample.owners.get(p.pid)) is None or o.workload is None
        ]
        accounted = sample.unowned_mib(gpu)
        device_leak: dict[str, Any] | None = None
        if not running and gpu.used_mib > accounted + self._tolerance:
            device_leak = {"used_mib": gpu.used_mib, "accounted_mib": accounted,
                           "leaked_mib": gpu.used_mib - accounted,
                           "tolerance_mib": self._tolerance}
        strays = [p for p in unowned
                  if (o := sample.owners.get(p.pid)) is None or o.command not in self._allowed]
        process_leak: dict[str, Any] | None = None
        if strays:
            process_leak = {"processes": [
                {"pid": p.pid, "used_mib": p.used_mib,
                 "command": o.command if (o := sample.owners.get(p.pid)) else "",
                 # not in /proc: exited and not freed, or in another PID namespace
                 "visible": o.visible if o else False}
                for p in strays], "used_mib": gpu.used_mib,
                "unowned_mib": sum(p.used_mib or 0 for p in strays)}
        self._track(gpu, "device", device_leak,
                    "GPU {gpu}: {leaked_mib} MiB held while no workload runs")
        self._track(gpu, "process", process_leak,
                    "GPU {gpu}: {unowned_mib} MiB held by processes no workload owns")

    def _track(self, gpu: GpuSample, kind: str, details: dict[str, Any] | None,
               template: str) -> None:
        episode = self._episodes.setdefault((gpu.index, kind), _Episode())
        now = time.monotonic()
        if details is None:
            episode.streak = 0
            if episode.open:
                episode.open = False
                self._bus.publish(
                    "vram.leak", f"GPU {gpu.index}: {kind} leak resolved", gpu=gpu.index,
                    uuid=gpu.uuid, kind=kind, recovered=True, used_mib=gpu.used_mib,
                    lasted_s=round(now - episode.opened_at, 1),
                )
            return
        episode.streak += 1
        message = template.format(gpu=gpu.index, **details)
        if not episode.open and episode.streak >= self._sustain:
            episode.open, episode.opened_at, episode.last_sent = True, now, now
            self._bus.publish("vram.leak", message, severity=Severity.ERROR, gpu=gpu.index,
                              uuid=gpu.uuid, kind=kind, recovered=False, **details)
        elif episode.open and now - episode.last_sent >= self._reminder:
            episode.last_sent = now
            self._bus.publish("vram.leak", message + " (still)", severity=Severity.ERROR,
                              gpu=gpu.index, uuid=gpu.uuid, kind=kind, recovered=False,
                              reminder=True, **details)


class Watchdog:
    """Evaluates each sample: `vram.tier` on tier changes, `gpu.error` on faults,
    `vram.leak` for leaks. `observe` returns the GPUs that just became critical."""

    def __init__(self, thresholds: ThresholdsConfig, bus: EventBus,
                 leaks: LeakDetector | None = None, tier_reminder: float | None = None) -> None:
        self._thresholds = thresholds
        self._bus = bus
        self._leaks = leaks
        self._tier_reminder = tier_reminder
        self._gpus: dict[int, _GpuWatch] = {}
        self._node_fault: str | None = None
        # Alert groups a receiver was sent an alert for before a restart and no
        # resolution yet: resolved at the first sample that finds them clear.
        self.unresolved: set[str] = set()

    def set_thresholds(self, thresholds: ThresholdsConfig) -> None:
        """New tier limits (a reload): each GPU keeps its tier, judged by them from the
        next sample on."""
        self._thresholds = thresholds
        for watch in self._gpus.values():
            watch.tracker.set_thresholds(thresholds)

    def tier(self, gpu: int) -> Tier:
        watch = self._gpus.get(gpu)
        return watch.tracker.tier if watch else Tier.OK

    def observe(self, sample: AttributedSample, running: dict[int, set[str]] | None = None,
                quiet: set[int] | None = None) -> list[int]:
        """Judge one sample. `running`: managed workloads running per GPU; `quiet`: GPUs
        in the middle of a switch. Returns the GPUs that escalated to critical."""
        critical: list[int] = []
        node = sample.node
        node_fault = f"{node.fault}: {node.fault_detail}" if node.fault else None
        if node_fault != self._node_fault:
            if node_fault:
                self._bus.publish(
                    "gpu.error", f"cannot read the GPUs: {node.fault_detail}",
                    severity=Severity.CRITICAL, fault=str(node.fault), detail=node.fault_detail,
                )
            else:
                self._bus.publish("gpu.error", "GPUs readable again", recovered=True)
            self._node_fault = node_fault
        for gpu in node.gpus:
            first = gpu.index not in self._gpus
            watch = self._gpus.setdefault(gpu.index, _GpuWatch(TierTracker(self._thresholds)))
            if self._observe_gpu(sample, gpu, watch) is Tier.CRITICAL:
                critical.append(gpu.index)
            if first:
                self._resolve_after_restart(gpu, watch)
            if self._leaks is not None and gpu.ok and running is not None:
                self._leaks.observe(sample, gpu, running.get(gpu.index, set()),
                                    gpu.index in (quiet or set()))
        return critical

    def _resolve_after_restart(self, gpu: GpuSample, watch: _GpuWatch) -> None:
        """An alert from before a restart that this first look finds clear gets its
        resolution now: the tracker starts at ok and would never report the change."""
        tier_group, error_group = f"vram.tier:gpu{gpu.index}", f"gpu.error:gpu{gpu.index}"
        if gpu.ok and error_group in self.unresolved:
            self.unresolved.discard(error_group)
            self._bus.publish("gpu.error", f"GPU {gpu.index} readable (after a restart)",
                              gpu=gpu.index, uuid=gpu.uuid, recovered=True)
        if gpu.ok and tier_group in self.unresolved and watch.tracker.tier is Tier.OK:
            self.unresolved.discard(tier_group)
            self._bus.publish(
                "vram.tier", f"GPU {gpu.index} VRAM {gpu.used_fraction:.0%} "
                f"({gpu.used_mib}/{gpu.total_mib} MiB): back to ok (after a restart)",
                severity=Severity.INFO, gpu=gpu.index, uuid=gpu.uuid,
                **{"from": "unknown", "to": "ok"},
                used_mib=gpu.used_mib, total_mib=gpu.total_mib,
                used_fraction=round(gpu.used_fraction, 4))

    def _observe_gpu(self, sample: AttributedSample, gpu: GpuSample,
                     watch: _GpuWatch) -> Tier | None:
        fault = f"{gpu.fault}" if gpu.fault else None
        if fault != watch.fault:
            if fault:
                self._bus.publish(
                    "gpu.error", f"GPU {gpu.index} unreadable: {gpu.fault} ({gpu.fault_detail})",
                    severity=Severity.CRITICAL, gpu=gpu.index, uuid=gpu.uuid,
                    fault=fault, detail=gpu.fault_detail,
                )
            else:
                self._bus.publish(
                    "gpu.error", f"GPU {gpu.index} readable again", gpu=gpu.index,
                    uuid=gpu.uuid, recovered=True,
                )
            watch.fault = fault
        if not gpu.ok:
            return None
        before = watch.tracker.tier
        after = watch.tracker.observe(gpu.used_fraction)
        now = time.monotonic()
        if after is None:
            if (self._tier_reminder is not None and before >= Tier.ALERT
                    and now - watch.tier_sent_at >= self._tier_reminder):
                # An unresolved alert is sent again; its resolution is sent once.
                watch.tier_sent_at = now
                self._bus.publish(
                    "vram.tier",
                    f"GPU {gpu.index} still {before.label}: VRAM {gpu.used_fraction:.0%} "
                    f"({gpu.used_mib}/{gpu.total_mib} MiB)",
                    severity=_SEVERITY[before], gpu=gpu.index, uuid=gpu.uuid,
                    **{"from": before.label, "to": before.label}, reminder=True,
                    used_mib=gpu.used_mib, total_mib=gpu.total_mib,
                    used_fraction=round(gpu.used_fraction, 4),
                    holders=top_holders(sample, gpu),
                )
            return None
        watch.tier_sent_at = now
        self._bus.publish(
            "vram.tier",
            f"GPU {gpu.index} VRAM {gpu.used_fraction:.0%} "
            f"({gpu.used_mib}/{gpu.total_mib} MiB): {before.label} -> {after.label}",
            severity=_SEVERITY[after] if after > before else Severity.INFO,
            gpu=gpu.index,
            uuid=gpu.uuid,
            **{"from": before.label, "to": after.label},
            used_mib=gpu.used_mib,
            total_mib=gpu.total_mib,
            used_fraction=round(gpu.used_fraction, 4),
            holders=top_holders(sample, gpu),
        )
        return after
