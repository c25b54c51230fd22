"""A consumer of the Docker event stream that survives engine restarts.

The SDK's stream blocks, so it is read in a worker thread and stopped with
`close()`. When the engine restarts or the socket drops, it reconnects with
exponential backoff and resumes with `since` = the last event's time, so no event
is missed; events seen twice across a reconnect (same time, container and action)
are dropped, so none is counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import requests.exceptions

from .config import DockerConfig

__all__ = ["ContainerEvent", "DockerEventWatcher"]

log = logging.getLogger(__name__)

WATCHED_ACTIONS = ("start", "die", "oom", "stop", "kill", "restart", "destroy", "update")


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    action: str
    container_id: str
    name: str
    time_ns: int
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int | None:
        code = self.attributes.get("exitCode")
        return int(code) if code is not None and code.lstrip("-").isdigit() else None


def parse_event(raw: dict[str, Any]) -> ContainerEvent | None:
    if raw.get("Type") != "container":
        return None
    action = str(raw.get("Action", ""))
    # health_status events carry a suffix ("health_status: healthy")
    action = action.split(":", 1)[0]
    actor = raw.get("Actor", {}) or {}
    attrs = {str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()}
    time_ns = int(raw.get("timeNano") or int(raw.get("time", 0)) * 1_000_000_000)
    return ContainerEvent(action=action, container_id=str(actor.get("ID", "")),
                          name=attrs.get("name", "").lstrip("/"), time_ns=time_ns,
                          attributes=attrs)


Handler = Callable[[ContainerEvent], None]
StateHandler = Callable[[bool, str], None]


class DockerEventWatcher:
    """Reads container events in a thread and hands each to `handler` on the loop."""

    def __init__(self, config: DockerConfig, handler: Handler,
                 on_connection: StateHandler | None = None, *,
                 max_backoff: float = 10.0) -> None:
        self._config = config
        self._handler = handler
        self._on_connection = on_connection
        self._max_backoff = max_backoff
        self._stop = threading.Event()
        self._stream: Any = None
        self._client: docker.DockerClient | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._since_ns = time.time_ns()
        self._recent: deque[tuple[int, str, str]] = deque(maxlen=512)
        self.connected = False
        self._down = False
        self.reconnects = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self._thread.start()

    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _set_connected(self, connected: bool, detail: str) -> None:
        # Reported are losses and the recovery after one, not the first connection.
        was_down = self._down
        self.connected, self._down = connected, not connected
        if self._on_connection is not None and connected == was_down:
            self._deliver(self._on_connection, connected, detail)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._client = docker.DockerClient(base_url=self._config.resolved_host(),
                                                   timeout=int(self._config.timeout))
                # Resume from the last event seen (Docker's `since` is inclusive and
                # second-granular with a fraction: duplicates are filtered below).
                since = f"{self._since_ns // 1_000_000_000}.{self._since_ns % 1_000_000_000:09d}"
                self._stream = self._client.events(
                    since=since, decode=True,
                    filters={"type": "container", "event": list(WATCHED_ACTIONS)},
                )
                self._set_connected(True, "")
                backoff = 0.2
                for raw in self._stream:
                    event = parse_event(raw)
                    if event is None:
                        continue
                    key = (event.time_ns, event.container_id, event.action)
                    if key in self._recent:
                        continue
                    self._recent.append(key)
                    self._since_ns = max(self._since_ns, event.time_ns)
                    self._deliver(self._handler, event)
                if self._stop.is_set():
                    break
                raise ConnectionError("event stream ended")
            except (docker.errors.DockerException, requests.exceptions.RequestException,
                    OSError, ConnectionError) as exc:
                if self._stop.is_set():
                    break
                self._set_connected(False, str(exc))
                self.reconnects += 1
                log.debug("docker events: %s; reconnecting in %.1fs", exc, backoff)
            finally:
                self._close_client()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    def _close_client(self) -> None:
        stream, client = self._stream, self._client
        self._stream, self._client = None, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # closing a broken stream may raise anything from urllib3
                log.debug("closing the event stream failed", exc_info=True)
        if client is not None:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()  # unblocks the reading thread
            except Exception:
                log.debug("closing the event stream failed", exc_info=True)
        if self._thread is not None:
            self._thread.join(timeout=5)
