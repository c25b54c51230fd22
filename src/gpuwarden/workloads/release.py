"""Graceful release before a stop: ask Ollama and ComfyUI to give their VRAM back.

An unreachable API never blocks the release itself (the stop that follows frees the
memory anyway). Before a switch, a running ComfyUI with queued or running jobs, or
whose queue cannot be read, refuses it unless the switch is forced.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import httpx

from ..config import WorkloadConfig
from ..errors import ConflictError

__all__ = [
    "QueueUnreadable",
    "ReleaseReport",
    "check_release_allowed",
    "comfyui_queue_size",
    "graceful_release",
    "probe_ready",
]

log = logging.getLogger(__name__)

_TIMEOUT = httpx.Timeout(10.0, connect=2.0)


@dataclass
class ReleaseReport:
    workload: str
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # A forced release of ComfyUI: its pending jobs, which the stop loses (/interrupt
    # ends only the running one); None when its queue could not be read.
    dropped_jobs: int | None = None


class QueueUnreadable(Exception):
    """ComfyUI's queue could not be read: why, for the refusal or the log."""


async def comfyui_queue_size(client: httpx.AsyncClient, url: str, timeout: float) -> int:
    """Running plus pending jobs (`GET /queue`), answered within `timeout` seconds.

    Raises:
        QueueUnreadable: no answer in time, an error status, or a body that is not a
            queue.
    """
    running, pending = await comfyui_queue(client, url, timeout)
    return running + pending


async def comfyui_queue(client: httpx.AsyncClient, url: str,
                        timeout: float) -> tuple[int, int]:
    """ComfyUI's running and pending jobs (`GET /queue`), within `timeout` seconds.

    Raises:
        QueueUnreadable: as comfyui_queue_size.
    """
    try:
        async with asyncio.timeout(timeout):  # the whole exchange, not each read
            resp = await client.get(f"{url}/queue", timeout=_TIMEOUT)
        resp.raise_for_status()
        doc = resp.json()
        return len(doc["queue_running"]), len(doc["queue_pending"])
    except TimeoutError as exc:
        raise QueueUnreadable(f"GET {url}/queue did not answer within {timeout:g} s") from exc
    except httpx.HTTPStatusError as exc:
        raise QueueUnreadable(f"GET {url}/queue answered {exc.response.status_code}") from exc
    except httpx.HTTPError as exc:
        raise QueueUnreadable(f"GET {url}/queue failed: {exc!r}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise QueueUnreadable(f"GET {url}/queue answered something that is not a queue "
                              f"({exc!r})") from exc


async def check_release_allowed(
    client: httpx.AsyncClient, name: str, config: WorkloadConfig, *, timeout: float
) -> None:
    """Refuse (ConflictError) to stop a running ComfyUI that has work queued, or whose
    queue cannot be read within `timeout` (busy or hung: its jobs may be lost). The
    caller skips this for a forced switch."""
    if config.release != "comfyui" or not config.url:
        return
    try:
        jobs = await comfyui_queue_size(client, config.url.rstrip("/"), timeout)
    except QueueUnreadable as exc:
        raise ConflictError(
            f"workload {name!r} (ComfyUI): cannot tell whether jobs are queued ({exc}); "
            "switch with --force (API: \"force\": true) to stop it anyway",
            {"workload": name, "jobs": None, "queue_error": str(exc)},
        ) from exc
    if jobs:
        raise ConflictError(
            f"workload {name!r} (ComfyUI) has {jobs} job(s) running or queued; "
            "wait for them, or switch with --force (API: \"force\": true) to interrupt the "
            "running one and drop the rest",
            {"workload": name, "jobs": jobs},
        )


async def graceful_release(
    client: httpx.AsyncClient, name: str, config: WorkloadConfig, *, force: bool
) -> ReleaseReport:
    """Unload Ollama's models, or interrupt (when forced) and free ComfyUI. An
    OpenAI-compatible engine (llama.cpp's server, vLLM) has no unload: its stop is
    its release."""
    report = ReleaseReport(workload=name)
    if config.release in ("none", "openai") or not config.url:
        return report
    url = config.url.rstrip("/")
    try:
        if config.release == "ollama":
            resp = await client.get(f"{url}/api/ps", timeout=_TIMEOUT)
            resp.raise_for_status()
            for model in resp.json().get("models", []):
                model_name = model.get("name") or model.get("model")
                unload = await client.post(
                    f"{url}/api/generate",
                    json={"model": model_name, "keep_alive": 0},
                    timeout=_TIMEOUT,
                )
                unload.raise_for_status()
                report.actions.append(f"ollama unload {model_name}")
        else:
            if force:
                try:
                    running, report.dropped_jobs = await comfyui_queue(client, url, 5.0)
                except QueueUnreadable as exc:
                    running = 0
                    report.errors.append(f"cannot count the jobs it drops: {exc}")
                (await client.post(f"{url}/interrupt", timeout=_TIMEOUT)).raise_for_status()
                report.actions.append(
                    f"comfyui interrupt ({running} running"
                    + ("" if report.dropped_jobs is None else
                       f", {report.dropped_jobs} pending dropped by the stop") + ")")
            resp = await client.post(
                f"{url}/free",
                json={"unload_models": True, "free_memory": True},
                timeout=_TIMEOUT,
            )
            resp.raise_for_status()
            report.actions.append("comfyui free")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        report.errors.append(f"{config.release} API at {url}: {exc!r}")
        log.warning("graceful release of %s failed, stopping it anyway: %s", name, exc)
    return report


async def probe_ready(client: httpx.AsyncClient, config: WorkloadConfig,
                      timeout: float = 10.0) -> bool:
    """Whether the workload's API answers (Ollama /api/version, ComfyUI /system_stats,
    an OpenAI-compatible engine /v1/models) within `timeout` seconds."""
    if config.release == "none" or not config.url:
        return True
    path = {"ollama": "/api/version", "comfyui": "/system_stats"}.get(config.release,
                                                                      "/v1/models")
    try:
        resp = await client.get(config.url.rstrip("/") + path, timeout=httpx.Timeout(timeout))
    except httpx.HTTPError:
        return False
    return resp.status_code == 200
