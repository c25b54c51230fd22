"""sd_notify against real datagram sockets: READY, STATUS, WATCHDOG cadence, STOPPING."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from gpuwarden.sdnotify import Notifier


def test_notify_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(2)
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        assert notifier.ready("GPU0 llm ok 29%")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=GPU0 llm ok 29%"
        assert notifier.status("GPU0 image ok 40%")
        assert not notifier.status("GPU0 image ok 40%")  # unchanged: not resent
        assert receiver.recv(4096) == b"STATUS=GPU0 image ok 40%"
        # Pings at most every half watchdog period (0.1 s here).
        sent = 0
        deadline = time.monotonic() + 0.55
        while time.monotonic() < deadline:
            sent += notifier.watchdog()
            time.sleep(0.01)
        assert 4 <= sent <= 6
        for _ in range(sent):
            assert receiver.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert receiver.recv(4096) == b"STOPPING=1"


def test_notify_abstract_socket() -> None:
    name = f"gpuwarden-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert receiver.recv(4096) == b"READY=1"


def test_no_op_outside_systemd_and_foreign_watchdog_pid() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.ready() and not notifier.watchdog()
    other = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                      "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval is None


def test_daemon_notifies_ready_status_watchdog_and_stopping(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from .conftest import SimNode

    node = SimNode(tmp_path)
    config = node.write(daemon={"sample_interval": 0.1})
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(15)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuwarden.cli", "daemon", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "600000"})
        try:
            messages: list[str] = []
            while not any(m.startswith("READY=1") for m in messages):
                messages.append(receiver.recv(4096).decode())
            ready = next(m for m in messages if m.startswith("READY=1"))
            assert "STATUS=GPU0 " in ready and "ok 0%" in ready  # sampled before READY
            assert node.socket.exists()  # the control socket was up before READY
            pings = []
            statuses = []
            started = time.monotonic()
            while len(pings) < 3:
                message = receiver.recv(4096).decode()
                if message == "WATCHDOG=1":
                    pings.append(time.monotonic())
                elif message.startswith("STATUS="):
                    statuses.append(message)
            assert "STATUS=GPU0 idle ok 0%" in statuses  # the mode, once restored
            assert pings[-1] - started < 3.0  # about every 0.3 s (half of 0.6 s)
            proc.send_signal(signal.SIGTERM)
            while receiver.recv(4096) != b"STOPPING=1":
                pass
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
