"""A private, real Docker engine for the test session (README, "Quick start").

Debian's dockerd on a socket under a temp folder, vfs storage, no bridge, no
iptables; a test image made with `docker import` from a tarball holding a static
busybox, since no registry is reachable. Containers run with network_mode="none".
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import docker

IMAGE = "gpuwarden-test/busybox:latest"
BUSYBOX = Path("/bin/busybox")


class PrivateDockerd:
    def __init__(self) -> None:
        if shutil.which("dockerd") is None:
            raise RuntimeError("dockerd not found: install Debian's docker.io "
                               "(scripts/test.sh does)")
        # Short path: unix socket paths are limited to 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="gwd-"))
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "dockerd.log"

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            ["dockerd", "--host", self.host, "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
             "--storage-driver=vfs", "--bridge=none", "--iptables=false", "--ip6tables=false",
             "--containerd-namespace", f"gw{os.getpid()}",
             "--containerd-plugins-namespace", f"gwp{os.getpid()}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_up()

    def wait_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                client = docker.DockerClient(base_url=self.host, timeout=5)
                client.ping()
                client.close()
                return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"dockerd not up:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=30)

    def import_busybox(self) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(BUSYBOX, arcname="bin/busybox")
            for applet in ("sh", "sleep", "echo", "cat", "rm", "kill", "trap", "true", "false"):
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type = tarfile.SYMTYPE
                info.linkname = "busybox"
                tar.addfile(info)
            for folder in ("ledger", "tmp", "proc", "sys", "dev", "etc"):
                info = tarfile.TarInfo(folder)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
        client = self.client()
        try:
            client.api.import_image_from_data(buf.getvalue(), repository=IMAGE.split(":")[0],
                                              tag="latest")
        finally:
            client.close()

    def cleanup(self) -> None:
        self.stop()
        subprocess.run(["sh", "-c", f"grep ' {self.root}' /proc/mounts | cut -d' ' -f2 | "
                        "sort -r | xargs -r umount -l"], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def holder_script(name: str, mib: int, *, leak: bool = False, exit_after: float | None = None,
                  exit_code: int = 1) -> str:
    """busybox sh: hold `mib` of simulated VRAM as /ledger/<name>.mib (the README's ledger recipe).

    SIGTERM ends it at once (PID 1 ignores signals it does not trap). With `exit_after`
    it crashes with `exit_code` after that long: a crash-looping workload.
    """
    claim = f"/ledger/{name}.mib"
    content = f"{mib} leak" if leak else str(mib)
    if leak:
        # Each start leaks a fresh claim, like a restart that allocates before the last frees.
        claim = f"/ledger/{name}-$$-$(cat /proc/sys/kernel/random/uuid 2>/dev/null || echo x).mib"
    if exit_after is not None:
        return (f'c="{claim}"; echo {content} > "$c"; '
                f'sleep {exit_after} 3<"$c"; exit {exit_code}')
    return (f'trap "exit 0" TERM; c="{claim}"; echo {content} > "$c"; '
            f'sleep 1000000 3<"$c" & wait')
