"""The example Prometheus rules, tested the Prometheus way (promtool, from Debian's
prometheus 2.42 unpacked by scripts/prometheus.sh), and checked against the metrics
gpuwarden really serves."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from gpuwarden.audit import JsonLinesAudit
from gpuwarden.events import EventBus
from gpuwarden.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "prometheus"


@pytest.fixture(scope="module")
def tools() -> Path:
    result = subprocess.run([str(ROOT / "scripts" / "prometheus.sh")], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def run(tool: Path, *args: str) -> str:
    result = subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=120,
                            cwd=EXAMPLES)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    return out


def test_promtool_checks_the_rules_and_their_unit_tests_pass(tools: Path) -> None:
    assert "SUCCESS: 10 rules found" in run(tools / "promtool", "check", "rules",
                                            "gpuwarden-rules.yml")
    assert "SUCCESS" in run(tools / "promtool", "test", "rules", "gpuwarden-rules.test.yml")


def test_every_rule_is_unit_tested_firing_and_resolved() -> None:
    rules = yaml.safe_load((EXAMPLES / "gpuwarden-rules.yml").read_text())
    tests = yaml.safe_load((EXAMPLES / "gpuwarden-rules.test.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    fired, quiet_after = set(), set()
    for case in tests["tests"]:
        times: dict[str, list[tuple[int, bool]]] = {}
        for check in case["alert_rule_test"]:
            seconds = _seconds(check["eval_time"])
            times.setdefault(check["alertname"], []).append((seconds, bool(check["exp_alerts"])))
        for name, seen in times.items():
            seen.sort()
            if any(firing for _, firing in seen):
                fired.add(name)
                first = min(t for t, firing in seen if firing)
                if any(not firing and t > first for t, firing in seen):
                    quiet_after.add(name)
    assert fired == names, names - fired
    assert quiet_after == names, names - quiet_after  # each one's resolution is tested
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
            anchor = rule["annotations"]["runbook_url"].split("#")[1]
            assert f'<a id="{anchor}"></a>' in (ROOT / "README.md").read_text(), anchor


def _seconds(text: str) -> int:
    value, unit = int(text[:-1]), text[-1]
    return value * {"s": 1, "m": 60, "h": 3600}[unit]


def test_the_example_configs_check(tools: Path) -> None:
    assert "SUCCESS" in run(tools / "promtool", "check", "config", "--syntax-only",
                            "prometheus.yml")
    run(tools / "amtool", "check-config", "alertmanager.yml")


def _served_metric_names() -> set[str]:
    metrics = Metrics()
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
    text = metrics.render().decode()
    names |= set(re.findall(r"^# TYPE (\S+)", text, re.MULTILINE))
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


def test_the_rules_use_only_metrics_gpuwarden_serves() -> None:
    rules = yaml.safe_load((EXAMPLES / "gpuwarden-rules.yml").read_text())
    served = _served_metric_names()
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\b(gpuwarden_[a-z_]+)", rule["expr"]))
    assert used, "the rules name no metric"
    assert used <= served, used - served


def test_switch_failures_leaks_and_restarts_are_measured() -> None:
    metrics = Metrics()
    bus = EventBus(JsonLinesAudit(io.StringIO()))
    bus.subscribe(metrics.on_event)
    bus.publish("mode.switch.failed", "x", gpu=0, error="VRAM release not verified: held")
    bus.publish("mode.switch.failed", "x", gpu=0, error="comfyui not ready within 120 s")
    bus.publish("vram.leak", "x", gpu=0, kind="process", recovered=False)
    text = metrics.render().decode()
    assert 'gpuwarden_mode_switch_failures_total{gpu="0",reason="release_timeout"} 1.0' in text
    assert 'gpuwarden_mode_switch_failures_total{gpu="0",reason="start_failed"} 1.0' in text
    assert 'gpuwarden_gpu_vram_leak{gpu="0",kind="process"} 1.0' in text
    bus.publish("vram.leak", "x", gpu=0, kind="process", recovered=True)
    assert 'gpuwarden_gpu_vram_leak{gpu="0",kind="process"} 0.0' in metrics.render().decode()
    assert re.search(r"^gpuwarden_daemon_start_time_seconds \d", text, re.MULTILINE)


def test_the_dashboard_is_importable_and_asks_for_its_datasource() -> None:
    import json

    dashboard = json.loads((ROOT / "examples" / "grafana" / "gpuwarden.json").read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] == "gpuwarden"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    served = _served_metric_names() | {"up"}
    titles = set()
    for panel in dashboard["panels"]:
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            used = set(re.findall(r"\b(gpuwarden_[a-z_]+|up)\b", target["expr"]))
            used = {re.sub(r"_bucket$", "", name) for name in used}
            assert used and used <= served, (panel["title"], used - served)
    kinds = {panel["type"] for panel in dashboard["panels"]}
    assert "state-timeline" in kinds  # the mode over time
    assert any("VRAM" in t for t in titles) and any("Switch" in t for t in titles)
