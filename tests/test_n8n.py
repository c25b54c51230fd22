"""The n8n example against a real n8n (scripts/n8n.sh installs a pinned one into a cache
outside the clone): imported with the documented command, its credentials created
and the workflow saved and activated through n8n's REST API (what its editor calls),
then driven by a real gpuwarden daemon on the simulated GPU.

Without Node.js >= 20.19 and npm this module is skipped, saying why; `.ci/run` sets
GPUWARDEN_REQUIRE_N8N=1, which turns that skip into a failure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import DaemonProcess, SimNode, run_cli, two_process_modes
from .standins import StandIn, free_port

# The first run installs n8n (about 5 minutes on 2 cores); then about a minute.
pytestmark = pytest.mark.timeout(1500)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "n8n" / "gpuwarden-workflow.json"
OWNER = {"email": "ops@example.com", "firstName": "Ops", "lastName": "Homelab",
         "password": "Gpuwarden-e2e-1"}
EVENTS_HEADER = "X-Gpuwarden-Token"
FORM_LOGIN = {"user": "ops", "password": "form-Password-1"}


def _n8n_bin() -> str:
    why = ""
    if shutil.which("npm") is None or shutil.which("node") is None:
        why = "Node.js and npm are not installed"
    else:
        version = subprocess.run(["node", "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip().lstrip("v")
        major, minor = (int(p) for p in version.split(".")[:2])
        if (major, minor) < (20, 19):
            why = f"n8n 1.123 needs Node.js >= 20.19, this is {version}"
    if not why:
        done = subprocess.run([str(ROOT / "scripts" / "n8n.sh")], capture_output=True,
                              text=True, check=False, timeout=1500)
        if done.returncode == 0:
            return done.stdout.strip().splitlines()[-1]
        why = f"scripts/n8n.sh failed: {done.stderr[-2000:]}"
    if os.environ.get("GPUWARDEN_REQUIRE_N8N"):
        pytest.fail(f"a real n8n is required here: {why}")
    pytest.skip(f"no real n8n: {why}")


@pytest.fixture(scope="module")
def n8n_bin() -> str:
    return _n8n_bin()


class N8n:
    """One n8n in its own folder, on a free loopback port, logged in as its owner."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ,
                    "N8N_USER_FOLDER": str(folder), "N8N_PORT": str(self.port),
                    "N8N_LISTEN_ADDRESS": "127.0.0.1", "N8N_RUNNERS_ENABLED": "false",
                    "N8N_DIAGNOSTICS_ENABLED": "false",
                    "N8N_PERSONALIZATION_ENABLED": "false",
                    "N8N_VERSION_NOTIFICATIONS_ENABLED": "false",
                    "N8N_TEMPLATES_ENABLED": "false", "N8N_SECURE_COOKIE": "false",
                    "N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS": "false"}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_from = 0  # where the current start's output begins in n8n.log
        self.rest = httpx.Client(base_url=self.url, timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binary, *args], env=self.env, capture_output=True,
                              text=True, timeout=300, check=False)

    def start(self) -> None:
        path = self.folder / "n8n.log"
        self._log_from = len(path.read_text(errors="replace")) if path.exists() else 0
        log = open(path, "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen([self.binary, "start"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        # /healthz and parts of /rest answer before every route is mounted; n8n says
        # when it is done.
        while True:
            if "Editor is now accessible" in self.log(whole=True):
                try:
                    if self.rest.get("/rest/login").status_code in (200, 401):
                        return
                except httpx.TransportError:
                    pass
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "n8n did not start:\n" + self.log()
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self, *, whole: bool = False) -> str:
        """This start's output (its end, unless `whole`)."""
        path = self.folder / "n8n.log"
        text = path.read_text(errors="replace")[self._log_from:] if path.exists() else ""
        return text if whole else text[-4000:]

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.rest.request(method, path, **kwargs)
        assert resp.is_success, f"{method} {path}: {resp.status_code} {resp.text[:500]}"
        return resp.json().get("data") if resp.content else None

    def set_up_owner(self) -> None:
        self.call("POST", "/rest/owner/setup", json=OWNER)
        self.call("POST", "/rest/login", json={"emailOrLdapLoginId": OWNER["email"],
                                                "password": OWNER["password"]})

    def credential(self, name: str, kind: str, data: dict[str, str]) -> str:
        return str(self.call("POST", "/rest/credentials",
                             json={"name": name, "type": kind, "data": data})["id"])

    def executions(self, workflow_id: str) -> list[dict[str, Any]]:
        found = self.call("GET", "/rest/executions",
                          params={"filter": json.dumps({"workflowId": workflow_id}),
                                  "limit": 500})
        return list(found["results"])

    def execution(self, execution_id: str) -> dict[str, Any]:
        """What an execution ran: {node name: its runs}."""
        doc = self.call("GET", f"/rest/executions/{execution_id}")
        return dict(_unflatten(json.loads(doc["data"]))["resultData"]["runData"])

    def received(self, execution_id: str) -> dict[str, Any]:
        """The body the webhook of an execution received ({} for another trigger)."""
        runs = self.execution(execution_id).get("gpuwarden events")
        if not runs:  # the form's executions
            return {}
        return dict(runs[0]["data"]["main"][0][0]["json"]["body"])


def _unflatten(table: list[Any]) -> Any:
    """Undo the `flatted` encoding n8n stores execution data in: every string in a
    container is the index of another entry."""
    done: dict[int, Any] = {}

    def value(index: int) -> Any:
        if index in done:
            return done[index]
        raw = table[index]
        if isinstance(raw, list):
            out: Any = []
            done[index] = out
            out.extend(resolve(v) for v in raw)
        elif isinstance(raw, dict):
            out = {}
            done[index] = out
            out.update({k: resolve(v) for k, v in raw.items()})
        else:
            out = raw
            done[index] = out
        return out

    def resolve(v: Any) -> Any:
        return value(int(v)) if isinstance(v, str) else v

    return value(0)


class DiscordWebhook(StandIn):
    """Where the example's Discord node posts (a channel webhook's URL)."""

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[dict[str, Any]] = []

    def routes(self, app: Any) -> None:
        from aiohttp import web

        async def post(request: web.Request) -> web.Response:
            self.posts.append(await request.json())
            return web.Response(status=204)
        app.router.add_post("/api/webhooks/1/token", post)


@pytest.fixture
def n8n(n8n_bin: str, tmp_path: Path) -> Iterator[N8n]:
    instance = N8n(n8n_bin, tmp_path / "n8n")
    instance.folder.mkdir()
    yield instance
    instance.stop()


def _sign(key_text: str, msg_id: str, stamp: int, body: str) -> str:
    mac = hmac.new(key_text.encode(), f"{msg_id}.{stamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


@dataclass
class Deployed:
    """The example running in n8n, and the gpuwarden config that feeds it."""

    whsec: str
    key_text: str  # the same key as text, in the flow's Crypto node
    events_token: str
    hook: str
    config: Path


def deploy_example(n8n: N8n, node: SimNode, folder: Path, discord_url: str) -> Deployed:
    """What a user does after the README: the documented import, the credentials, the
    key and the address in the flow, save and activate; and gpuwarden's config."""
    imported = n8n.cli("import:workflow", f"--input={EXAMPLE}")
    assert imported.returncode == 0 and "Successfully imported 1 workflow" in \
        imported.stdout + imported.stderr, imported.stdout + imported.stderr
    n8n.start()
    n8n.set_up_owner()
    secret = json.loads(run_cli("secret", "whsec", "--json").stdout)
    events_token = run_cli("secret", "token").stdout.strip()
    api_token = run_cli("secret", "token").stdout.strip()
    api_port = free_port()
    ids = {
        "gpuwarden events header": n8n.credential(
            "gpuwarden events header", "httpHeaderAuth",
            {"name": EVENTS_HEADER, "value": events_token}),
        "gpuwarden API token": n8n.credential(
            "gpuwarden API token", "httpHeaderAuth",
            {"name": "Authorization", "value": f"Bearer {api_token}"}),
        "Discord alerts webhook": n8n.credential(
            "Discord alerts webhook", "discordWebhookApi", {"webhookUri": discord_url}),
        "gpuwarden form login": n8n.credential(
            "gpuwarden form login", "httpBasicAuth", FORM_LOGIN),
    }
    flow = n8n.call("GET", "/rest/workflows/gpuwardenExample1")
    for item in flow["nodes"]:
        for ref in item.get("credentials", {}).values():
            ref["id"] = ids[ref["name"]]
        params = item["parameters"]
        if item["type"] == "n8n-nodes-base.crypto":
            params["secret"] = secret["hmac_key_text"]
        if item["type"] == "n8n-nodes-base.httpRequest":
            params["url"] = params["url"].replace("127.0.0.1:8787", f"127.0.0.1:{api_port}")
    saved = n8n.call("PATCH", "/rest/workflows/gpuwardenExample1",
                     json={"nodes": flow["nodes"], "versionId": flow["versionId"]})
    n8n.call("POST", "/rest/workflows/gpuwardenExample1/activate",
             json={"versionId": saved["versionId"]})
    hook = f"{n8n.url}/webhook/gpuwarden-events"

    (folder / "n8n.whsec").write_text(secret["whsec"] + "\n")
    (folder / "events.token").write_text(events_token + "\n")
    (folder / "api.token").write_text(api_token + "\n")
    config = node.write(**two_process_modes(
        node, daemon={"default_mode": "image"},
        thresholds={"sustain": 1}, watchdog={"protect_actions": []},
        api={"listen": f"127.0.0.1:{api_port}"},
        **{"api.tokens.n8n": {"token_file": str(folder / "api.token")}},
        n8n={"event_webhook_urls": [hook], "min_severity": "info",
             "signing_secret_file": str(folder / "n8n.whsec"),
             "auth_header": EVENTS_HEADER,
             "auth_value_file": str(folder / "events.token")},
        delivery={"backoff_base": 0.2, "backoff_max": 1.0}))
    return Deployed(secret["whsec"], secret["hmac_key_text"], events_token, hook, config)


def quiet(daemon: DaemonProcess, still: float = 1.5) -> int:
    """Wait until the daemon has published nothing for `still` seconds and delivered
    everything; the id of its last event (what is after it is still to come)."""
    deadline = time.monotonic() + 60
    last, since = daemon.events()[-1]["id"], time.monotonic()
    while True:
        now_last = daemon.events()[-1]["id"]
        if now_last != last:
            last, since = now_last, time.monotonic()
        sink = daemon.status()["sinks"]["receivers"][0]
        if time.monotonic() - since >= still and sink["queued"] == 0:
            return int(last)
        assert time.monotonic() < deadline, sink
        time.sleep(0.1)


def critical_alert_switches(daemon: DaemonProcess, node: SimNode) -> float:
    """Push VRAM to critical (image mode, 8000 MiB, plus a 12000 MiB stray) and wait for
    n8n's switch to llm; the seconds from the alert to the switch starting."""

    def n8n_switches(name: str) -> list[dict[str, Any]]:
        return [e for e in daemon.events(name) if e.get("requested_by") == "api:n8n"]

    tiers = len(daemon.events("vram.tier"))
    switches = len(n8n_switches("mode.switch.completed"))
    stray = node.hold("stray", 12000)  # 8000 + 12000 of 20480 MiB: critical
    try:
        deadline = time.monotonic() + 60
        while len(n8n_switches("mode.switch.completed")) <= switches:
            assert time.monotonic() < deadline, daemon.output()[-3000:]
            time.sleep(0.05)
        tier = next(e for e in daemon.events("vram.tier")[tiers:] if e["to"] == "critical")
        started = n8n_switches("mode.switch.started")[-1]
        done = n8n_switches("mode.switch.completed")[-1]
        assert done["to"] == "llm", done
        return float(started["time"] - tier["time"])
    finally:
        stray.kill()
        stray.wait()


def test_the_example_flow_on_a_real_n8n(n8n: N8n, node: SimNode, start_daemon: Any,
                                        tmp_path: Path) -> None:
    t_start = time.monotonic()
    discord = DiscordWebhook().start()
    try:
        deployed = deploy_example(n8n, node, tmp_path, f"{discord.url}/api/webhooks/1/token")
        secret = {"whsec": deployed.whsec, "hmac_key_text": deployed.key_text}
        events_token, hook, config = deployed.events_token, deployed.hook, deployed.config
        daemon: DaemonProcess = start_daemon(config, node.socket)
        daemon.wait_mode("image")

        # 1. A critical alert makes n8n switch the GPU to llm, audited as api:n8n.
        alert_to_switch = critical_alert_switches(daemon, node)
        assert daemon.status()["gpus"][0]["mode"] == "llm"

        # 1b. The form switches by hand (what its page posts), behind its login.
        form = f"{n8n.url}/form/gpuwarden-mode"
        resp = httpx.post(form, files={"field-0": (None, "image")}, timeout=60)
        assert resp.status_code == 401
        resp = httpx.post(form, files={"field-0": (None, "image")}, timeout=60,
                          auth=(FORM_LOGIN["user"], FORM_LOGIN["password"]))
        assert resp.status_code == 200, resp.text
        # It answered once the switch was done.
        assert daemon.events("mode.switch.completed")[-1]["to"] == "image"
        assert daemon.events("mode.switch.completed")[-1]["requested_by"] == "api:n8n"

        # 2. Forgeries: none gets past the door or the signature check.
        switches = len(daemon.events("mode.switch.started"))
        body = json.dumps({"event": "vram.tier", "to": "critical", "gpu": 0,
                           "message": "forged"}, separators=(",", ":"))
        now = int(time.time())
        msg = f"msg_forged_{uuid.uuid4().hex}"
        forgeries = [
            ({}, 403),  # no header: refused by the Webhook node's Header Auth
            ({EVENTS_HEADER: "wrong"}, 403),
            ({EVENTS_HEADER: events_token}, 200),  # unsigned
            ({EVENTS_HEADER: events_token, "webhook-id": msg,
              "webhook-timestamp": str(now),
              "webhook-signature": _sign("not-the-key-" + "x" * 20, msg, now, body)}, 200),
            ({EVENTS_HEADER: events_token, "webhook-id": msg,  # a replay, 10 min old
              "webhook-timestamp": str(now - 600),
              "webhook-signature": _sign(secret["hmac_key_text"], msg, now - 600, body)},
             200),
        ]
        before = {e["id"] for e in n8n.executions("gpuwardenExample1")}
        for headers, status in forgeries:
            resp = httpx.post(hook, content=body, headers={
                "content-type": "application/json", **headers})
            assert resp.status_code == status, (headers, resp.status_code, resp.text)
        deadline = time.monotonic() + 60
        while True:  # gpuwarden's own events run the flow meanwhile too
            forged = [e for e in n8n.executions("gpuwardenExample1")
                      if e["id"] not in before and e["status"] != "running"
                      and n8n.received(e["id"]).get("message") == "forged"]
            if len(forged) == 3:
                break
            assert time.monotonic() < deadline, forged
            time.sleep(0.3)
        for execution in forged:
            ran = n8n.execution(execution["id"])
            assert "Forged or stale: dropped" in ran and "Switch GPU to llm" not in ran, ran
            assert execution["status"] == "error"  # it stands out under Executions

        # A genuine critical alert captured and sent again (fresh, correctly signed):
        # its webhook-id was seen, so it switches nothing.
        runs = next(ran for ran in (n8n.execution(e["id"])
                                    for e in n8n.executions("gpuwardenExample1"))
                    if "Switch GPU to llm" in ran)
        headers = runs["gpuwarden events"][0]["data"]["main"][0][0]["json"]["headers"]
        raw = runs["Raw body"][0]["data"]["main"][0][0]["json"]["rawBody"]
        before = {e["id"] for e in n8n.executions("gpuwardenExample1")}
        resp = httpx.post(hook, content=raw, headers={
            "content-type": "application/json", EVENTS_HEADER: events_token,
            **{k: headers[k] for k in ("webhook-id", "webhook-timestamp",
                                       "webhook-signature")}})
        assert resp.status_code == 200
        deadline = time.monotonic() + 60
        while True:
            replay = [e for e in n8n.executions("gpuwardenExample1")
                      if e["id"] not in before and e["status"] != "running"
                      and n8n.received(e["id"]).get("to") == "critical"]
            if replay:
                break
            assert time.monotonic() < deadline
            time.sleep(0.3)
        ran = n8n.execution(replay[0]["id"])
        assert "Seen before?" in ran and "Critical VRAM?" not in ran, list(ran)
        time.sleep(1)
        assert len(daemon.events("mode.switch.started")) == switches
        assert daemon.status()["gpus"][0]["mode"] == "image"

        # 3. A signed crash-loop event reaches Discord through the flow.
        crash = json.dumps({"event": "crashloop.blocked", "workload": "comfyui",
                            "message": "comfyui blocked after 4 crashes in 300 s"},
                           separators=(",", ":"))
        msg, now = f"msg_e2e_{uuid.uuid4().hex}", int(time.time())
        resp = httpx.post(hook, content=crash, headers={
            "content-type": "application/json", EVENTS_HEADER: events_token,
            "webhook-id": msg, "webhook-timestamp": str(now),
            "webhook-signature": _sign(secret["hmac_key_text"], msg, now, crash)})
        assert resp.status_code == 200
        deadline = time.monotonic() + 30
        while not discord.posts:
            assert time.monotonic() < deadline, n8n.log()
            time.sleep(0.2)
        assert "comfyui blocked after 4 crashes" in discord.posts[0]["content"]

        # 4. n8n restarted mid-stream: every event sent meanwhile reaches it after.
        mark = quiet(daemon)
        seen = {e["id"] for e in n8n.executions("gpuwardenExample1")}
        n8n.stop()
        for mode in ("image", "llm", "image"):
            assert run_cli("--config", str(config), "mode", mode).returncode == 0
        n8n.start()  # the owner's session stays valid
        receiver = f"n8n:{hook}"
        deadline = time.monotonic() + 120
        while True:
            sink = daemon.status()["sinks"]["receivers"][0]
            if sink["queued"] == 0 and sink["state"] == "ok":
                break
            assert time.monotonic() < deadline, (sink, n8n.log())
            time.sleep(0.3)
        sent = {e["id"] for e in daemon.events() if e["id"] > mark
                and e["severity"] != "debug"
                and not (e["event"].startswith("sink.") and e.get("sink") == receiver)}
        deadline = time.monotonic() + 60
        while True:
            got = {n8n.received(e["id"]).get("id")
                   for e in n8n.executions("gpuwardenExample1") if e["id"] not in seen}
            if sent <= got:
                break
            assert time.monotonic() < deadline, (sorted(sent - got), n8n.log())
            time.sleep(0.5)
        assert len(sent) >= 6  # three switches: started and completed each, at least
    finally:
        discord.stop()
    print(f"\nalert -> switch started through n8n: {alert_to_switch:.2f} s; "
          f"test wall time {time.monotonic() - t_start:.0f} s")


FLEET = ROOT / "examples" / "n8n" / "gpuwarden-fleet-workflow.json"


def _alertmanager_payload(status: str, alerts: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Alertmanager 0.25's webhook body (version 4), for (alertname, instance, status)."""
    return {
        "version": "4", "groupKey": '{}:{alertname="x"}', "truncatedAlerts": 0,
        "status": status, "receiver": "n8n", "groupLabels": {}, "commonLabels": {},
        "commonAnnotations": {}, "externalURL": "http://127.0.0.1:9093",
        "alerts": [{"status": state, "labels": {"alertname": name, "instance": instance,
                                                "job": "gpuwarden", "gpu": "0",
                                                "severity": "critical"},
                    "annotations": {"summary": f"{instance} GPU 0: VRAM critical"},
                    "startsAt": "2026-12-06T10:00:00Z",
                    "endsAt": "0001-01-01T00:00:00Z" if state == "firing" else
                    "2026-12-06T10:05:00Z",
                    "generatorURL": "http://127.0.0.1:9090/graph", "fingerprint": f"{i:016x}"}
                   for i, (name, instance, state) in enumerate(alerts)],
    }


def test_the_fleet_flow_switches_the_node_that_alerted(n8n: N8n, tmp_path: Path,
                                                        start_daemon: Any) -> None:
    imported = n8n.cli("import:workflow", f"--input={FLEET}")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    n8n.start()
    n8n.set_up_owner()
    am_token = run_cli("secret", "token").stdout.strip()
    api_token = run_cli("secret", "token").stdout.strip()
    ids = {
        "Alertmanager webhook": n8n.credential(
            "Alertmanager webhook", "httpHeaderAuth",
            {"name": "Authorization", "value": f"Bearer {am_token}"}),
        "gpuwarden API token": n8n.credential(
            "gpuwarden API token", "httpHeaderAuth",
            {"name": "Authorization", "value": f"Bearer {api_token}"}),
    }
    flow = n8n.call("GET", "/rest/workflows/gpuwardenFleet1")
    for item in flow["nodes"]:
        for ref in item.get("credentials", {}).values():
            ref["id"] = ids[ref["name"]]
    saved = n8n.call("PATCH", "/rest/workflows/gpuwardenFleet1",
                     json={"nodes": flow["nodes"], "versionId": flow["versionId"]})
    n8n.call("POST", "/rest/workflows/gpuwardenFleet1/activate",
             json={"versionId": saved["versionId"]})
    hook = f"{n8n.url}/webhook/gpuwarden-alerts"

    daemons, instances = {}, {}
    for name in ("a", "b"):
        node = SimNode(tmp_path / name)
        node.root.mkdir()
        port = free_port()
        config = node.write(**two_process_modes(
            node, daemon={"default_mode": "image"}, api={"listen": f"127.0.0.1:{port}"},
            **{"api.tokens.n8n": {"token": api_token}}))
        daemons[name] = start_daemon(config, node.socket)
        daemons[name].wait_mode("image")
        instances[name] = f"127.0.0.1:{port}"

    forged = httpx.post(hook, json=_alertmanager_payload(
        "firing", [("GpuwardenVramCritical", instances["a"], "firing")]), timeout=30)
    assert forged.status_code == 403  # no Alertmanager token: refused before the flow
    resp = httpx.post(hook, headers={"Authorization": f"Bearer {am_token}"}, timeout=30,
                      json=_alertmanager_payload("firing", [
                          ("GpuwardenVramCritical", instances["b"], "firing"),
                          ("GpuwardenVramCritical", instances["a"], "resolved"),
                          ("GpuwardenCrashLoopBlocked", instances["a"], "firing")]))
    assert resp.status_code == 200, resp.text
    daemons["b"].wait_mode("llm", timeout=60)
    completed = daemons["b"].wait_event("mode.switch.completed", to="llm")[-1]
    assert completed["requested_by"] == "api:n8n"  # authorized and audited on the node
    # Only the node whose critical alert fired was switched.
    deadline = time.monotonic() + 60
    while not n8n.executions("gpuwardenFleet1"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert daemons["a"].status()["gpus"][0]["mode"] == "image"
    assert [e for e in daemons["a"].events("mode.switch.started")
            if e.get("requested_by") == "api:n8n"] == []
