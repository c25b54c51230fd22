"""Outbound events to a real local receiver that verifies the Standard Webhooks signature."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from gpuwarden.config import DeliveryConfig
from gpuwarden.events import Event, EventBus, Severity
from gpuwarden.sinks import DiscordWebhookSink, N8nSink

from .conftest import SimNode
from .standins import StandIn

SECRET = "whsec_" + base64.b64encode(b"receiver-secret-0123456789").decode()


class Receiver(StandIn):
    """A webhook receiver: verifies signatures, answers from a script of statuses."""

    def __init__(self, secret: str | None = SECRET) -> None:
        super().__init__()
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
        body = await request.read()
        if self.verifier is not None:
            try:
                self.verifier.verify(body, dict(request.headers))
            except Exception:
                self.bad_signatures += 1
                return web.json_response({"error": "bad signature"}, status=401)
        if self.script:
            status, payload = self.script.pop(0)
            return web.json_response(payload or {}, status=status)
        self.received.append({"headers": dict(request.headers), "body": await request.json()})
        return web.Response(status=204)


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)


FAST = DeliveryConfig(queue_size=5, max_attempts=4, backoff_base=0.05, backoff_max=0.2,
                      timeout=2)


async def _wait(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


def test_n8n_delivery_is_signed_and_retries_after_500_and_429() -> None:
    receiver = Receiver().start()
    receiver.script = [(500, None), (429, {"retry_after": 0.3, "global": False})]
    audit = Collect()

    async def scenario() -> None:
        bus = EventBus(audit)
        async with httpx.AsyncClient() as client:
            sink = N8nSink(f"{receiver.url}/hook", SECRET, FAST, bus, client, Severity.INFO)
            sink.start()
            bus.subscribe(sink.offer, sink.min_severity)
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


def test_wrong_secret_is_rejected_by_the_receiver_and_given_up() -> None:
    receiver = Receiver().start()
    other = "whsec_" + base64.b64encode(b"not-the-receivers-secret!!").decode()

    async def scenario() -> N8nSink:
        bus = EventBus(Collect())
        async with httpx.AsyncClient() as client:
            sink = N8nSink(f"{receiver.url}/hook", other, FAST, bus, client, Severity.INFO)
            sink.start()
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


def test_a_dead_receiver_recovers_and_a_slow_one_never_blocks_publishing() -> None:
    receiver = Receiver().start()
    receiver.up = False  # answers 503 until it comes back
    receiver.delay["/hook"] = 0.2

    async def scenario() -> tuple[float, N8nSink]:
        bus = EventBus(Collect())
        async with httpx.AsyncClient() as client:
            cfg = DeliveryConfig(queue_size=3, max_attempts=20, backoff_base=0.05,
                                 backoff_max=0.1, timeout=2)
            sink = N8nSink(f"{receiver.url}/hook", SECRET, cfg, bus, client, Severity.INFO)
            sink.start()
            bus.subscribe(sink.offer)
            started = time.monotonic()
            for i in range(10):
                bus.publish("vram.tier", f"event {i}", gpu=0)
            publish_s = time.monotonic() - started
            await asyncio.sleep(0.5)
            receiver.up = True
            await _wait(lambda: len(receiver.received) >= 3, timeout=20)
            await sink.close()
            return publish_s, sink

    try:
        publish_s, sink = asyncio.run(scenario())
    finally:
        receiver.stop()
    assert publish_s < 0.05  # publishing only enqueues
    # The queue holds 3: of 10 events the oldest were dropped and counted.
    assert sink.dropped >= 6
    messages = [r["body"]["message"] for r in receiver.received]
    assert "event 9" in messages


def test_discord_webhook_embed_and_404_disables() -> None:
    receiver = Receiver(secret=None).start()
    audit = Collect()

    async def scenario() -> DiscordWebhookSink:
        bus = EventBus(audit)
        async with httpx.AsyncClient() as client:
            sink = DiscordWebhookSink(f"{receiver.url}/hook", FAST, bus, client,
                                      Severity.WARNING)
            sink.start()
            bus.subscribe(sink.offer, sink.min_severity)
            bus.publish("vram.tier", "GPU 0 VRAM 91 %", severity=Severity.ERROR, gpu=0,
                        used_mib=18600, total_mib=20480, used_fraction=0.91,
                        requested_by=None, **{"from": "warn", "to": "alert"})
            bus.publish("mode.switch.completed", "info only")  # below warning
            await _wait(lambda: receiver.received)
            receiver.script = [(404, {"message": "Unknown Webhook", "code": 10015})]
            bus.publish("crashloop.blocked", "comfyui blocked", severity=Severity.CRITICAL,
                        workload="comfyui")
            await _wait(lambda: sink.disabled)
            bus.publish("crashloop.blocked", "again", severity=Severity.CRITICAL)
            await asyncio.sleep(0.2)
            await sink.close()
            return sink

    try:
        sink = asyncio.run(scenario())
    finally:
        receiver.stop()
    assert sink.disabled
    embed = receiver.received[0]["body"]["embeds"][0]
    assert embed["title"] == "ERROR: vram.tier"
    assert embed["color"] == 0xE67E22  # the alert tier's colour
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["GPU"] == "0" and fields["VRAM"] == "18600/20480 MiB (91%)"
    assert receiver.attempts == 2  # the 404 was not retried; nothing after disabling
    errors = [e for e in audit.events if e.name == "sink.error"]
    assert len(errors) == 1 and errors[0].fields["disabled"] is True


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
        assert sink["dropped"] == 0 and not sink["disabled"]
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
