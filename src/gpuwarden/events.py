"""Typed events, the audit trail, and fan-out to subscribers.

Every event is recorded once in the audit log (journald fields under systemd, JSON
lines on stdout elsewhere), kept in a bounded ring for polling clients, and handed to
every subscriber whose minimum severity it meets.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .state import write_atomically

__all__ = ["AuditWriter", "DurableEventIds", "Event", "EventBus", "Severity", "alert_group"]

log = logging.getLogger(__name__)


class Severity(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40
    CRITICAL = 50

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Event:
    """One fact worth auditing. `name` is a stable dotted name (docs/events.md)."""

    id: int
    name: str
    severity: Severity
    message: str
    time: float  # unix seconds
    requested_by: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id,
            "event": self.name,
            "severity": self.severity.label,
            "message": self.message,
            "time": self.time,
        }
        if self.requested_by is not None:
            doc["requested_by"] = self.requested_by
        doc.update(self.fields)
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Event:
        """The event `to_dict()` made (as stored in an outbox)."""
        rest = dict(doc)
        return cls(id=int(rest.pop("id")), name=str(rest.pop("event")),
                   severity=Severity[str(rest.pop("severity")).upper()],
                   message=str(rest.pop("message")), time=float(rest.pop("time")),
                   requested_by=rest.pop("requested_by", None), fields=rest)


def alert_group(name: str, fields: dict[str, Any]) -> tuple[str, bool] | None:
    """The alert group an event belongs to, and whether it resolves it; None for events
    that are not part of an alert and its resolution. Both carry the same group key
    (as Alertmanager's `send_resolved` pairs them), so a receiver can match them."""
    gpu = fields.get("gpu")
    where = "node" if gpu is None else f"gpu{gpu}"
    if name == "vram.tier":
        return f"vram.tier:{where}", fields.get("to") == "ok"
    if name == "vram.leak":
        return f"vram.leak:{where}:{fields.get('kind')}", bool(fields.get("recovered"))
    if name == "gpu.error":
        return f"gpu.error:{where}", bool(fields.get("recovered"))
    if name in ("docker.error", "systemd.error"):
        return name, bool(fields.get("recovered"))
    if name in ("crashloop.blocked", "crashloop.unblocked"):
        return f"crashloop:{fields.get('workload')}", name == "crashloop.unblocked"
    if name in ("sink.failing", "sink.recovered"):
        return f"sink:{fields.get('sink')}", name == "sink.recovered"
    if name in ("discord.disconnected", "discord.connected"):
        return "discord", name == "discord.connected"
    if name in ("proxy.overload", "proxy.overload.ended"):
        return f"proxy.overload:{fields.get('proxy')}", name == "proxy.overload.ended"
    return None


class AuditWriter(Protocol):
    def write(self, event: Event) -> None: ...


Subscriber = Callable[[Event], None]


class DurableEventIds(Iterator[int]):
    """Event ids that keep rising across daemon restarts.

    A client polls `/v1/events?since=<the last id it saw>`; ids that began at 1 again
    after a restart would hide every new event from it until they caught up. So ids
    are reserved a block at a time in a file of the state directory before they are
    used (hi-lo): a crash skips the rest of a block and never hands an id out twice.
    A file that cannot be read starts from the time in milliseconds, far above any id
    a block count reaches; one that cannot be written is logged, and numbering goes on.
    """

    def __init__(self, path: Path, *, block: int = 10_000) -> None:
        self._path = path
        self._block = block
        self._next = self._first()
        self._limit = self._next  # nothing reserved yet

    def _first(self) -> int:
        try:
            return max(1, int(self._path.read_text(encoding="ascii").strip()))
        except FileNotFoundError:
            return 1
        except (OSError, ValueError) as exc:
            first = int(time.time() * 1000)
            log.warning("event ids: %s is unreadable (%s); numbering from %d",
                        self._path, exc, first)
            return first

    def __next__(self) -> int:
        # The write (with fsync) runs wherever the event is published, the loop
        # included: once per block, and once at start, which is why blocks are large.
        if self._next >= self._limit:
            self._limit = self._next + self._block
            try:
                write_atomically(self._path, f"{self._limit}\n".encode())
            except OSError as exc:
                log.warning("event ids: cannot reserve ids in %s (%s); ids may repeat "
                            "after a restart", self._path, exc.strerror or exc)
        self._next += 1
        return self._next - 1


class EventBus:
    """Numbers events, audits each once, keeps the last `ring_size`, and fans out."""

    def __init__(self, audit: AuditWriter, *, ring_size: int = 1000,
                 ids: Iterator[int] | None = None) -> None:
        """`ids` numbers the events (DurableEventIds in the daemon); 1, 2, … without."""
        self._audit = audit
        self._ring: deque[Event] = deque(maxlen=ring_size)
        self._ids = ids if ids is not None else itertools.count(1)
        self._lock = threading.Lock()
        self._subscribers: list[tuple[Severity, Subscriber]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Followers (event streams) waiting for the next event, on the loop.
        self._waiters: set[asyncio.Future[None]] = set()
        self.streams_closed = False

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Subscribers run on this loop; events published from other threads hop onto it."""
        self._loop = loop

    def subscribe(self, callback: Subscriber, min_severity: Severity = Severity.DEBUG) -> None:
        self._subscribers.append((min_severity, callback))

    def unsubscribe(self, callback: Subscriber) -> None:
        """Stop calling `callback` (a receiver replaced by a reload)."""
        self._subscribers = [(s, c) for s, c in self._subscribers if c != callback]

    def publish(
        self,
        name: str,
        message: str,
        *,
        severity: Severity = Severity.INFO,
        requested_by: str | None = None,
        **fields: Any,
    ) -> Event:
        group = alert_group(name, fields)
        if group is not None and "group_key" not in fields:
            fields = {**fields, "group_key": group[0], "resolved": group[1]}
        with self._lock:
            event = Event(
                id=next(self._ids),
                name=name,
                severity=severity,
                message=message,
                time=time.time(),
                requested_by=requested_by,
                fields=fields,
            )
            self._ring.append(event)
            self._audit.write(event)
        self._fan_out(event)
        self._call_on_loop(self._wake)
        return event

    def _call_on_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None and not _on_loop(loop):
            if not loop.is_closed():
                loop.call_soon_threadsafe(fn)
        else:
            fn()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def last_id(self) -> int:
        """The id of the newest event (0 before the first)."""
        with self._lock:
            return self._ring[-1].id if self._ring else 0

    async def wait_after(self, event_id: int, timeout: float) -> None:
        """Return once there is an event after `event_id`, after `timeout` seconds, or
        when the streams are closed (the daemon stopping). Call on the bound loop."""
        if self.last_id() > event_id or self.streams_closed:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            if self.last_id() <= event_id:  # an event published meanwhile wakes no one
                await asyncio.wait([waiter], timeout=timeout)
        finally:
            self._waiters.discard(waiter)

    def close_streams(self) -> None:
        """End every follower's wait, for good: the daemon is stopping."""
        self.streams_closed = True
        self._call_on_loop(self._wake)

    def _fan_out(self, event: Event) -> None:
        loop = self._loop
        for min_severity, callback in self._subscribers:
            if event.severity < min_severity:
                continue
            if loop is not None and not _on_loop(loop):
                loop.call_soon_threadsafe(callback, event)
            else:
                callback(event)

    def since(self, event_id: int = 0, limit: int = 500) -> list[Event]:
        """Events with an id above `event_id`, oldest first (at most `limit`)."""
        with self._lock:
            found = [e for e in self._ring if e.id > event_id]
        return found[:limit]

    def last(self, predicate: Callable[[Event], bool]) -> Event | None:
        with self._lock:
            for event in reversed(self._ring):
                if predicate(event):
                    return event
        return None


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
