"""VRAM tiers with sustain and hysteresis, and GPU faults, turned into events.

A tier escalates only after `sustain` consecutive samples above it, and clears only
once usage falls `clear_margin` below the tier's threshold, so a reading hovering
around 80 % gives one `vram.tier` event, not one per sample.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import ThresholdsConfig
from .events import EventBus, Severity
from .gpu.attribution import AttributedSample
from .gpu.model import GpuSample

__all__ = ["Tier", "TierTracker", "Watchdog", "top_holders"]


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
        self._limits = {
            Tier.WARN: thresholds.warn,
            Tier.ALERT: thresholds.alert,
            Tier.CRITICAL: thresholds.critical,
        }
        self._margin = thresholds.clear_margin
        self._sustain = thresholds.sustain
        self.tier = Tier.OK
        self._above: list[Tier] = []  # raw tiers of consecutive samples above `tier`

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


class Watchdog:
    """Evaluates each sample: `vram.tier` on tier changes, `gpu.error` on faults."""

    def __init__(self, thresholds: ThresholdsConfig, bus: EventBus) -> None:
        self._thresholds = thresholds
        self._bus = bus
        self._gpus: dict[int, _GpuWatch] = {}
        self._node_fault: str | None = None

    def tier(self, gpu: int) -> Tier:
        watch = self._gpus.get(gpu)
        return watch.tracker.tier if watch else Tier.OK

    def observe(self, sample: AttributedSample) -> None:
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
            watch = self._gpus.setdefault(gpu.index, _GpuWatch(TierTracker(self._thresholds)))
            self._observe_gpu(sample, gpu, watch)

    def _observe_gpu(self, sample: AttributedSample, gpu: GpuSample, watch: _GpuWatch) -> None:
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
            return
        before = watch.tracker.tier
        after = watch.tracker.observe(gpu.used_fraction)
        if after is None:
            return
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
