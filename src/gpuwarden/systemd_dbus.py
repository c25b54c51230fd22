"""systemd's manager over D-Bus: start, stop and watch units, and start transient ones.

The library is dbus-fast: asyncio-native (no GLib main loop, no libsystemd to link),
pure Python with optional compiled speedups, typed signatures, and maintained (it
carries Home Assistant's Bluetooth stack, releases every few weeks). It speaks the
wire protocol itself, so nothing parses `systemctl` output.

The connection lives on its own thread and event loop. Workloads are blocking
objects called from worker threads, so each call here is one blocking round trip
onto that loop, and the daemon's loop is never where a D-Bus reply is awaited. Unit
property changes (PropertiesChanged, after the manager's `Subscribe`) are handed to
a callback on the bus thread; the daemon forwards them to its own loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

__all__ = [
    "SystemdBus",
    "SystemdBusError",
    "UnitChange",
    "escape_instance",
    "unit_object_path",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"

# (unit name, interface, changed properties as plain values)
UnitChange = Callable[[str, str, dict[str, Any]], None]


class SystemdBusError(Exception):
    """A D-Bus call failed: `name` is the D-Bus error name (empty when the bus itself
    could not be reached)."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.name = name

    @property
    def no_such_unit(self) -> bool:
        """The unit is not loaded (a transient unit that ended, or no such unit)."""
        return self.name == "org.freedesktop.systemd1.NoSuchUnit"

    @property
    def access_denied(self) -> bool:
        return self.name in ("org.freedesktop.DBus.Error.AccessDenied",
                             "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired")


def unit_object_path(unit: str) -> str:
    """The manager's object path of `unit` (sd-bus's label escaping)."""
    escaped = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}"
                      for c in unit)
    return f"{MANAGER_PATH}/unit/{escaped}"


def escape_instance(text: str) -> str:
    """`systemd-escape TEXT`: the instance part of a template unit's name."""
    out = []
    for i, char in enumerate(text):
        if char == "/":
            out.append("-")
        elif (char.isascii() and (char.isalnum() or char in ":_.")) and not (
                i == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"\\x{b:02x}" for b in char.encode())
    return "".join(out)


def _plain(value: Any) -> Any:
    """Variants unwrapped, recursively, so callers see ordinary Python values."""
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class SystemdBus:
    """A connection to systemd's manager (the system bus unless `address` says else)."""

    def __init__(self, address: str | None = None, *, call_timeout: float = 25.0) -> None:
        self._address = address
        self._call_timeout = call_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="systemd-dbus",
                                        daemon=True)
        self._thread.start()
        self._bus: MessageBus | None = None
        self._connecting: asyncio.Lock | None = None
        self._watched: dict[str, str] = {}  # object path -> unit name
        self._on_change: UnitChange | None = None
        # Jobs finished (JobRemoved) by path: a job can end before its caller has
        # read the reply that named it.
        self._jobs_done: OrderedDict[str, str] = OrderedDict()
        self._job_waiters: dict[str, asyncio.Future[str]] = {}

    # --- plumbing -------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the bus thread and wait for it (never call from that thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout if timeout is not None else self._call_timeout + 5)
        except TimeoutError as exc:
            future.cancel()
            raise SystemdBusError("systemd did not answer in time") from exc

    async def _connected(self) -> MessageBus:
        if self._bus is not None and self._bus.connected:
            return self._bus
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._bus is not None and self._bus.connected:
                return self._bus
            try:
                bus = MessageBus(bus_address=self._address, bus_type=BusType.SYSTEM)
                await asyncio.wait_for(bus.connect(), self._call_timeout)
            except Exception as exc:  # refused, no socket, auth, timeout
                raise SystemdBusError(f"cannot reach the system bus: {exc}") from exc
            bus.add_message_handler(self._on_message)
            self._bus = bus
            # Unit and job signals are sent to subscribed clients only.
            await self._call_on(bus, MANAGER_PATH, MANAGER, "Subscribe")
            await self._match(bus, f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',"
                                   "member='JobRemoved'")
            for path in self._watched:
                await self._match_properties(bus, path)
            return bus

    async def _match(self, bus: MessageBus, rule: str) -> None:
        await self._call_on(bus, "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch",
                            "s", [rule], destination="org.freedesktop.DBus")

    async def _match_properties(self, bus: MessageBus, path: str) -> None:
        await self._match(bus, f"type='signal',sender='{SYSTEMD}',path='{path}',"
                               f"interface='{PROPERTIES}',member='PropertiesChanged'")

    async def _call_on(self, bus: MessageBus, path: str, interface: str, member: str,
                       signature: str = "", body: list[Any] | None = None, *,
                       destination: str = SYSTEMD) -> list[Any]:
        message = Message(destination=destination, path=path, interface=interface,
                          member=member, signature=signature, body=body or [])
        try:
            reply = await asyncio.wait_for(bus.call(message), self._call_timeout)
        except TimeoutError as exc:
            raise SystemdBusError(f"{member}: no answer from systemd within "
                                  f"{self._call_timeout:g} s") from exc
        except Exception as exc:  # the connection dropped under the call
            raise SystemdBusError(f"{member}: {exc}") from exc
        if reply is None:
            raise SystemdBusError(f"{member}: no reply")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            raise SystemdBusError(f"{member}: {text}", reply.error_name or "")
        return list(reply.body)

    async def _call(self, path: str, interface: str, member: str, signature: str = "",
                    body: list[Any] | None = None) -> list[Any]:
        bus = await self._connected()
        return await self._call_on(bus, path, interface, member, signature, body)

    def _on_message(self, message: Message) -> None:
        if message.message_type != MessageType.SIGNAL:
            return
        if message.member == "JobRemoved" and message.interface == MANAGER:
            _, job, _, result = message.body
            self._jobs_done[job] = result
            while len(self._jobs_done) > 256:
                self._jobs_done.popitem(last=False)
            waiter = self._job_waiters.pop(job, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(result)
            return
        if message.member == "PropertiesChanged" and message.path in self._watched:
            interface, changed, _ = message.body
            if self._on_change is not None:
                try:
                    self._on_change(self._watched[message.path], interface, _plain(changed))
                except Exception:  # a handler's bug must not stop the bus
                    log.exception("unit change handler failed")

    async def _job(self, member: str, signature: str, body: list[Any],
                   timeout: float) -> str:
        """Queue a job and wait for its result ("done", "failed", "canceled", ...)."""
        (job,) = await self._call(MANAGER_PATH, MANAGER, member, signature, body)
        if job in self._jobs_done:
            return self._jobs_done.pop(job)
        waiter = self._loop.create_future()
        self._job_waiters[job] = waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return "pending"  # still running: the caller decides what comes next
        finally:
            self._job_waiters.pop(job, None)

    # --- what workloads and the daemon use (blocking) --------------------------------

    def watch(self, units: list[str], on_change: UnitChange) -> None:
        """Call `on_change` (on the bus thread) when a property of `units` changes."""
        async def add() -> None:
            self._on_change = on_change
            for unit in units:
                path = unit_object_path(unit)
                if path not in self._watched:
                    self._watched[path] = unit
                    if self._bus is not None and self._bus.connected:
                        await self._match_properties(self._bus, path)
            await self._connected()
        self._run(add())

    def properties(self, unit: str, interfaces: tuple[str, ...] = (UNIT, SERVICE)
                   ) -> dict[str, Any]:
        """The unit's properties of `interfaces`, merged (loads the unit if need be)."""
        async def read() -> dict[str, Any]:
            merged: dict[str, Any] = {}
            path = unit_object_path(unit)
            for interface in interfaces:
                (values,) = await self._call(path, PROPERTIES, "GetAll", "s", [interface])
                merged.update(_plain(values))
            return merged
        return self._run(read())

    def start_unit(self, unit: str, timeout: float) -> str:
        return self._run(self._job("StartUnit", "ss", [unit, "replace"], timeout),
                         timeout + self._call_timeout + 5)

    def stop_unit(self, unit: str, timeout: float) -> str:
        return self._run(self._job("StopUnit", "ss", [unit, "replace"], timeout),
                         timeout + self._call_timeout + 5)

    def kill_unit(self, unit: str, signal: int) -> None:
        self._run(self._call(MANAGER_PATH, MANAGER, "KillUnit", "ssi", [unit, "all", signal]))

    def reset_failed(self, unit: str) -> None:
        self._run(self._call(MANAGER_PATH, MANAGER, "ResetFailedUnit", "s", [unit]))

    def start_transient(self, unit: str, properties: list[tuple[str, Variant]],
                        timeout: float) -> str:
        """StartTransientUnit, as `systemd-run` does; waits for the start job."""
        body = [unit, "fail", [[k, v] for k, v in properties], []]
        return self._run(self._job("StartTransientUnit", "ssa(sv)a(sa(sv))", body, timeout),
                         timeout + self._call_timeout + 5)

    def close(self) -> None:
        async def disconnect() -> None:
            if self._bus is not None:
                self._bus.disconnect()
        try:
            self._run(disconnect(), timeout=5)
        except Exception:  # closing is best effort
            log.debug("closing the system bus failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
