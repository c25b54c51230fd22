"""The audit trail: one record per event.

Under systemd (`$JOURNAL_STREAM` set) records go to journald over its native
protocol as *fields*, so `journalctl -u gpuwarden GPUWARDEN_EVENT=mode.switch.completed`
finds them; JSON printed to stdout would land as one opaque MESSAGE. Elsewhere each
record is a JSON line on stdout, rendered by structlog.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import struct
import sys
import threading
from typing import Any, TextIO

import structlog

from .events import AuditWriter, Event, Severity

__all__ = [
    "JOURNAL_SOCKET",
    "JournaldAudit",
    "JsonLinesAudit",
    "journal_fields",
    "journal_payload",
    "open_audit",
    "stdout_is_journal",
]

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# syslog priorities (sd-journal PRIORITY=)
_PRIORITY = {
    Severity.DEBUG: 7,
    Severity.INFO: 6,
    Severity.WARNING: 4,
    Severity.ERROR: 3,
    Severity.CRITICAL: 2,
}
_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")
# Fields every operator query uses get short names (README, journald queries).
_WELL_KNOWN = {"requested_by": "REQUESTED_BY", "gpu": "GPU", "mode": "MODE",
               "workload": "WORKLOAD", "to": "TO", "from": "FROM"}


class JsonLinesAudit:
    """JSON lines on a stream (stdout by default), rendered by structlog."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._lock = threading.Lock()
        self._log = structlog.wrap_logger(
            structlog.PrintLogger(file=stream or sys.stdout),
            wrapper_class=structlog.BoundLogger,
            processors=[
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                structlog.processors.JSONRenderer(default=str),
            ],
        )

    def write(self, event: Event) -> None:
        doc = event.to_dict()
        name = doc.pop("event")
        with self._lock:
            self._log.msg(name, **doc)


def _field_name(key: str) -> str:
    name = _WELL_KNOWN.get(key) or "GPUWARDEN_" + _FIELD_CHARS.sub("_", key.upper())
    return name[:64]


def journal_fields(event: Event) -> dict[str, str]:
    """The journald fields of an event (names: uppercase, digits, underscore)."""
    fields = {
        "MESSAGE": f"{event.name}: {event.message}",
        "PRIORITY": str(_PRIORITY[event.severity]),
        "SYSLOG_IDENTIFIER": "gpuwarden",
        "GPUWARDEN_EVENT": event.name,
        "GPUWARDEN_EVENT_ID": str(event.id),
        "GPUWARDEN_SEVERITY": event.severity.label,
    }
    if event.requested_by is not None:
        fields["REQUESTED_BY"] = event.requested_by
    for key, value in event.fields.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        fields.setdefault(_field_name(key), text)
    return fields


def journal_payload(fields: dict[str, str]) -> bytes:
    """Serialise fields in the journal's native protocol (JOURNAL_NATIVE_PROTOCOL.md)."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", errors="replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournaldAudit:
    """Sends each event to journald as fields over its native datagram socket."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: AuditWriter | None = None) -> None:
        self._path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Never wait on a busy journald from the event loop: a full queue (EAGAIN) is
        # handled like journald being away.
        self._sock.setblocking(False)
        self._fallback = fallback or JsonLinesAudit()
        self._lock = threading.Lock()

    def write(self, event: Event) -> None:
        payload = journal_payload(journal_fields(event))
        with self._lock:
            try:
                self._send(payload)
            except OSError as exc:
                # journald gone (restarting): the record must not be lost, so print it.
                self._fallback.write(event)
                print(f"gpuwarden: journald unreachable ({exc}); audit on stdout", file=sys.stderr)

    def _send(self, payload: bytes) -> None:
        try:
            self._sock.sendto(payload, self._path)
        except OSError as exc:
            if exc.errno != 90:  # EMSGSIZE: too big for a datagram, pass a memfd instead
                raise
            fd = os.memfd_create("gpuwarden-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.write(fd, payload)
                # journald accepts only a sealed memfd (JOURNAL_NATIVE_PROTOCOL.md).
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                            | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                    sock.connect(self._path)
                    socket.send_fds(sock, [b""], [fd])
            finally:
                os.close(fd)

    def close(self) -> None:
        self._sock.close()


def stdout_is_journal(environ: dict[str, str] | Any = os.environ) -> bool:
    """Whether stdout is journald's stream: $JOURNAL_STREAM names its device:inode
    (a child that inherited the variable but not the stream does not match)."""
    dev, _, ino = str(environ.get("JOURNAL_STREAM", "")).partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def open_audit(environ: dict[str, str] | Any = os.environ) -> AuditWriter:
    """journald when started by systemd with its journal reachable, else JSON lines."""
    if stdout_is_journal(environ) and os.path.exists(JOURNAL_SOCKET):
        return JournaldAudit()
    return JsonLinesAudit()
