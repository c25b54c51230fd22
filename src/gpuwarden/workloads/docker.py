"""A Docker container, by name, through the Docker SDK (blocking: call in a thread).

An unreachable engine is a state (UNKNOWN, with the reason), not a crash: the
client is made lazily and made again after a failure.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

import docker
import docker.errors
import requests.exceptions

from ..config import DockerConfig, WorkloadConfig
from ..errors import WorkloadError
from ..gpu.attribution import OwnerIndex
from .base import WorkloadState, WorkloadStatus

__all__ = ["DockerClientFactory", "DockerWorkload", "policy_text", "restart_policy"]

_DOCKER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


def restart_policy(text: str) -> dict[str, Any]:
    """The SDK's policy dict for "no", "always", "unless-stopped", "on-failure[:N]"."""
    name, _, count = text.partition(":")
    policy: dict[str, Any] = {"Name": name}
    if name == "on-failure":
        policy["MaximumRetryCount"] = int(count or 0)
    return policy


def policy_text(policy: dict[str, Any] | None) -> str:
    if not policy or not policy.get("Name"):
        return "no"
    name = str(policy["Name"])
    count = policy.get("MaximumRetryCount") or 0
    return f"{name}:{count}" if name == "on-failure" and count else name


def _docker_time(text: object) -> float | None:
    """Unix seconds of an inspect timestamp ("2026-11-27T17:40:01.123456789Z"); None for
    Docker's "never" (year 1) and anything unreadable."""
    if not isinstance(text, str) or text.startswith("0001-"):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class DockerClientFactory:
    """One shared Docker client, made on first use and again after a failure."""

    def __init__(self, config: DockerConfig) -> None:
        self._config = config
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return self._config.resolved_host()

    def get(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                self._client = docker.DockerClient(
                    base_url=self.base_url, timeout=int(self._config.timeout)
                )
            return self._client

    def reset(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None


class DockerWorkload:
    kind = "docker"

    def __init__(
        self, name: str, config: WorkloadConfig, *, client: DockerClientFactory,
        owners: OwnerIndex,
    ) -> None:
        if not config.container:
            raise ValueError(f"workload {name!r} has no container")
        self.name = name
        self.config = config
        self.container_name = config.container
        self._clients = client
        self._owners = owners

    def _container(self) -> Any:
        return self._clients.get().containers.get(self.container_name)

    def _lookup(self) -> Any:
        """The container, or a MISSING/UNKNOWN status saying why there is none."""
        try:
            return self._container()
        except docker.errors.NotFound:
            return WorkloadStatus(WorkloadState.MISSING,
                                  f"no container named {self.container_name!r}")
        except _DOCKER_ERRORS as exc:
            self._clients.reset()
            return WorkloadStatus(WorkloadState.UNKNOWN,
                                  f"Docker unreachable at {self._clients.base_url}: {exc}")

    def status(self) -> WorkloadStatus:
        found = self._lookup()
        return found if isinstance(found, WorkloadStatus) else self._status_of(found)

    def _status_of(self, container: Any) -> WorkloadStatus:
        attrs = container.attrs
        state = attrs.get("State", {})
        running = bool(state.get("Running")) and not state.get("Restarting")
        self._owners.set_container(self.name, container.id)
        return WorkloadStatus(
            WorkloadState.RUNNING if running else WorkloadState.STOPPED,
            detail=str(state.get("Status", "")),
            pid=int(state.get("Pid") or 0) or None,
            container_id=container.id,
            exit_code=None if running else state.get("ExitCode"),
            restart_policy=policy_text(attrs.get("HostConfig", {}).get("RestartPolicy")),
            restart_count=attrs.get("RestartCount"),
            oom_killed=bool(state.get("OOMKilled")) and not running,
            started_at=_docker_time(state.get("StartedAt")),
            finished_at=None if running else _docker_time(state.get("FinishedAt")),
        )

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except docker.errors.NotFound as exc:
            raise WorkloadError(
                f"workload {self.name!r}: no container named {self.container_name!r}"
            ) from exc
        except _DOCKER_ERRORS as exc:
            self._clients.reset()
            raise WorkloadError(f"workload {self.name!r}: {what} failed: {exc}") from exc

    def set_restart_policy(self, policy: str) -> None:
        container = self._call("inspect", self._container)
        self._call("update", container.update, restart_policy=restart_policy(policy))

    def start(self) -> WorkloadStatus:
        container = self._call("inspect", self._container)
        wanted = self.config.restart_policy
        current = policy_text(container.attrs.get("HostConfig", {}).get("RestartPolicy"))
        if current != wanted:
            self._call("update", container.update, restart_policy=restart_policy(wanted))
        if not container.attrs.get("State", {}).get("Running"):
            self._call("start", container.start)
        deadline = time.monotonic() + 10
        while True:
            self._call("inspect", container.reload)
            status = self._status_of(container)
            if status.running:
                return status
            if time.monotonic() >= deadline:
                raise WorkloadError(
                    f"workload {self.name!r}: container did not stay running ({status.detail}, "
                    f"exit code {status.exit_code})"
                )
            time.sleep(0.05)

    def stop(self, grace: float | None = None) -> WorkloadStatus:
        container = self._lookup()
        if isinstance(container, WorkloadStatus):
            if container.state is WorkloadState.MISSING:
                return container  # nothing to stop
            raise WorkloadError(f"workload {self.name!r}: cannot stop: {container.detail}")
        grace = self.config.stop_timeout if grace is None else grace
        self._call("stop", container.stop, timeout=int(grace))
        self._call("inspect", container.reload)
        status = self._status_of(container)
        if status.running:
            raise WorkloadError(f"workload {self.name!r}: container still running after stop")
        return status

    def close(self) -> None:
        self._clients.reset()
