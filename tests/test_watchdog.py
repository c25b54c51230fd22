"""VRAM tiers: sustain before escalating, hysteresis before clearing, one event each."""

from __future__ import annotations

from typing import Any

from gpuwarden.config import ThresholdsConfig
from gpuwarden.events import Event, EventBus
from gpuwarden.gpu.attribution import AttributedSample, ProcessOwner
from gpuwarden.gpu.model import MIB, GpuProcess, GpuSample, NodeSample
from gpuwarden.watchdog import Tier, TierTracker, Watchdog


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)


def feed(tracker: TierTracker, fractions: list[float]) -> list[Tier | None]:
    return [tracker.observe(f) for f in fractions]


def test_escalation_needs_sustain_consecutive_samples() -> None:
    tracker = TierTracker(ThresholdsConfig(sustain=3))
    assert feed(tracker, [0.85, 0.85, 0.5, 0.85, 0.85]) == [None] * 5
    assert tracker.tier is Tier.OK
    assert tracker.observe(0.85) is Tier.WARN


def test_hovering_around_a_threshold_gives_one_event() -> None:
    tracker = TierTracker(ThresholdsConfig(sustain=2, clear_margin=0.05))
    readings = [0.79, 0.81, 0.80, 0.79, 0.81, 0.78, 0.80, 0.76, 0.81] * 5
    changes = [t for t in feed(tracker, readings) if t is not None]
    assert changes == [Tier.WARN]
    # It clears only once the reading falls below warn - clear_margin.
    assert tracker.observe(0.751) is None
    assert tracker.observe(0.749) is Tier.OK


def test_each_crossing_fires_once_in_order_and_clears_stepwise() -> None:
    tracker = TierTracker(ThresholdsConfig(sustain=1))
    ramp = [0.5, 0.81, 0.82, 0.91, 0.92, 0.96, 0.97]
    assert [t for t in feed(tracker, ramp) if t] == [Tier.WARN, Tier.ALERT, Tier.CRITICAL]
    assert tracker.observe(0.91) is None  # within the margin of critical
    assert tracker.observe(0.86) is Tier.ALERT
    assert tracker.observe(0.10) is Tier.OK


def test_a_jump_escalates_to_the_level_the_whole_streak_reached() -> None:
    tracker = TierTracker(ThresholdsConfig(sustain=2))
    assert tracker.observe(0.91) is None
    assert tracker.observe(0.99) is Tier.ALERT  # the streak held >= alert, not >= critical
    assert tracker.observe(0.99) is None
    assert tracker.observe(0.99) is Tier.CRITICAL


def _sample(used_mib: int, total_mib: int = 1000, *, pid: int = 42) -> AttributedSample:
    gpu = GpuSample(index=0, uuid="GPU-x", name="test", total_bytes=total_mib * MIB,
                    used_bytes=used_mib * MIB, free_bytes=(total_mib - used_mib) * MIB,
                    processes=(GpuProcess(pid=pid, used_bytes=used_mib * MIB),))
    return AttributedSample(NodeSample(gpus=(gpu,)),
                            {pid: ProcessOwner(pid=pid, workload="ollama", command="ollama")})


def test_watchdog_events_carry_figures_and_top_holders() -> None:
    audit = Collect()
    bus = EventBus(audit)
    watchdog = Watchdog(ThresholdsConfig(sustain=1), bus)
    for used in (100, 850, 860, 500, 100):
        watchdog.observe(_sample(used))
    tiers = [e for e in audit.events if e.name == "vram.tier"]
    assert [(e.fields["from"], e.fields["to"]) for e in tiers] == [("ok", "warn"), ("warn", "ok")]
    first: dict[str, Any] = tiers[0].fields
    assert first["used_mib"] == 850 and first["total_mib"] == 1000 and first["gpu"] == 0
    assert first["holders"] == [{"pid": 42, "used_mib": 850, "workload": "ollama",
                                 "command": "ollama"}]
    assert tiers[0].severity.label == "warning"


def test_gpu_faults_become_one_error_event_per_episode() -> None:
    audit = Collect()
    bus = EventBus(audit)
    watchdog = Watchdog(ThresholdsConfig(), bus)
    from gpuwarden.gpu.model import GpuFault

    lost = NodeSample(gpus=(), fault=GpuFault.DRIVER_NOT_LOADED, fault_detail="no driver")
    for _ in range(3):
        watchdog.observe(AttributedSample(lost, {}))
    watchdog.observe(_sample(10))
    errors = [e for e in audit.events if e.name == "gpu.error"]
    assert len(errors) == 2
    assert errors[0].fields["fault"] == "driver_not_loaded"
    assert errors[1].fields["recovered"] is True


def test_unresolved_alert_repeats_at_the_reminder_interval_and_resolves_once() -> None:
    import time

    audit = Collect()
    watchdog = Watchdog(ThresholdsConfig(sustain=1), EventBus(audit), tier_reminder=0.05)
    watchdog.observe(_sample(920))
    for _ in range(3):
        time.sleep(0.06)
        watchdog.observe(_sample(925))
    watchdog.observe(_sample(100))
    watchdog.observe(_sample(100))
    tiers = [e for e in audit.events if e.name == "vram.tier"]
    reminders = [e for e in tiers if e.fields.get("reminder")]
    assert len(reminders) == 3 and all(e.fields["to"] == "alert" for e in reminders)
    resolved = [e for e in tiers if e.fields["to"] == "ok"]
    assert len(resolved) == 1
