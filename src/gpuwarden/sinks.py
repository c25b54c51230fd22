"""Outbound events: signed JSON to n8n webhooks, embeds to a Discord webhook.

Each receiver has a bounded queue and a worker task, so a slow or dead receiver never
delays sampling or switching: publishing only enqueues (dropping the oldest event
when the queue is full, counted and logged). Failed deliveries are retried with
exponential backoff and full jitter; a 429 waits `retry_after`. No answer disables a
receiver for good: 404 and 410 (an n8n workflow deactivated, or n8n restarting),
5xx, timeouts and refused connections all mean "failing", which starts an episode
(`sink.failing` to the other receivers, once) that its next delivery ends
(`sink.recovered`, once).

A receiver is named by scheme, host, port and path only: userinfo, the query and a
Discord webhook's token never reach status, events, logs or metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

from .config import DeliveryConfig
from .events import Event, EventBus, Severity
from .outbox import Entry, Outbox

__all__ = [
    "Attempt",
    "DiscordWebhookSink",
    "N8nSink",
    "OutboxSink",
    "WebhookSink",
    "discord_embed",
    "receiver_name",
    "severity_named",
]

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


# Answers that say "this receiver is failing", not "this event is wrong": retried.
_FAILING_STATUSES = {404, 408, 410, 425, 429}


def receiver_name(url: str) -> str:
    """scheme://host[:port]/path of a receiver's URL: no userinfo, no query, no fragment,
    and a Discord webhook's path without its token (/api/webhooks/<id>)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    path = parts.path
    segments = path.split("/")
    if "webhooks" in segments:
        # Discord (and Slack-compatible) webhooks: /api/webhooks/<id>/<token>[/slack]
        at = segments.index("webhooks")
        path = "/".join(segments[:at + 2])
    return f"{parts.scheme}://{host}{port}{path}"


def _secrets_of(url: str) -> list[str]:
    """The parts of a URL that must never be shown, longest first."""
    parts = urlsplit(url)
    found = [url, parts.query, parts.password or "", parts.username or "",
             parts.netloc if "@" in parts.netloc else ""]
    segments = parts.path.split("/")
    if "webhooks" in segments:
        found.extend(segments[segments.index("webhooks") + 2:])
    return sorted({f for f in found if len(f) >= 4}, key=len, reverse=True)


DeliveryStat = Callable[[str, str], None]  # (sink, outcome)
T = TypeVar("T")

# At most one `sink.dropped` event per receiver this often (the count adds up).
_DROP_REPORT_S = 60.0


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt came to."""

    outcome: Literal["delivered", "rejected", "failing"]
    detail: str = ""  # why it was rejected or is failing (redacted)
    retry_after: float | None = None  # the receiver asked to wait this long (a 429)


class OutboxSink:
    """One receiver: a durable outbox, a worker, retries, failing episodes, resolutions.

    Subclasses say how an attempt is made (`attempt`) and how many events one attempt
    may carry (`batch`).
    """

    kind = "sink"
    batch = 1  # events per attempt

    def __init__(self, name: str, config: DeliveryConfig, bus: EventBus,
                 min_severity: Severity, outbox_dir: Path,
                 on_stat: DeliveryStat | None = None, secrets: list[str] | None = None
                 ) -> None:
        self.config = config
        self.min_severity = min_severity
        self.name = f"{self.kind}:{name}"
        self._secrets = secrets or []
        self.failing_since: float | None = None  # unix seconds; None while it delivers
        self.last_error: str | None = None  # redacted
        self.next_try_at: float | None = None  # unix seconds of the next retry
        self.delivered = 0
        self.dropped = 0
        self.failed = 0
        self._bus = bus
        self._on_stat = on_stat
        # The file is named by a hash of the receiver's name: no secret in it, and new
        # credentials for the same receiver keep its queued events.
        digest = hashlib.sha256(self.name.encode()).hexdigest()[:16]
        self.outbox_path = outbox_dir / f"{self.kind}-{digest}.sqlite"
        self._outbox: Outbox | None = None
        # One thread per outbox: SQLite connections stay in their thread, and the
        # events stay in the order they were offered.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"outbox-{digest[:6]}")
        self._open_groups: set[str] = set()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._posting = False  # an attempt is on the wire: close lets it finish
        self._dropped_unreported = 0
        self._drop_reported_at = 0.0

    async def attempt(self, entries: list[Entry]) -> Attempt:
        """Send `entries` (at most `batch`, oldest first) once."""
        raise NotImplementedError

    def about_itself(self, event: Event) -> bool:
        """An event about this receiver's own trouble: it could only arrive late."""
        return event.name.startswith("sink.") and event.fields.get("sink") == self.name

    @property
    def open_groups(self) -> set[str]:
        """Alert groups this receiver was sent an alert for and no resolution yet."""
        return set(self._open_groups)

    def redact(self, text: str) -> str:
        """`text` with this receiver's secrets replaced; the first (the whole URL, the
        longest) by the receiver's name, the others by ***."""
        for secret in self._secrets:
            text = text.replace(secret, self.name if secret == self._secrets[0] else "***")
        return text

    @property
    def queued(self) -> int:
        """Events waiting on disk, as the outbox's last write left them."""
        return 0 if self._outbox is None else self._outbox.queued

    def _stat(self, outcome: str) -> None:
        if self._on_stat is not None:
            self._on_stat(self.name, outcome)

    async def _io_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def start(self) -> None:
        """Open the outbox (what an earlier run left undelivered is sent first)."""
        outbox = self._outbox = await self._io_call(Outbox, self.outbox_path,
                                                    self.config.queue_size)
        if outbox.set_aside is not None:
            self._bus.publish(
                "sink.error", f"{self.name}: its outbox was unreadable and is set aside as "
                f"{outbox.set_aside.name}; starting an empty one", severity=Severity.ERROR,
                sink=self.name, set_aside=str(outbox.set_aside))
        self._open_groups = await self._io_call(outbox.open_groups)
        # An outage that outlived a restart stays one episode (announced once).
        self.failing_since = await self._io_call(outbox.failing_since)
        self._worker = asyncio.get_running_loop().create_task(self._run())

    def offer(self, event: Event) -> None:
        """Queue an event on disk without waiting (called on the loop by the bus)."""
        outbox = self._outbox
        if outbox is None:
            return
        if self.about_itself(event):
            return  # never report a receiver's trouble to that receiver
        group = event.fields.get("group_key")
        resolves = bool(event.fields.get("resolved"))
        if event.severity < self.min_severity and not (
                resolves and isinstance(group, str) and group in self._open_groups):
            return  # below the threshold, and not the resolution of an alert it was sent
        if isinstance(group, str) and resolves != (group not in self._open_groups):
            if resolves:
                self._open_groups.discard(group)
            else:
                self._open_groups.add(group)
            self._io.submit(outbox.mark_group, group, not resolves)
        queued = self._io.submit(outbox.put, event.to_dict())
        queued.add_done_callback(self._queued_callback(event))
        self._wake.set()

    def _queued_callback(self, event: Event) -> Callable[[Future[tuple[int, int]]], None]:
        loop = asyncio.get_running_loop()

        def done(future: Future[tuple[int, int]]) -> None:
            loop.call_soon_threadsafe(self._on_queued, event, future)
        return done

    def _on_queued(self, event: Event, future: Future[tuple[int, int]]) -> None:
        try:
            _, dropped = future.result()
        except Exception as exc:  # a full disk: the event is lost, and said so in the log
            log.error("%s: cannot queue event %d (%s): %s", self.name, event.id, event.name,
                      exc)
            self.dropped += 1
            return
        if not dropped:
            return
        self.dropped += dropped
        self._dropped_unreported += dropped
        for _ in range(dropped):
            self._stat("dropped")
        log.warning("%s: outbox full (%d), dropped the oldest %d event(s)", self.name,
                    self.config.queue_size, dropped)
        now = time.monotonic()
        if now - self._drop_reported_at >= _DROP_REPORT_S:
            self._drop_reported_at = now
            count, self._dropped_unreported = self._dropped_unreported, 0
            self._bus.publish(
                "sink.dropped", f"{self.name}: outbox full ({self.config.queue_size}), "
                f"dropped the oldest {count} event(s)", severity=Severity.WARNING,
                sink=self.name, dropped=count, dropped_total=self.dropped)

    async def _run(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        while True:
            self._wake.clear()
            entries = await self._io_call(outbox.peek, self.batch)
            if not entries:
                await self._wake.wait()
                continue
            await self._deliver(entries)
            await self._io_call(outbox.remove, [e.seq for e in entries])

    async def _deliver(self, entries: list[Entry]) -> None:
        """Try until the receiver takes the events, or rejects those very events."""
        cfg = self.config
        attempt = 0
        first = entries[0].doc.get("id")
        while True:
            attempt += 1
            self._posting = True
            try:
                result = await self.attempt(entries)
            except Exception as exc:  # never let one attempt end the worker
                log.exception("%s: delivery attempt failed unexpectedly", self.name)
                result = Attempt("failing", self.redact(f"{type(exc).__name__}: {exc}"))
            finally:
                self._posting = False
            if result.outcome == "delivered":
                self.delivered += len(entries)
                for _ in entries:
                    self._stat("delivered")
                self._recovered()
                return
            if result.outcome == "rejected":
                # The receiver is there and rejects these events (a bad signature, a
                # body it refuses): retrying the same bytes cannot help.
                self.failed += len(entries)
                for _ in entries:
                    self._stat("failed")
                log.warning("%s: event %s rejected with %s; not retried", self.name, first,
                            result.detail)
                return
            self._failing(result.detail)
            delay = result.retry_after
            if delay is None:
                # Exponential backoff with full jitter, capped at backoff_max.
                delay = random.uniform(0, min(cfg.backoff_max,
                                              cfg.backoff_base * 2 ** min(attempt - 1, 30)))
            self._stat("retried")
            self.next_try_at = time.time() + delay
            log.info("%s: event %s attempt %d failed (%s); retrying in %.2fs", self.name,
                     first, attempt, result.detail, delay)
            await asyncio.sleep(delay)

    def _failing(self, why: str) -> None:
        """A failed attempt: the first starts an episode, announced once."""
        self.last_error = why
        if self.failing_since is not None:
            return
        self.failing_since = time.time()
        if self._outbox is not None:
            self._io.submit(self._outbox.set_failing_since, self.failing_since)
        self._stat("failing")
        self._bus.publish("sink.failing", f"{self.name} is failing: {why}; retrying",
                          severity=Severity.ERROR, sink=self.name, reason=why)

    def _recovered(self) -> None:
        self.next_try_at = None
        if self.failing_since is None:
            return
        since, self.failing_since = self.failing_since, None
        if self._outbox is not None:
            self._io.submit(self._outbox.set_failing_since, None)
        self._bus.publish("sink.recovered",
                          f"{self.name} delivers again after {time.time() - since:.1f} s",
                          sink=self.name, failing_since=since, last_error=self.last_error)

    def status(self) -> dict[str, Any]:
        return {"sink": self.name, "state": "ok" if self.failing_since is None else "failing",
                "failing_since": self.failing_since, "last_error": self.last_error,
                "next_try_at": self.next_try_at, "queued": self.queued,
                "delivered": self.delivered, "failed": self.failed, "dropped": self.dropped}

    async def close(self, drain_s: float = 2.0) -> None:
        """Give queued events a moment to go out, then stop; the rest stay on disk.

        A failing receiver gets no drain, but an attempt already on the wire is let
        finish (within `drain_s`): the receiver may have taken it, and cutting it off
        would lose the count and the recovery, and send it again at the next start.
        """
        if self._worker is not None and self._outbox is not None:
            deadline = time.monotonic() + drain_s
            while time.monotonic() < deadline:
                if self.failing_since is not None:
                    if not self._posting:
                        break
                # Counted through the outbox's thread: after every event offered so far
                # is on disk, and until the last delivered one is taken off.
                elif not await self._io_call(self._outbox.count):
                    break
                await asyncio.sleep(0.02)
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        # From here on offer() ignores events: the daemon still publishes while it shuts
        # down, and a submit to a shut executor would raise in the publisher.
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            await self._io_call(outbox.close)  # after everything submitted before it
        self._io.shutdown(wait=False)  # nothing is left to wait for; never block the loop


class WebhookSink(OutboxSink):
    """An HTTP receiver: one event per POST. Subclasses shape the request."""

    kind = "webhook"

    def __init__(self, url: str, config: DeliveryConfig, bus: EventBus,
                 client: httpx.AsyncClient, min_severity: Severity, outbox_dir: Path,
                 on_stat: DeliveryStat | None = None) -> None:
        super().__init__(receiver_name(url), config, bus, min_severity, outbox_dir, on_stat,
                         _secrets_of(url))
        self.url = url
        self._client = client

    def request(self, entry: Entry) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    async def attempt(self, entries: list[Entry]) -> Attempt:
        (entry,) = entries
        body, headers = self.request(entry)
        try:
            resp = await self._client.post(self.url, content=body, headers=headers,
                                           timeout=self.config.timeout)
        except httpx.HTTPError as exc:
            return Attempt("failing", self.redact(f"{type(exc).__name__}: {exc}".rstrip(": ")))
        if resp.is_success:
            return Attempt("delivered")
        outcome = f"HTTP {resp.status_code}"
        if resp.status_code == 429 or "retry-after" in resp.headers:
            return Attempt("failing", outcome, _retry_after(resp))
        if resp.status_code < 500 and resp.status_code not in _FAILING_STATUSES:
            return Attempt("rejected", outcome)
        return Attempt("failing", outcome)


def _retry_after(resp: httpx.Response) -> float:
    """Discord's 429: `retry_after` (seconds, float) in the body, else the Retry-After
    header (seconds) any receiver may send with a 429 or 503."""
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

    def __init__(self, url: str, secret: str | None, *args: Any,
                 auth: tuple[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self._signer = Webhook(secret) if secret else None
        self._auth = auth  # (header, value) for n8n's Header Auth

    def request(self, entry: Entry) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(entry.doc, default=str, separators=(",", ":"))
        headers = {"content-type": "application/json", "user-agent": "gpuwarden"}
        msg_id = entry.msg_id
        now = datetime.now(tz=UTC)
        headers["webhook-id"] = msg_id
        headers["webhook-timestamp"] = str(int(now.timestamp()))
        if self._signer is not None:
            headers["webhook-signature"] = self._signer.sign(msg_id, now, body)
        if self._auth is not None:
            headers[self._auth[0]] = self._auth[1]
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

    def request(self, entry: Entry) -> tuple[bytes, dict[str, str]]:
        body = {"username": "gpuwarden", "embeds": [discord_embed(Event.from_dict(entry.doc))],
                "allowed_mentions": {"parse": []}}
        return json.dumps(body).encode(), {"content-type": "application/json",
                                           "user-agent": "gpuwarden"}
