"""The audit trail: journald's native protocol over a real socket, JSON lines elsewhere."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
from pathlib import Path

from gpuwarden.audit import JournaldAudit, JsonLinesAudit, open_audit
from gpuwarden.events import EventBus, Severity


def parse_native(data: bytes) -> dict[str, str]:
    """Parse the journal's native protocol the way journald does."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            pos = end + 1
        else:
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            fields[line.decode()] = data[end + 9 : end + 9 + size].decode()
            pos = end + 9 + size + 1
    return fields


def test_events_reach_journald_as_fields(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    try:
        bus = EventBus(JournaldAudit(path))
        bus.publish("mode.switch.completed", "GPU 0: llm -> image\nsecond line",
                    requested_by="discord:1234", gpu=0, mode="image",
                    timings={"total_s": 1.5}, **{"from": "llm", "to": "image"})
        bus.publish("vram.tier", "GPU 0 at 96 %", severity=Severity.CRITICAL, gpu=0)
        first = parse_native(receiver.recv(65536))
        second = parse_native(receiver.recv(65536))
    finally:
        receiver.close()
    assert first["GPUWARDEN_EVENT"] == "mode.switch.completed"
    assert first["REQUESTED_BY"] == "discord:1234"
    assert first["GPU"] == "0" and first["MODE"] == "image" and first["FROM"] == "llm"
    assert first["SYSLOG_IDENTIFIER"] == "gpuwarden" and first["PRIORITY"] == "6"
    assert first["MESSAGE"].endswith("second line")  # the length-prefixed form
    assert json.loads(first["GPUWARDEN_TIMINGS"]) == {"total_s": 1.5}
    assert all(k.replace("_", "").isalnum() and k.isupper() for k in first)
    assert second["PRIORITY"] == "2"


def test_journald_unreachable_falls_back_to_stdout(tmp_path: Path) -> None:
    out = io.StringIO()
    bus = EventBus(JournaldAudit(str(tmp_path / "nobody.sock"), fallback=JsonLinesAudit(out)))
    bus.publish("daemon.started", "up")
    assert json.loads(out.getvalue())["event"] == "daemon.started"


def test_json_lines_outside_journald() -> None:
    out = io.StringIO()
    bus = EventBus(JsonLinesAudit(out))
    bus.publish("crashloop.blocked", "comfyui blocked", severity=Severity.CRITICAL,
                requested_by=None, workload="comfyui", exit_codes=["1", "1"])
    doc = json.loads(out.getvalue())
    assert doc["event"] == "crashloop.blocked" and doc["severity"] == "critical"
    assert doc["workload"] == "comfyui" and doc["exit_codes"] == ["1", "1"]
    assert doc["id"] == 1 and "ts" in doc
    assert isinstance(open_audit({}), JsonLinesAudit)


def test_journal_stream_must_be_our_stdout() -> None:
    import sys

    from gpuwarden.audit import stdout_is_journal

    st = os.fstat(sys.stdout.fileno())
    assert stdout_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not stdout_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not stdout_is_journal({"JOURNAL_STREAM": "garbage"})
    assert not stdout_is_journal({})


def test_a_large_event_goes_through_a_memfd(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    receiver.bind(path)
    try:
        bus = EventBus(JournaldAudit(path))
        holders = [{"pid": i, "used_mib": 1, "workload": "w" * 40} for i in range(5000)]
        bus.publish("vram.tier", "big", gpu=0, holders=holders)
        msg, fds, _flags, _addr = socket.recv_fds(receiver, 1024, 1)
    finally:
        receiver.close()
    assert msg == b"" and len(fds) == 1
    import fcntl

    seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL  # journald requires it
    size = os.fstat(fds[0]).st_size
    fields = parse_native(os.pread(fds[0], size, 0))
    os.close(fds[0])
    assert fields["GPUWARDEN_EVENT"] == "vram.tier"
    assert len(json.loads(fields["GPUWARDEN_HOLDERS"])) == 5000
