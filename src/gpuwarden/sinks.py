"""Outbound events: signed JSON to n8n webhooks, embeds to a Discord webhook.

Each receiver has a bounded queue and a worker task, so a slow or dead receiver never
delays sampling or switching: publishing only enqueues (dropping the oldest event
when the queue is full, counted and logged). Failed deliveries are retried with
exponential backoff and full jitter; a 429 waits `retry_after`; a 404 disables the
receiver with an error event (Discord: a deleted webhook stays deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from .config import DeliveryConfig
from .events import Event, EventBus, Severity

__all__ = ["DiscordWebhookSink", "N8nSink", "WebhookSink", "discord_embed", "severity_named"]

log = logging.getLogger(__name__)

# Discord embed colours by severity.
_COLOURS = {
    Severity.DEBUG: 0x95A5A6,
    Severity.INFO: 0x3498DB,
    Severity.WARNING: 0xF1C40F,
    Severity.ERROR: 0xE67E22,
    Severity.CRITICAL: 0xE74C3C,
}
_TIER_COLOURS = {"ok": 0x2ECC71, "warn": 0xF1C40F, "alert": 0xE67E22, "critical": 0xE74C3C}


def severity_named(name: str) -> Severity:
    return Severity[name.upper()]


DeliveryStat = Callable[[str, str], None]  # (sink, outcome)


class WebhookSink:
    """One receiver: a bounded queue, a worker, retries. Subclasses shape the request."""

    kind = "webhook"

    def __init__(self, url: str, config: DeliveryConfig, bus: EventBus,
                 client: httpx.AsyncClient, min_severity: Severity,
                 on_stat: DeliveryStat | None = None) -> None:
        self.url = url
        self.config = config
        self.min_severity = min_severity
        self.disabled = False
        self.delivered = 0
        self.dropped = 0
        self.failed = 0
        self._bus = bus
        self._client = client
        self._on_stat = on_stat
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=config.queue_size)
        self._worker: asyncio.Task[None] | None = None
        self._boot = uuid.uuid4().hex[:8]

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.url.split('?')[0][:60]}"

    def _stat(self, outcome: str) -> None:
        if self._on_stat is not None:
            self._on_stat(self.kind, outcome)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    def offer(self, event: Event) -> None:
        """Enqueue without waiting (called on the loop by the bus)."""
        if self.disabled or event.severity < self.min_severity:
            return
        if event.name == "sink.error" and event.fields.get("sink") == self.name:
            return  # never report a receiver's trouble to that receiver
        if self._queue.full():
            dropped = self._queue.get_nowait()
            self.dropped += 1
            self._stat("dropped")
            log.warning("%s: queue full (%d), dropped event %d (%s)", self.name,
                        self.config.queue_size, dropped.id, dropped.name)
        self._queue.put_nowait(event)

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._deliver(event)
            finally:
                self._queue.task_done()

    def message_id(self, event: Event) -> str:
        # Stable across retries: receivers can use it to drop duplicates.
        return f"msg_{self._boot}_{event.id}"

    def request(self, event: Event) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    async def _deliver(self, event: Event) -> None:
        cfg = self.config
        for attempt in range(1, cfg.max_attempts + 1):
            if self.disabled:
                return
            body, headers = self.request(event)
            delay: float | None = None
            try:
                resp = await self._client.post(self.url, content=body, headers=headers,
                                               timeout=cfg.timeout)
            except httpx.HTTPError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            else:
                if resp.is_success:
                    self.delivered += 1
                    self._stat("delivered")
                    return
                outcome = f"HTTP {resp.status_code}"
                if resp.status_code == 404:
                    self._disable(f"{self.url} answered 404 (the webhook is gone)")
                    return
                if resp.status_code == 429:
                    delay = _retry_after(resp)
                elif 400 <= resp.status_code < 500 and resp.status_code != 408:
                    self._give_up(event, outcome, attempt)
                    return
            if attempt == cfg.max_attempts:
                break
            if delay is None:
                # Exponential backoff with full jitter.
                delay = random.uniform(0, min(cfg.backoff_max,
                                              cfg.backoff_base * 2 ** (attempt - 1)))
            self._stat("retried")
            log.info("%s: event %d attempt %d failed (%s); retrying in %.2fs", self.name,
                     event.id, attempt, outcome, delay)
            await asyncio.sleep(delay)
        self._give_up(event, outcome, cfg.max_attempts)

    def _give_up(self, event: Event, outcome: str, attempts: int) -> None:
        self.failed += 1
        self._stat("failed")
        log.warning("%s: gave up on event %d after %d attempt(s): %s", self.name, event.id,
                    attempts, outcome)

    def _disable(self, why: str) -> None:
        self.disabled = True
        self._stat("disabled")
        self._bus.publish("sink.error", f"{self.name} disabled: {why}",
                          severity=Severity.ERROR, sink=self.name, disabled=True, reason=why)

    def status(self) -> dict[str, Any]:
        return {"sink": self.name, "disabled": self.disabled, "queued": self._queue.qsize(),
                "delivered": self.delivered, "failed": self.failed, "dropped": self.dropped}

    async def close(self, drain_s: float = 2.0) -> None:
        """Give queued events a moment to go out, then stop."""
        if self._worker is None:
            return
        if not self._queue.empty():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), drain_s)
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)


def _retry_after(resp: httpx.Response) -> float:
    """Discord's 429: `retry_after` (seconds, float) in the body, else Retry-After."""
    try:
        value = float(resp.json().get("retry_after"))
    except (ValueError, TypeError, AttributeError):
        try:
            value = float(resp.headers.get("retry-after", "1"))
        except ValueError:
            value = 1.0
    return max(0.0, min(value, 300.0))


class N8nSink(WebhookSink):
    """The event as JSON, signed with the Standard Webhooks scheme when a secret is set."""

    kind = "n8n"

    def __init__(self, url: str, secret: str | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self._signer = Webhook(secret) if secret else None

    def request(self, event: Event) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(event.to_dict(), default=str, separators=(",", ":"))
        headers = {"content-type": "application/json", "user-agent": "gpuwarden"}
        msg_id = self.message_id(event)
        now = datetime.now(tz=UTC)
        headers["webhook-id"] = msg_id
        headers["webhook-timestamp"] = str(int(now.timestamp()))
        if self._signer is not None:
            headers["webhook-signature"] = self._signer.sign(msg_id, now, body)
        return body.encode(), headers


def discord_embed(event: Event) -> dict[str, Any]:
    """An embed for one event: colour by severity (tier colours for vram.tier)."""
    colour = _COLOURS[event.severity]
    if event.name == "vram.tier":
        colour = _TIER_COLOURS.get(str(event.fields.get("to")), colour)
    fields: list[dict[str, Any]] = []
    f = event.fields
    if "gpu" in f:
        fields.append({"name": "GPU", "value": str(f["gpu"]), "inline": True})
    if "used_mib" in f and "total_mib" in f:
        pct = f.get("used_fraction")
        fields.append({"name": "VRAM", "value": f"{f['used_mib']}/{f['total_mib']} MiB"
                       + (f" ({float(pct):.0%})" if pct is not None else ""), "inline": True})
    if "mode" in f:
        fields.append({"name": "Mode", "value": str(f["mode"]), "inline": True})
    if "workload" in f:
        fields.append({"name": "Workload", "value": str(f["workload"]), "inline": True})
    if "timings" in f and isinstance(f["timings"], dict):
        fields.append({"name": "Timings", "value": ", ".join(
            f"{k} {v:.2f}s" for k, v in f["timings"].items() if isinstance(v, int | float)),
            "inline": False})
    if event.requested_by:
        fields.append({"name": "Requested by", "value": event.requested_by, "inline": True})
    return {
        "title": f"{event.severity.label.upper()}: {event.name}",
        "description": event.message[:4000],
        "color": colour,
        "fields": fields[:25],
        "timestamp": datetime.fromtimestamp(event.time, tz=UTC).isoformat(),
        "footer": {"text": f"gpuwarden event {event.id}"},
    }


class DiscordWebhookSink(WebhookSink):
    kind = "discord"

    def request(self, event: Event) -> tuple[bytes, dict[str, str]]:
        body = {"username": "gpuwarden", "embeds": [discord_embed(event)],
                "allowed_mentions": {"parse": []}}
        return json.dumps(body).encode(), {"content-type": "application/json",
                                           "user-agent": "gpuwarden"}
