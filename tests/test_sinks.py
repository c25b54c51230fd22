"""Outbound events to a real local receiver that verifies the Standard Webhooks signature."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from gpuwarden.cli import format_status
from gpuwarden.config import DeliveryConfig
from gpuwarden.events import Event, EventBus, Severity
from gpuwarden.sinks import DiscordWebhookSink, N8nSink, receiver_name

from .conftest import SimNode, run_cli, two_process_modes
from .standins import StandIn, free_port

SECRET = "whsec_" + base64.b64encode(b"receiver-secret-0123456789").decode()


class Receiver(StandIn):
    """A webhook receiver: verifies signatures, answers from a script of statuses."""

    def __init__(self, secret: str | None = SECRET, port: int | None = None) -> None:
        super().__init__()
        if port is not None:
            self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.fail_until = 0.0  # monotonic: answer 404 until then
        self.ids: list[str] = []  # webhook-id of every attempt
        self.verifier = Webhook(secret) if secret else None
        self.script: list[tuple[int, dict[str, Any] | None]] = []  # answers, then 204s
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        self.bad_signatures = 0
        self.stamps: list[float] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/hook", self._hook)

    async def _hook(self, request: web.Request) -> web.Response:
        self.attempts += 1
        self.stamps.append(time.monotonic())
        self.ids.append(request.headers.get("webhook-id", ""))
        body = await request.read()
        if time.monotonic() < self.fail_until:
            return web.json_response({"message": "webhook not registered"}, status=404)
        if self.verifier is not None:
            try:
                self.verifier.verify(body, dict(request.headers))
            except Exception:
                self.bad_signatures += 1
                return web.json_response({"error": "bad signature"}, status=401)
        if self.script:
            status, payload = self.script.pop(0)
            return web.json_response(payload or {}, status=status)
        self.received.append({"headers": dict(request.headers), "body": await request.json(),
                              "raw": body.decode()})
        return web.Response(status=204)


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)


FAST = DeliveryConfig(queue_size=50, backoff_base=0.05, backoff_max=0.2, timeout=2)


async def _wait(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


def test_n8n_delivery_is_signed_and_retries_after_500_and_429(tmp_path: Path) -> None:
    receiver = Receiver().start()
    receiver.script = [(500, None), (429, {"retry_after": 0.3, "global": False})]
    audit = Collect()

    async def scenario() -> None:
        bus = EventBus(audit)
        async with httpx.AsyncClient() as client:
            sink = N8nSink(f"{receiver.url}/hook", SECRET, FAST, bus, client, Severity.INFO,
                           tmp_path)
            await sink.start()
            bus.subscribe(sink.offer)
            bus.publish("mode.switch.completed", "GPU 0: llm -> image", requested_by="api:n8n",
                        gpu=0, **{"from": "llm", "to": "image"})
            bus.publish("debug.thing", "below the sink's severity", severity=Severity.DEBUG)
            await _wait(lambda: receiver.received)
            await sink.close()
            assert sink.delivered == 1 and sink.failed == 0

    try:
        asyncio.run(scenario())
    finally:
        receiver.stop()
    assert receiver.attempts == 3 and receiver.bad_signatures == 0
    # The 429's retry_after (0.3 s) was honoured.
    assert receiver.stamps[2] - receiver.stamps[1] >= 0.28
    body = receiver.received[0]["body"]
    assert body["event"] == "mode.switch.completed" and body["requested_by"] == "api:n8n"
    assert body["from"] == "llm" and body["to"] == "image"
    assert len(receiver.received) == 1  # the debug event was not sent


def test_wrong_secret_is_rejected_by_the_receiver_and_given_up(tmp_path: Path) -> None:
    receiver = Receiver().start()
    other = "whsec_" + base64.b64encode(b"not-the-receivers-secret!!").decode()

    async def scenario() -> N8nSink:
        bus = EventBus(Collect())
        async with httpx.AsyncClient() as client:
            sink = N8nSink(f"{receiver.url}/hook", other, FAST, bus, client, Severity.INFO,
                           tmp_path)
            await sink.start()
            bus.subscribe(sink.offer)
            bus.publish("vram.tier", "x", gpu=0)
            await _wait(lambda: sink.failed == 1)
            await sink.close()
            return sink

    try:
        sink = asyncio.run(scenario())
    finally:
        receiver.stop()
    assert receiver.bad_signatures == 1 and receiver.received == []
    assert sink.failed == 1  # a 4xx other than 408/429 is not retried


def test_at_the_bound_the_oldest_are_dropped_and_a_slow_receiver_never_blocks(
        tmp_path: Path) -> None:
    receiver = Receiver().start()
    receiver.up = False  # answers 503 until it comes back
    receiver.delay["/hook"] = 0.2
    audit = Collect()

    async def scenario() -> tuple[float, N8nSink]:
        bus = EventBus(audit)
        async with httpx.AsyncClient() as client:
            cfg = DeliveryConfig(queue_size=3, backoff_base=0.05, backoff_max=0.1, timeout=2)
            sink = N8nSink(f"{receiver.url}/hook", SECRET, cfg, bus, client, Severity.INFO,
                           tmp_path)
            await sink.start()
            bus.subscribe(sink.offer)
            started = time.monotonic()
            for i in range(10):
                bus.publish("mode.switch.completed", f"event {i}", gpu=0)
            publish_s = time.monotonic() - started
            await _wait(lambda: sink.dropped == 7)
            receiver.up = True
            await _wait(lambda: sink.queued == 0 and sink.delivered >= 3, timeout=20)
            await sink.close()
            return publish_s, sink

    try:
        publish_s, sink = asyncio.run(scenario())
    finally:
        receiver.stop()
    assert publish_s < 10 * 0.2  # publishing never waited for the (slow) receiver
    messages = [r["body"]["message"] for r in receiver.received]
    # The outbox holds 3: the 7 oldest were dropped, counted, and said so once.
    assert messages == ["event 7", "event 8", "event 9"]
    dropped = [e for e in audit.events if e.name == "sink.dropped"]
    assert len(dropped) == 1 and dropped[0].fields["dropped"] >= 1
    assert sink.dropped == 7


def test_discord_webhook_embed_and_a_404_is_a_failing_episode_not_a_disable(
        tmp_path: Path) -> None:
    receiver = Receiver(secret=None).start()
    audit = Collect()

    async def scenario() -> DiscordWebhookSink:
        bus = EventBus(audit)
        async with httpx.AsyncClient() as client:
            sink = DiscordWebhookSink(f"{receiver.url}/hook", FAST, bus, client,
                                      Severity.WARNING, tmp_path)
            await sink.start()
            bus.subscribe(sink.offer)
            bus.publish("vram.tier", "GPU 0 VRAM 91 %", severity=Severity.ERROR, gpu=0,
                        used_mib=18600, total_mib=20480, used_fraction=0.91,
                        requested_by=None, **{"from": "warn", "to": "alert"})
            bus.publish("mode.switch.completed", "info only")  # below warning
            await _wait(lambda: receiver.received)
            # Gone for a moment (an n8n restarting, a workflow re-activated), then back.
            receiver.script = [(404, {"message": "Unknown Webhook", "code": 10015})] * 2
            bus.publish("crashloop.blocked", "comfyui blocked", severity=Severity.CRITICAL,
                        workload="comfyui")
            await _wait(lambda: sink.failing_since is not None)
            assert sink.status()["state"] == "failing"
            assert sink.status()["last_error"] == "HTTP 404"
            bus.publish("crashloop.blocked", "again", severity=Severity.CRITICAL)
            await _wait(lambda: len(receiver.received) == 3)
            await sink.close()
            return sink

    try:
        sink = asyncio.run(scenario())
    finally:
        receiver.stop()
    assert sink.status()["state"] == "ok" and sink.delivered == 3 and sink.failed == 0
    # Published after close (as the daemon does while it shuts down): ignored, not raised.
    sink.offer(Event(1, "daemon.stopping", Severity.CRITICAL, "after close", time.time()))
    embed = receiver.received[0]["body"]["embeds"][0]
    assert embed["title"] == "ERROR: vram.tier"
    assert embed["color"] == 0xE67E22  # the alert tier's colour
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["GPU"] == "0" and fields["VRAM"] == "18600/20480 MiB (91%)"
    titles = [r["body"]["embeds"][0]["description"] for r in receiver.received]
    assert titles == ["GPU 0 VRAM 91 %", "comfyui blocked", "again"]  # in order
    # One episode: announced once, ended once, and never sent to the failing receiver.
    assert [e.name for e in audit.events if e.name.startswith("sink.")] == [
        "sink.failing", "sink.recovered"]


def test_a_receiver_is_named_without_its_secrets() -> None:
    assert receiver_name("https://bob:hunter22@n8n.lan:5678/webhook/gw?token=abc123") == \
        "https://n8n.lan:5678/webhook/gw"
    assert receiver_name("https://discord.com/api/webhooks/1234/Tok3n-s3cret/slack") == \
        "https://discord.com/api/webhooks/1234"
    assert receiver_name("http://[::1]:8080/hook#frag") == "http://[::1]:8080/hook"


def test_daemon_sends_signed_events_to_n8n(node: SimNode, start_daemon, tmp_path: Path) -> None:
    receiver = Receiver().start()
    try:
        config = node.write(n8n={"event_webhook_urls": [f"{receiver.url}/hook"],
                                 "signing_secret": SECRET, "min_severity": "info"})
        daemon = start_daemon(config, node.socket)
        deadline = time.monotonic() + 10
        while not any(r["body"]["event"] == "daemon.started" for r in receiver.received):
            assert time.monotonic() < deadline, receiver.received
            time.sleep(0.05)
        (sink,) = daemon.status()["sinks"]["receivers"]
        assert sink["sink"].startswith("n8n:") and sink["delivered"] >= 1
        assert sink["dropped"] == 0 and sink["state"] == "ok"
        daemon.stop()
        deadline = time.monotonic() + 5
        while not any(r["body"]["event"] == "daemon.stopping" for r in receiver.received):
            assert time.monotonic() < deadline  # sent while shutting down
            time.sleep(0.05)
    finally:
        receiver.stop()
    assert receiver.bad_signatures == 0
    first = receiver.received[0]["headers"]
    assert first["webhook-id"].startswith("msg_") and first["webhook-signature"].startswith("v1,")


class CatchAll(Receiver):
    """A receiver on every path, answering 404 until `up_after` deliveries were tried."""

    def __init__(self, failures: int) -> None:
        super().__init__(secret=None)
        self.failures = failures

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.failures:
            return web.json_response({"message": "webhook not registered"}, status=404)
        self.received.append({"path": request.path, "headers": dict(request.headers),
                              "body": await request.json()})
        return web.Response(status=204)


def test_no_secret_of_a_receiver_url_reaches_any_output(node: SimNode, start_daemon) -> None:
    """Receivers whose URLs carry credentials fail (404) and recover; not one of the
    secrets shows in the audit log, status, metrics or what the other receiver got."""
    n8n, discord = CatchAll(failures=2).start(), CatchAll(failures=2).start()
    secrets = ["pa55w0rd-x", "qu3ry-t0ken", "D1sc0rdT0ken-secret"]
    # The n8n example's webhook path, which n8n answers 404 while the workflow is inactive.
    n8n_url = (f"http://gw-user:{secrets[0]}@127.0.0.1:{n8n.port}/webhook/gpuwarden-events"
               f"?token={secrets[1]}")
    discord_url = f"http://127.0.0.1:{discord.port}/api/webhooks/42/{secrets[2]}"
    try:
        config = node.write(n8n={"event_webhook_urls": [n8n_url], "min_severity": "info"},
                            discord={"alert_webhook_url": discord_url,
                                     "alert_min_severity": "info"},
                            delivery={"backoff_base": 0.05, "backoff_max": 0.2})
        daemon = start_daemon(config, node.socket)
        daemon.wait_event("sink.recovered", count=2)
        deadline = time.monotonic() + 20
        while not any(r["body"].get("event") == "sink.recovered" for r in n8n.received):
            assert time.monotonic() < deadline, n8n.received  # told of discord's episode
            time.sleep(0.05)
        status = daemon.client.get("/v1/status").text
        metrics = daemon.client.get("/metrics").text
        plain = run_cli("--config", str(config), "status", "--json").stdout
        assert f'gpuwarden_receiver_failing{{receiver="n8n:http://127.0.0.1:{n8n.port}' \
               f'/webhook/gpuwarden-events"}} 0.0' in metrics, metrics
        names = {r["sink"] for r in daemon.status()["sinks"]["receivers"]}
        assert names == {f"n8n:http://127.0.0.1:{n8n.port}/webhook/gpuwarden-events",
                         f"discord:http://127.0.0.1:{discord.port}/api/webhooks/42"}
        outputs = {"audit log": daemon.output(), "status": status, "metrics": metrics,
                   "cli": plain, "n8n received": json.dumps([r["body"] for r in n8n.received]),
                   "discord received": json.dumps([r["body"] for r in discord.received])}
        leaks = [(secret, where) for secret in secrets for where, text in outputs.items()
                 if secret in text]
        assert leaks == []
        # Each receiver heard of the other's episode, never of its own.
        n8n_sinks = {r["body"].get("sink") for r in n8n.received}
        assert f"discord:http://127.0.0.1:{discord.port}/api/webhooks/42" in n8n_sinks
        assert f"n8n:http://127.0.0.1:{n8n.port}/webhook/gpuwarden-events" not in n8n_sinks
    finally:
        n8n.stop()
        discord.stop()


def test_plain_status_shows_a_failing_receiver() -> None:
    doc = {"gpus": [], "workloads": [], "sinks": {"receivers": [
        {"sink": "n8n:http://127.0.0.1:5678/webhook/gpuwarden-events", "state": "failing",
         "failing_since": time.time() - 30, "last_error": "HTTP 404",
         "next_try_at": None, "queued": 4, "delivered": 10, "failed": 0, "dropped": 1},
        {"sink": "discord:https://discord.com/api/webhooks/1", "state": "ok",
         "failing_since": None, "last_error": None, "next_try_at": None, "queued": 0,
         "delivered": 3, "failed": 0, "dropped": 0}]}}
    text = format_status(doc)
    assert "receiver n8n:http://127.0.0.1:5678/webhook/gpuwarden-events FAILING at " in text
    assert "(30 s ago): HTTP 404; 4 queued, 1 dropped" in text
    assert "discord" not in text


async def _sink_for(receiver_url: str, folder: Path, bus: EventBus, client: httpx.AsyncClient,
                    min_severity: Severity = Severity.INFO,
                    config: DeliveryConfig = FAST) -> N8nSink:
    sink = N8nSink(f"{receiver_url}/hook", SECRET, config, bus, client, min_severity, folder)
    await sink.start()
    bus.subscribe(sink.offer)
    return sink


def test_a_receiver_down_for_30_s_gets_every_event_in_order(tmp_path: Path) -> None:
    """Nothing listens on the receiver's port for 30 s (connections refused), then it
    comes up: every event arrives, in order, and the episode is told to nobody else."""
    port = free_port()
    receiver = Receiver(port=port)
    audit = Collect()

    async def scenario() -> N8nSink:
        bus = EventBus(audit)
        async with httpx.AsyncClient() as client:
            cfg = DeliveryConfig(queue_size=100, backoff_base=0.1, backoff_max=1.0, timeout=2)
            sink = await _sink_for(f"http://127.0.0.1:{port}", tmp_path, bus, client,
                                   config=cfg)
            down_until = time.monotonic() + 30
            i = 0
            while time.monotonic() < down_until:
                bus.publish("mode.switch.completed", f"event {i}", gpu=0)
                i += 1
                await asyncio.sleep(1.5)
            assert sink.status()["state"] == "failing" and sink.delivered == 0
            assert "ConnectError" in (sink.last_error or "")
            receiver.start()
            await _wait(lambda: len(receiver.received) >= i, timeout=30)
            await sink.close()
            return sink

    try:
        sink = asyncio.run(scenario())
    finally:
        receiver.stop()
    messages = [r["body"]["message"] for r in receiver.received]
    assert messages == [f"event {n}" for n in range(len(messages))] and len(messages) >= 19
    assert sink.status()["state"] == "ok" and sink.dropped == 0
    assert [e.name for e in audit.events if e.name.startswith("sink.")] == [
        "sink.failing", "sink.recovered"]


def test_404_for_2_s_then_200_delivers_in_order_with_the_same_webhook_id(
        tmp_path: Path) -> None:
    receiver = Receiver().start()
    receiver.fail_until = time.monotonic() + 2.0  # an n8n restarting: its webhook 404s

    async def scenario() -> None:
        bus = EventBus(Collect())
        async with httpx.AsyncClient() as client:
            sink = await _sink_for(receiver.url, tmp_path, bus, client)
            for i in range(5):
                bus.publish("mode.switch.completed", f"event {i}", gpu=0)
            await _wait(lambda: len(receiver.received) == 5, timeout=20)
            await sink.close()

    try:
        asyncio.run(scenario())
    finally:
        receiver.stop()
    assert [r["body"]["message"] for r in receiver.received] == [f"event {i}" for i in range(5)]
    first_id = receiver.received[0]["headers"]["webhook-id"]
    # Every attempt at the first event, the 404s and the 200, carried one webhook-id.
    tries = receiver.ids.count(first_id)
    assert tries >= 2 and receiver.ids[:tries] == [first_id] * tries
    assert receiver.attempts == tries + 4  # the other four went through at once


def test_resolutions_follow_the_alerts_a_receiver_was_sent(tmp_path: Path) -> None:
    """At min_severity warning, the all-clear (info) still reaches a receiver that got
    the alert, with the same group_key; not one that never got it; and across a
    daemon restart."""
    receiver = Receiver().start()

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            bus = EventBus(Collect())
            sink = await _sink_for(receiver.url, tmp_path, bus, client, Severity.WARNING)
            bus.publish("vram.tier", "GPU 0 at 91 %", severity=Severity.ERROR, gpu=0,
                        **{"from": "warn", "to": "alert"})
            bus.publish("vram.tier", "GPU 1 at 81 %", severity=Severity.WARNING, gpu=1,
                        **{"from": "ok", "to": "warn"})
            bus.publish("vram.tier", "GPU 0 back to ok", gpu=0, **{"from": "alert", "to": "ok"})
            bus.publish("vram.tier", "GPU 2 back to ok", gpu=2, **{"from": "warn", "to": "ok"})
            bus.publish("crashloop.blocked", "comfyui blocked", severity=Severity.CRITICAL,
                        workload="comfyui")
            await _wait(lambda: len(receiver.received) == 4)
            await sink.close()
            # A restart in between: the open alert is remembered with the outbox.
            bus = EventBus(Collect())
            sink = await _sink_for(receiver.url, tmp_path, bus, client, Severity.WARNING)
            bus.publish("crashloop.unblocked", "comfyui unblocked", workload="comfyui")
            bus.publish("vram.tier", "GPU 1 back to ok", gpu=1, **{"from": "warn", "to": "ok"})
            await _wait(lambda: len(receiver.received) == 6)
            await sink.close()

    try:
        asyncio.run(scenario())
    finally:
        receiver.stop()
    got = [(r["body"]["message"], r["body"]["group_key"], r["body"]["resolved"])
           for r in receiver.received]
    assert got == [("GPU 0 at 91 %", "vram.tier:gpu0", False),
                   ("GPU 1 at 81 %", "vram.tier:gpu1", False),
                   ("GPU 0 back to ok", "vram.tier:gpu0", True),
                   ("comfyui blocked", "crashloop:comfyui", False),
                   ("comfyui unblocked", "crashloop:comfyui", True),
                   ("GPU 1 back to ok", "vram.tier:gpu1", True)]


def test_an_unreadable_outbox_is_set_aside_and_delivery_goes_on(tmp_path: Path) -> None:
    receiver = Receiver().start()
    audit = Collect()

    async def scenario() -> Path:
        async with httpx.AsyncClient() as client:
            bus = EventBus(audit)
            probe = N8nSink(f"{receiver.url}/hook", SECRET, FAST, bus, client, Severity.INFO,
                            tmp_path)
            probe.outbox_path.parent.mkdir(parents=True, exist_ok=True)
            probe.outbox_path.write_bytes(b"not a database, " * 512)
            sink = await _sink_for(receiver.url, tmp_path, bus, client)
            bus.publish("mode.switch.completed", "after the set-aside", gpu=0)
            await _wait(lambda: len(receiver.received) == 1)
            await sink.close()
            return probe.outbox_path

    try:
        path = asyncio.run(scenario())
    finally:
        receiver.stop()
    errors = [e for e in audit.events if e.name == "sink.error"]
    assert len(errors) == 1 and "set aside" in errors[0].message
    aside = Path(errors[0].fields["set_aside"])
    assert aside.read_bytes().startswith(b"not a database") and path.exists()
    assert [r["body"]["message"] for r in receiver.received] == ["after the set-aside"]


def test_a_daemon_killed_with_50_events_queued_delivers_them_after_its_restart(
        node: SimNode, start_daemon) -> None:
    port = free_port()  # nothing listens there yet
    url = f"http://127.0.0.1:{port}/hook"
    config = node.write(**two_process_modes(node), n8n={
        "event_webhook_urls": [url], "signing_secret": SECRET, "min_severity": "info"})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    for i in range(10):
        assert run_cli("--config", str(config), "mode", ("image", "llm")[i % 2]).returncode == 0
    name = f"n8n:{url}"

    def expected() -> list[tuple[int, float]]:
        # What the receiver is sent: info and above, less its own trouble.
        return [(e["id"], e["time"]) for e in daemon.events()
                if e["severity"] != "debug"
                and not (e["event"].startswith("sink.") and e.get("sink") == name)]

    deadline = time.monotonic() + 30
    while daemon.status()["sinks"]["receivers"][0]["queued"] != len(expected()):
        assert time.monotonic() < deadline, (daemon.status()["sinks"], len(expected()))
        time.sleep(0.05)
    first_run = expected()
    assert len(first_run) >= 50
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()

    receiver = Receiver(port=port).start()
    try:
        again = start_daemon(config, node.socket)
        deadline = time.monotonic() + 60
        while True:
            got = {}
            for r in receiver.received:  # at least once: duplicates share a webhook-id
                got.setdefault(r["headers"]["webhook-id"], (r["body"]["id"],
                                                            r["body"]["time"]))
            delivered = [k for k in got.values() if k in set(first_run)]
            if len(delivered) == len(first_run):
                break
            assert time.monotonic() < deadline, (len(delivered), len(first_run))
            time.sleep(0.1)
        assert delivered == first_run  # all of them, in order
        again.wait_event("daemon.started")
    finally:
        receiver.stop()


def test_a_bad_receiver_url_is_a_config_error_that_never_shows_it(node: SimNode) -> None:
    for bad in (["http//gw:s3cretpass@127.0.0.1:5678/webhook/x?token=qu3rytoken"],
                ["http://gw:s3cretpass@127.0.0.1:99999/webhook/x?token=qu3rytoken"],
                ["ftp://gw:s3cretpass@127.0.0.1/x?token=qu3rytoken"],
                "http://gw:s3cretpass@127.0.0.1:5678/webhook/x?token=qu3rytoken"):
        config = node.write(n8n={"event_webhook_urls": bad})
        result = run_cli("check-config", str(config))
        assert result.returncode == 2, (bad, result)
        assert "n8n.event_webhook_urls" in result.stderr
        assert "s3cretpass" not in result.stderr and "qu3rytoken" not in result.stderr


def test_an_outage_across_a_restart_is_one_episode(tmp_path: Path) -> None:
    port = free_port()
    receiver = Receiver(port=port)
    audit = Collect()

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(2):  # a daemon restart in the middle of the outage
                bus = EventBus(audit)
                sink = await _sink_for(f"http://127.0.0.1:{port}", tmp_path, bus, client)
                bus.publish("mode.switch.completed", "during the outage", gpu=0)
                await _wait(lambda: sink.failing_since is not None)  # noqa: B023
                await sink.close()
            receiver.start()
            bus = EventBus(audit)
            sink = await _sink_for(f"http://127.0.0.1:{port}", tmp_path, bus, client)
            await _wait(lambda: len(receiver.received) == 2)
            await sink.close()

    try:
        asyncio.run(scenario())
    finally:
        receiver.stop()
    assert [e.name for e in audit.events if e.name.startswith("sink.")] == [
        "sink.failing", "sink.recovered"]


def test_an_alert_open_at_a_restart_gets_its_resolution_after_it(
        node: SimNode, start_daemon) -> None:
    receiver = Receiver().start()
    try:
        config = node.write(n8n={"event_webhook_urls": [f"{receiver.url}/hook"],
                                 "signing_secret": SECRET, "min_severity": "warning"},
                            thresholds={"sustain": 1})
        daemon = start_daemon(config, node.socket)
        stray = node.hold("stray", 19000)  # 93 %: alert
        try:
            daemon.wait_event("vram.tier", to="alert")
            deadline = time.monotonic() + 20
            while not any(r["body"]["event"] == "vram.tier" for r in receiver.received):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert daemon.stop() == 0
        finally:
            stray.kill()
            stray.wait()
        # Its claim file is gone too: the restarted daemon's first sample is clear.
        (node.ledger / "stray.mib").unlink()
        again = start_daemon(config, node.socket)
        resolved = again.wait_event("vram.tier", to="ok")[0]
        assert resolved["group_key"] == "vram.tier:gpu0" and resolved["resolved"] is True
        deadline = time.monotonic() + 20
        while not any(r["body"].get("resolved") is True for r in receiver.received):
            assert time.monotonic() < deadline, [r["body"]["event"] for r in receiver.received]
            time.sleep(0.05)
    finally:
        receiver.stop()
    tiers = [(r["body"]["to"], r["body"]["group_key"]) for r in receiver.received
             if r["body"]["event"] == "vram.tier"]
    assert tiers == [("alert", "vram.tier:gpu0"), ("ok", "vram.tier:gpu0")]


def test_n8n_events_carry_the_header_auth_and_a_signature_n8n_can_check(
        tmp_path: Path) -> None:
    """`gpuwarden secret whsec` gives a key n8n's Crypto node takes as text: HMAC-SHA256
    over `id.timestamp.body` with that text reproduces gpuwarden's signature."""
    made = json.loads(run_cli("secret", "whsec", "--json").stdout)
    whsec, key_text = made["whsec"], made["hmac_key_text"]
    receiver = Receiver(secret=whsec).start()

    async def scenario() -> None:
        bus = EventBus(Collect())
        async with httpx.AsyncClient() as client:
            sink = N8nSink(f"{receiver.url}/hook", whsec, FAST, bus, client, Severity.INFO,
                           tmp_path, auth=("X-Gpuwarden-Token", "s3cret-token"))
            await sink.start()
            bus.subscribe(sink.offer)
            bus.publish("vram.tier", "GPU 0 at 96 % (ünïcode)", severity=Severity.CRITICAL,
                        gpu=0, **{"from": "alert", "to": "critical"})
            await _wait(lambda: receiver.received)
            await sink.close()

    try:
        asyncio.run(scenario())
    finally:
        receiver.stop()
    (got,) = receiver.received
    headers = {k.lower(): v for k, v in got["headers"].items()}
    assert headers["x-gpuwarden-token"] == "s3cret-token"
    assert receiver.bad_signatures == 0  # the Standard Webhooks library agrees
    # What the n8n flow computes with its Crypto node (Hmac, SHA256, base64, the text key).
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{got['raw']}"
    digest = base64.b64encode(hmac.new(key_text.encode(), signed.encode(),
                                       hashlib.sha256).digest()).decode()
    assert f"v1,{digest}" in headers["webhook-signature"].split(" ")
    assert key_text.isalnum() and len(key_text) == 32
