"""The example alerting rules on real engines: Debian's Prometheus scrapes two gpuwarden
daemons on simulated GPUs, and Debian's Alertmanager routes what fires to a receiver
on loopback. One node is driven into the critical VRAM tier, the other into a crash
loop over a real Docker engine; the alerts must fire with each node's labels, be
grouped per node, and resolve when the conditions clear."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from .conftest import Containers, SimNode, hold_argv
from .dockerd import holder_script
from .standins import StandIn, free_port

ROOT = Path(__file__).resolve().parent.parent
# Prometheus's scrape and evaluation interval here; GPUWARDEN_TEST_SCRAPE=5s measures
# the README's figure with a production-like scrape.
SCRAPE = os.environ.get("GPUWARDEN_TEST_SCRAPE", "1s")
RULES = ROOT / "examples" / "prometheus" / "gpuwarden-rules.yml"
DASHBOARD = ROOT / "examples" / "grafana" / "gpuwarden.json"


def prometheus_tools() -> Path:
    result = subprocess.run([str(ROOT / "scripts" / "prometheus.sh")], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


class AlertReceiver(StandIn):
    """Alertmanager's webhook receiver: every notification, with when it arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.notifications: list[tuple[float, dict[str, Any]]] = []

    def routes(self, app: web.Application) -> None:
        async def hook(request: web.Request) -> web.Response:
            self.notifications.append((time.time(), await request.json()))
            return web.Response()

        async def events(request: web.Request) -> web.Response:
            await request.read()  # gpuwarden's own events (node A's receiver)
            return web.Response()

        app.router.add_post("/hook", hook)
        app.router.add_post("/events", events)

    def alerts(self, name: str, status: str) -> list[tuple[float, dict[str, Any], dict[str, Any]]]:
        """(arrival, notification, alert) for each `name` alert sent with `status`."""
        return [(at, doc, alert) for at, doc in list(self.notifications)
                for alert in doc["alerts"]
                if alert["labels"]["alertname"] == name and alert["status"] == status]

    def wait(self, name: str, status: str, timeout: float = 120
             ) -> tuple[float, dict[str, Any], dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while not self.alerts(name, status):
            assert time.monotonic() < deadline, \
                f"no {status} {name} within {timeout}s: {self.notifications}"
            time.sleep(0.1)
        return self.alerts(name, status)[0]


class Engine:
    """A Prometheus or Alertmanager process on loopback, stopped at the end."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    started: list[Engine] = []
    yield started
    for engine in started:
        engine.stop()


def node_config(node: SimNode, api_port: int, **sections: dict[str, Any]) -> Path:
    return node.write(api={"listen": f"127.0.0.1:{api_port}"},
                      thresholds={"sustain": 1}, **sections)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    assert resp.status_code == 200, resp.text
    result: list[dict[str, Any]] = resp.json()["data"]["result"]
    return result


@pytest.mark.timeout(600)
def test_alerts_fire_per_node_group_and_resolve(
        tmp_path: Path, dockerd: Any, start_daemon: Any, engines: list[Engine]) -> None:
    tools = prometheus_tools()
    receiver = AlertReceiver().start()
    a, b = SimNode(tmp_path / "a"), SimNode(tmp_path / "b")
    for each in (a, b):
        each.root.mkdir()
    port_a, port_b = free_port(), free_port()
    instance_a, instance_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"

    # Node A: a small mode, and a big one that fills 97 % of its 20 GiB card.
    config_a = node_config(
        a, port_a, daemon={"default_mode": "small"},
        workloads__small={"kind": "process", "stop_timeout": 2,
                          "command": hold_argv(a.ledger, "small", 2000)},
        workloads__big={"kind": "process", "stop_timeout": 2,
                        "command": hold_argv(a.ledger, "big", 19900)},
        modes__small={"workloads": ["small"]}, modes__big={"workloads": ["big"]},
        n8n={"event_webhook_urls": [f"{receiver.url}/events"]})
    # Node B: ComfyUI in a container that crashes 0.3 s after each start, restarted by
    # Docker until gpuwarden blocks it.
    containers = Containers(dockerd, b.ledger)
    tag = uuid.uuid4().hex[:8]
    crashy, calm = f"gw-prom-crashy-{tag}", f"gw-prom-calm-{tag}"
    try:
        containers.create(crashy, holder_script("comfy", 1000, exit_after=0.3),
                          restart_policy="always")
        containers.create(calm, holder_script("ollama", 2000))
        config_b = node_config(
            b, port_b, daemon={"default_mode": "image"}, docker={"host": dockerd.host},
            crashloop={"max_restarts": 3, "window": 60},
            workloads__comfyui={"kind": "docker", "container": crashy, "stop_timeout": 2,
                                "restart_policy": "always"},
            workloads__ollama={"kind": "docker", "container": calm, "stop_timeout": 2},
            modes__image={"workloads": ["comfyui"]}, modes__llm={"workloads": ["ollama"]})
        daemon_a = start_daemon(config_a, a.socket)
        daemon_b = start_daemon(config_b, b.socket)
        daemon_a.wait_mode("small")

        am_port, prom_port = free_port(), free_port()
        am_config = tmp_path / "alertmanager.yml"
        am_config.write_text(json.dumps({
            "route": {"receiver": "test", "group_by": ["alertname", "instance"],
                      "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "test", "webhook_configs": [
                {"url": f"{receiver.url}/hook", "send_resolved": True}]}],
        }))
        # Debian's Alertmanager reads its default template from a fixed path under
        # /usr/share; it runs in a mount namespace where the unpacked package's
        # /usr/share takes that place (nothing is installed on the host).
        share = tools.parent / "share"
        alertmanager = Engine([
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "{share}" /usr/share && exec "$0" "$@"',
            str(tools / "prometheus-alertmanager"), f"--config.file={am_config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
            tmp_path / "alertmanager.log")
        engines.append(alertmanager)
        alertmanager.wait_ready(f"http://127.0.0.1:{am_port}/-/ready")

        prom_config = tmp_path / "prometheus.yml"
        prom_config.write_text(json.dumps({
            "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
            "rule_files": [str(RULES)],
            "alerting": {"alertmanagers": [
                {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": "gpuwarden", "static_configs": [
                {"targets": [instance_a, instance_b]}]}],
        }))
        prometheus = Engine([
            str(tools / "prometheus"), f"--config.file={prom_config}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log")
        engines.append(prometheus)
        prom = f"http://127.0.0.1:{prom_port}"
        prometheus.wait_ready(f"{prom}/-/ready")
        deadline = time.monotonic() + 60
        while len(query(prom, 'up{job="gpuwarden"} == 1')) < 2:
            assert time.monotonic() < deadline, query(prom, "up")
            time.sleep(0.5)

        # Node B's crash loop (from its start in mode image): blocked by gpuwarden,
        # alerted, grouped on node B.
        daemon_b.wait_event("crashloop.blocked", timeout=60)
        _, doc, alert = receiver.wait("GpuwardenCrashLoopBlocked", "firing")
        assert alert["labels"]["instance"] == instance_b
        assert alert["labels"]["workload"] == "comfyui"
        assert alert["labels"]["severity"] == "critical"
        assert doc["groupLabels"] == {"alertname": "GpuwardenCrashLoopBlocked",
                                      "instance": instance_b}
        assert "gpuwarden unblock comfyui" in alert["annotations"]["description"]

        # Node A into the critical tier.
        resp = daemon_a.client.post("/v1/mode", json={"mode": "big"}, timeout=60)
        assert resp.status_code == 200, resp.text
        crossed = daemon_a.wait_event("vram.tier", to="critical")[0]
        arrived, doc, alert = receiver.wait("GpuwardenVramCritical", "firing")
        assert alert["labels"]["instance"] == instance_a and alert["labels"]["gpu"] == "0"
        assert doc["groupLabels"] == {"alertname": "GpuwardenVramCritical",
                                      "instance": instance_a}
        assert all(a["labels"]["instance"] == instance_a for a in doc["alerts"])
        print(f"\ntier crossing to Alertmanager's notification: "
              f"{arrived - crossed['time']:.1f} s (for: 15s, scrape and evaluation {SCRAPE})")
        assert not [x for x in receiver.alerts("GpuwardenCrashLoopBlocked", "firing")
                    if x[2]["labels"]["instance"] == instance_a]

        # Both clear: A back to the small mode, B's block lifted from another mode.
        resp = daemon_a.client.post("/v1/mode", json={"mode": "small"}, timeout=60)
        assert resp.status_code == 200, resp.text
        _, _, resolved = receiver.wait("GpuwardenVramCritical", "resolved")
        assert resolved["labels"]["instance"] == instance_a
        resp = daemon_b.client.post("/v1/mode", json={"mode": "llm"}, timeout=60)
        assert resp.status_code == 200, resp.text
        for claim in b.ledger.glob("comfy*.mib"):
            claim.unlink()
        resp = daemon_b.client.post("/v1/workloads/comfyui/unblock", timeout=60)
        assert resp.status_code == 200, resp.text
        _, _, resolved = receiver.wait("GpuwardenCrashLoopBlocked", "resolved")
        assert resolved["labels"]["instance"] == instance_b

        # Every panel of the Grafana dashboard has data from these two nodes.
        dashboard = json.loads(DASHBOARD.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$instance", ".*").replace("$gpu", ".*")
                assert query(prom, expr), (panel["title"], expr)
    finally:
        receiver.stop()
        containers.cleanup()
        for each in (a, b):
            each.kill_holders()
