"""Wiring: the asyncio loop, the sampling job, the control socket, signals, sd_notify."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import grp
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .api import build_app
from .api_auth import ApiAuth, AuthFailures, ReplayGuard
from .api_server import (
    ConnectionBudget,
    Door,
    ErrorStorms,
    FilePlan,
    fit_open_files,
    serve,
)
from .audit import open_audit
from .config import Config, WorkloadConfig, config_warnings, parse_listen, process_runner
from .crashloop import CrashLoopGuard
from .docker_events import ContainerEvent, DockerEventWatcher
from .enforcement import ModeGuard
from .errors import ConfigError, GpuwardenError
from .events import AuditWriter, DurableEventIds, EventBus, Severity
from .gpu.attribution import OwnerIndex
from .gpu.backend import GpuBackend, open_backend
from .metrics import Metrics
from .modes import ModeSwitcher
from .protect import ProtectiveActions
from .reload import InUse, ReloadPlan, plan_reload
from .restarts import ChildRestarter
from .sdnotify import Notifier
from .service import Service
from .sinks import DiscordWebhookSink, N8nSink, OutboxSink, severity_named
from .state import StateStore
from .systemd_dbus import SystemdBus, SystemdBusError
from .watchdog import LeakDetector, Watchdog
from .workloads.base import Workload, WorkloadState
from .workloads.docker import DockerClientFactory, DockerWorkload
from .workloads.process import ProcessWorkload, TransientUnitWorkload
from .workloads.supervisor import WorkloadSupervisor
from .workloads.systemd import SystemdWorkload, UnitLifecycle

if TYPE_CHECKING:
    from .discord_bot import DiscordFrontEnd
    from .proxy import DemandProxies

__all__ = ["Daemon", "DaemonState", "build_workloads", "run", "run_daemon"]

log = logging.getLogger(__name__)


class _ProxiedRequests:
    """The demand proxies' requests in flight, for the switcher, which exists before
    the proxies start (and on nodes without any)."""

    def __init__(self, proxies: Callable[[], DemandProxies | None]) -> None:
        self._proxies = proxies

    def in_flight(self, workloads: set[str]) -> list[dict[str, Any]]:
        proxies = self._proxies()
        return proxies.in_flight(workloads) if proxies is not None else []

    def end_in_flight(self, workloads: set[str], reason: str) -> int:
        proxies = self._proxies()
        return proxies.end_in_flight(workloads, reason) if proxies is not None else 0


class DaemonState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


def build_workloads(config: Config, owners: OwnerIndex,
                    systemd: SystemdBus | None = None, *,
                    clients: DockerClientFactory | None = None,
                    only: set[str] | None = None) -> dict[str, Workload]:
    """The workload objects (of the names in `only`, if given); `systemd` is needed for
    units and transient units."""
    workloads: dict[str, Workload] = {}
    log_dir = config.daemon.state_dir / "logs"
    # One engine, one client for every container.
    clients = clients or DockerClientFactory(config.docker)
    transient = process_runner(config) == "systemd"
    for name, wl in config.workloads.items():
        if only is not None and name not in only:
            continue
        if wl.kind == "process" and transient:
            assert systemd is not None
            workloads[name] = TransientUnitWorkload(name, wl, bus=systemd, owners=owners)
        elif wl.kind == "process":
            workloads[name] = ProcessWorkload(name, wl, log_dir=log_dir, owners=owners,
                                              record_dir=config.daemon.state_dir / "children")
        elif wl.kind == "systemd":
            assert systemd is not None
            workloads[name] = SystemdWorkload(name, wl, bus=systemd, owners=owners)
        else:
            workloads[name] = DockerWorkload(name, wl, client=clients, owners=owners)
    return workloads


def needs_systemd(config: Config) -> bool:
    return any(w.kind == "systemd" or (w.kind == "process" and
                                       process_runner(config) == "systemd")
               for w in config.workloads.values())


class Daemon:
    """The running service. `setup()`, then `wait()`, and always `cleanup()`."""

    def __init__(self, config: Config, *, audit: AuditWriter | None = None,
                 path: str | Path | None = None) -> None:
        self.config = config
        self._config_path = path  # None: the default search ($GPUWARDEN_CONFIG, /etc)
        self._auth: ApiAuth | None = None
        self.state = DaemonState.NEW
        self.stop_requested = asyncio.Event()
        self.notifier = Notifier()
        self.bus = EventBus(audit or open_audit(),
                            ids=DurableEventIds(config.daemon.state_dir / "event-ids"))
        self._scheduler: AsyncIOScheduler | None = None
        self._doors: list[Door] = []
        self._files: FilePlan | None = None  # the connection budgets that fit LimitNOFILE
        self._storms: ErrorStorms | None = None
        self._auth_failures: AuthFailures | None = None
        self._backend: GpuBackend | None = None
        self._workloads: dict[str, Workload] = {}
        self._http: httpx.AsyncClient | None = None
        self._switcher: ModeSwitcher | None = None
        self._guard: ModeGuard | None = None
        self._protect: ProtectiveActions | None = None
        self._crashloop: CrashLoopGuard | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._sinks: list[OutboxSink] = []
        self._discord: DiscordFrontEnd | None = None
        self._discord_task: asyncio.Task[None] | None = None
        self._sink_http: httpx.AsyncClient | None = None
        self.metrics = Metrics()
        self._docker_events: DockerEventWatcher | None = None
        self._systemd: SystemdBus | None = None
        self._units: dict[str, tuple[str, UnitLifecycle]] = {}  # unit -> workload, lifecycle
        self._restore_task: asyncio.Task[None] | None = None
        self.service: Service | None = None
        self._proxies: DemandProxies | None = None
        self._queue_reader: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._docker_clients = DockerClientFactory(config.docker)
        self._restarter: ChildRestarter | None = None
        self._ticking: asyncio.Task[Any] | None = None  # the sample being taken

    async def setup(self) -> None:
        if self.state is not DaemonState.NEW:
            raise RuntimeError("a Daemon is set up once; create a new one to start again")
        self.state = DaemonState.RUNNING
        loop = asyncio.get_running_loop()
        self.bus.bind_loop(loop)
        cfg = self.config
        for warning in config_warnings(cfg):
            log.warning("configuration: %s", warning)
        store = StateStore(cfg.daemon.state_dir)
        persisted = store.load()
        owners = OwnerIndex()
        self._backend = open_backend(cfg)
        if needs_systemd(cfg):
            self._systemd = SystemdBus()
        self._workloads = build_workloads(cfg, owners, self._systemd,
                                          clients=self._docker_clients)
        leaks = LeakDetector(cfg.thresholds.sustain, cfg.watchdog, cfg.release.tolerance_mib,
                             self.bus)
        watchdog = Watchdog(cfg.thresholds, self.bus, leaks, cfg.watchdog.tier_reminder)
        self.metrics = Metrics()
        self.bus.subscribe(self.metrics.on_event)
        await self._start_sinks()
        for sink in self._sinks:
            watchdog.unresolved |= sink.open_groups
        self.service = Service(cfg, self._backend, owners, self._workloads, persisted, self.bus,
                               watchdog)
        self._http = httpx.AsyncClient()
        self.service.http = self._http
        supervisor = WorkloadSupervisor(self._workloads)
        self.service.supervisor = supervisor
        self._switcher = ModeSwitcher(cfg, self._workloads, supervisor, store, persisted,
                                      self.bus, self.service.sample_blocking, self._http,
                                      on_settled=self.service.refresh,
                                      requests=_ProxiedRequests(lambda: self._proxies))
        self.service.switcher = self._switcher
        self.service.metrics = self.metrics
        # Outbound receivers' deliveries, failures and drops, for operators.
        self.service.status_sections["sinks"] = lambda: {
            "receivers": [sink.status() for sink in self._sinks]}
        self.metrics.receivers = lambda: [sink.status() for sink in self._sinks]
        self._guard = ModeGuard(cfg, self._switcher, self._workloads, supervisor, persisted,
                                self.bus, self._http)
        self._guard.last_used = lambda mode: \
            self._proxies.last_used(mode) if self._proxies is not None else None
        self.service.lease_of = self._guard.lease_of
        self._protect = ProtectiveActions(cfg, self._workloads, supervisor, self.bus,
                                          self._http,
                                          self.service.sample_blocking,
                                          lambda: self.service.workload_statuses
                                          if self.service else {})
        self._crashloop = CrashLoopGuard(cfg, self._workloads, supervisor, persisted,
                                         store, self.bus, self.service.sample_blocking,
                                         self._switcher)
        self.service.crashloop = self._crashloop
        self._restarter = ChildRestarter(cfg, self._workloads, supervisor, self._switcher,
                                         self._crashloop, self.bus)
        self._restarter.attach(loop)
        self._watch_docker()
        await self._watch_units()

        await self._tick()
        await self._listen(cfg.daemon.socket)
        await self._start_proxies()

        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(
            self._tick, "interval", seconds=cfg.daemon.sample_interval, id="sample",
            max_instances=1, coalesce=True, misfire_grace_time=None,
        )
        self._scheduler.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        # A closed terminal or a dropped SSH session sends SIGHUP; so does an operator
        # who wants the config read again (as Prometheus and nginx do): a reload.
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(
            self._reload_quietly("signal:SIGHUP")))
        self.service.reload = self.reload
        self.bus.publish(
            "daemon.started", f"gpuwarden started ({self._backend.name} backend, "
            f"socket {cfg.daemon.socket})", backend=self._backend.name,
            socket=str(cfg.daemon.socket), pid=os.getpid(),
        )
        await self._start_discord()
        self.notifier.ready(self._status_line())
        self._restore_task = loop.create_task(self._restore())

    async def _reload_quietly(self, requested_by: str) -> None:
        await self.reload(requested_by)  # its outcome is in its event

    async def reload(self, requested_by: str) -> dict[str, Any]:
        """Read the config file again and apply what can change while running (see
        `reload.plan_reload`); every other change is named with why, never silently
        ignored. A config that fails check-config changes nothing. One reload at a
        time; audited as config.reloaded or config.reload_failed."""
        from .config import load_config

        async with self._reload_lock:
            try:
                new = await asyncio.to_thread(load_config, self._config_path)
            except ConfigError as exc:
                problems = list(exc.problems) or [str(exc)]
                self.bus.publish(
                    "config.reload_failed", "config not reloaded, the running one stays: "
                    + "; ".join(problems[:5]), severity=Severity.ERROR,
                    requested_by=requested_by, problems=problems)
                return {"ok": False, "error": "the config has problems; nothing changed",
                        "problems": problems}
            in_use = await self._in_use(new)
            plan = plan_reload(self.config, new, in_use, self._cannot_run)
            if plan.proxies and (taken := await self._taken_listens(plan.config)):
                in_use = dataclasses.replace(in_use, proxies_busy=taken)
                plan = plan_reload(self.config, new, in_use, self._cannot_run)
            failure = await self._apply(plan)
        restart = plan.needs_restart
        message = (f"config reloaded: {len(plan.applied)} change(s) applied"
                   + (f", {len(restart)} not applied ({', '.join(restart[:8])}"
                      f"{', ...' if len(restart) > 8 else ''})" if restart else ""))
        if failure:
            message += f"; {failure}"
        self.bus.publish("config.reloaded", message,
                         severity=Severity.ERROR if failure else
                         Severity.WARNING if restart else Severity.INFO,
                         requested_by=requested_by, applied=plan.applied,
                         needs_restart=restart, not_applied=plan.not_applied)
        return {"ok": True, "applied": plan.applied, "needs_restart": restart,
                "not_applied": plan.not_applied, "message": message}

    async def _in_use(self, new: Config) -> InUse:
        """What a reload must leave alone now: running workloads (or any whose state
        cannot be read: fail closed), the active modes and theirs, a running switch,
        requests at the proxies."""
        assert self.service is not None and self.service.supervisor is not None
        assert self._switcher is not None
        statuses = await self.service.supervisor.statuses(list(self._workloads))
        workloads = {n for n, s in statuses.items()
                     if s.state not in (WorkloadState.STOPPED, WorkloadState.MISSING)}
        gpus = set(self.config.gpu_indices()) | set(new.gpu_indices())
        modes = {m for g in gpus if (m := self._switcher.mode_of(g)) is not None}
        for mode in modes:
            workloads |= set(self.service.workload_names(mode))
        switching = any(self._switcher.switching(g) for g in gpus) or \
            self._restore_task is None or not self._restore_task.done()
        busy = self._proxies.busy() if self._proxies is not None else 0
        return InUse(
            workloads=frozenset(workloads), modes=frozenset(modes), switching=switching,
            proxies_busy=f"{busy} request(s) wait or run at the demand proxies: reload "
            "again when they are done" if busy else None,
            discord_bot=self._discord is not None)

    def _cannot_run(self, workload: WorkloadConfig) -> str | None:
        """Why this daemon cannot take a workload so configured without a restart."""
        if workload.kind == "systemd" and (self._systemd is None or
                                           workload.unit not in self._units):
            return (f"unit {workload.unit} is not watched: units are subscribed to at "
                    "start; restart gpuwarden to add one")
        if workload.kind == "process" and process_runner(self.config) == "systemd" and \
                self._systemd is None:
            return "process workloads run as transient units, and systemd was not "\
                "connected at start: restart gpuwarden"
        return None

    async def _taken_listens(self, config: Config) -> str | None:
        """Why a reloaded proxy could not listen (an address now taken by another
        program), checked before the running proxies close."""
        own = {p.listen for p in self.config.proxy.values()} | {self.config.router.listen}
        wanted = [(f"proxy {name}", p.listen) for name, p in config.proxy.items()]
        if config.router.listen is not None:
            wanted.append(("the router", config.router.listen))
        for who, listen in wanted:
            address = parse_listen(listen)
            if listen in own or address is None:
                continue
            try:
                await asyncio.to_thread(_try_bind, address)
            except OSError as exc:
                return (f"{who} cannot listen on its new address {listen} "
                        f"({exc.strerror}): reload again once it is free")
        return None

    async def _apply(self, plan: ReloadPlan) -> str | None:
        """Apply a reload's plan; what went wrong while applying it, or None."""
        assert self.service is not None
        cfg = self.config = plan.config
        if plan.thresholds:
            self.service.watchdog.set_thresholds(cfg.thresholds)
        if plan.tokens and self._auth is not None:
            self._auth.set_tokens(cfg.api)
        self.service.config = cfg
        if self._discord is not None:
            self._discord.config = cfg
        for part in (self._switcher, self._guard, self._protect, self._crashloop,
                     self._restarter):
            if part is not None:
                part.reconfigure(cfg)
        for name in plan.removed_workloads:
            self._workloads.pop(name).close()
        if plan.rebuilt_workloads:
            self._workloads.update(build_workloads(
                cfg, self.service.owners, self._systemd, clients=self._docker_clients,
                only=plan.rebuilt_workloads))
            self._watch_docker()
            if self._restarter is not None:
                self._restarter.attach(asyncio.get_running_loop())
        if plan.receivers:
            await self._restart_sinks()
        if plan.proxies:
            return await self._restart_proxies()
        return None

    async def _restart_sinks(self) -> None:
        """The receivers again, from the reloaded config; what each had not delivered
        waits in its outbox on disk, found again by its address."""
        for sink in self._sinks:
            self.bus.unsubscribe(sink.offer)
            await sink.close()
        self._sinks = []
        await self._start_sinks()
        if self._discord is not None:
            await self._start_channel_sink(self._discord)
        assert self.service is not None
        for sink in self._sinks:
            self.service.watchdog.unresolved |= sink.open_groups

    async def _restart_proxies(self) -> str | None:
        """The demand proxies again, from the reloaded config (none waits or runs)."""
        # Their counts go on: a reload is not a restart.
        kept = {} if self._proxies is None else self._proxies.counts()
        if self._proxies is not None:
            await self._proxies.close()
            self._proxies = None
            assert self.service is not None
            self.service.status_sections.pop("proxies", None)
            self.service.status_sections.pop("router", None)
            self.metrics.proxy_budgets = dict
        api = self.config.api
        self._files = fit_open_files(
            api.max_connections if api.listen else 0, api.socket_connections,
            _proxy_budgets(self.config))
        try:
            await self._start_proxies()
        except GpuwardenError as exc:
            return f"the demand proxies are down: they could not start again: {exc}"
        if self._proxies is not None:
            self._proxies.carry(kept)
        return None

    async def _restore(self) -> None:
        """Stop what an earlier daemon left running, then restore each GPU's mode."""
        assert self._switcher is not None
        await self._stop_orphans()
        await self._switcher.restore()

    async def _stop_orphans(self) -> None:
        """A daemon killed without stopping its process workloads (SIGKILL, a crash)
        leaves them running with their VRAM: stop each one found by the pid and start
        time it recorded, and prove its VRAM came back, before anything starts. So there
        is never a second copy of a workload."""
        assert self.service is not None and self._switcher is not None
        supervisor = self.service.supervisor
        assert supervisor is not None
        for name, workload in self._workloads.items():
            if not isinstance(workload, ProcessWorkload):
                continue
            async with supervisor.lock(name):
                found = await asyncio.to_thread(workload.stop_orphan)
            if found is None:
                continue
            reason = "left running by a gpuwarden that was killed without stopping it"
            supervisor.note_stop(name, by="daemon start", reason=reason)
            gpu = self.config.gpu_of_workload(name)
            verdict = None if gpu is None else \
                await self._switcher.verify_released(gpu, {name})
            self.bus.publish(
                "workload.orphan", f"{name}: {found} was {reason}; stopped it before "
                "starting anything" + ("" if verdict is None or verdict.clear else
                                       f", but its VRAM is not back: {verdict.reason}"),
                severity=Severity.WARNING, workload=name, gpu=gpu, process=found,
                released=None if verdict is None else verdict.clear)

    async def _tick(self) -> None:
        assert self.service is not None
        self._ticking = asyncio.current_task()
        try:
            critical = await self.service.tick()
        except Exception:  # a bug in one tick must not end sampling
            log.exception("sampling failed")
            return
        finally:
            self._ticking = None
        if self._protect is not None:
            for gpu in critical:
                self._spawn(self._protect.run(gpu))
        self.notifier.watchdog()
        self.notifier.status(self._status_line())
        if self._auth_failures is not None:
            self._auth_failures.end_quiet_episodes()
        if self._storms is not None:
            self._storms.end_quiet()
        if self._proxies is not None:
            self._proxies.end_quiet_episodes()
        if self._queue_reader is None or self._queue_reader.done():
            # In the background: a hung ComfyUI must not hold up sampling.
            self._queue_reader = asyncio.get_running_loop().create_task(
                self.service.read_queues())
        if self._guard is not None and self._restore_task is not None and \
                self._restore_task.done():
            self._guard.check(self.service.workload_statuses)

    def _watch_docker(self) -> None:
        """Docker's events, once there is a container workload (at start or reload)."""
        if self._docker_events is None and \
                any(w.kind == "docker" for w in self._workloads.values()):
            self._docker_events = DockerEventWatcher(self.config.docker, self._on_docker_event,
                                                     self._on_docker_connection)
            self._docker_events.start(asyncio.get_running_loop())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_docker_event(self, event: ContainerEvent) -> None:
        assert self._guard is not None
        if self._crashloop is not None:
            self._crashloop.on_event(event)
        name = self._guard.workload_of_container(event.name)
        if name is None:
            return
        if event.action == "start" and (
            self._restore_task is not None and self._restore_task.done()
        ):
            self._guard.spawn(self._guard.on_started(name, "docker event"))

    async def _watch_units(self) -> None:
        """Unit changes (D-Bus signals) of kind = "systemd" workloads, to the guards."""
        units = {w.unit: (n, UnitLifecycle(w.unit)) for n, w in self._workloads.items()
                 if isinstance(w, SystemdWorkload)}
        if self._systemd is None or not units:
            return
        self._units = units
        try:
            await self._subscribe_units()
        except SystemdBusError as exc:
            # Fail closed: the units read as unknown, and no switch can prove them down.
            self.bus.publish("systemd.error", f"cannot watch units over D-Bus: {exc}; "
                             "retrying", severity=Severity.ERROR, units=list(units),
                             detail=str(exc))
            self._spawn(self._resubscribe_units())

    async def _subscribe_units(self) -> None:
        assert self._systemd is not None
        loop = asyncio.get_running_loop()

        def forward(unit: str, _interface: str, changed: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self._on_unit_change, unit, changed)

        await asyncio.to_thread(self._systemd.watch, list(self._units), forward)
        for unit, (_, lifecycle) in self._units.items():
            lifecycle.update(await asyncio.to_thread(self._systemd.properties, unit))

    async def _resubscribe_units(self) -> None:
        delay = 2.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self._subscribe_units()
            except SystemdBusError:
                delay = min(delay * 2, 60.0)
                continue
            self.bus.publish("systemd.error", "watching units over D-Bus again",
                             units=list(self._units), recovered=True)
            return

    def _on_unit_change(self, unit: str, changed: dict[str, Any]) -> None:
        name, lifecycle = self._units[unit]
        for action, details in lifecycle.update(changed):
            if self._crashloop is not None:
                # When the main process ended, as systemd saw it; else now.
                at = details["exited_at"] if action == "die" and details["exited_at"] \
                    else time.time()
                self._crashloop.observe(name, action, at, details["exit_code"],
                                        unit=unit, result=details["result"],
                                        n_restarts=details["n_restarts"])
            if action == "start" and self._guard is not None and \
                    self._restore_task is not None and self._restore_task.done():
                self._guard.spawn(self._guard.on_started(name, "unit change"))

    def _on_docker_connection(self, connected: bool, detail: str) -> None:
        if connected:
            self.bus.publish("docker.error", "Docker engine reachable again",
                             host=self.config.docker.resolved_host(), recovered=True)
        else:
            self.bus.publish(
                "docker.error", f"Docker engine unreachable: {detail}", severity=Severity.ERROR,
                host=self.config.docker.resolved_host(), detail=detail,
            )

    def _status_line(self) -> str:
        if self.service is None:
            return "starting"
        doc = self.service.status()
        parts = [f"GPU{g['index']} {g['mode'] or '-'} {g['tier']} {g['used_fraction']:.0%}"
                 for g in doc["gpus"]]
        return "; ".join(parts) or "no GPU readable"

    async def _start_discord(self) -> None:
        token = self.config.discord.token
        if self.service is None:
            return
        if token is None:
            self.service.status_sections["discord"] = lambda: {
                "state": "disabled", "detail": "no token configured"}
            return
        from .discord_bot import DiscordFrontEnd

        cfg = self.config
        bot = DiscordFrontEnd(self.service, cfg, self.bus)
        self._discord = bot
        self.service.status_sections["discord"] = bot.status
        await self._start_channel_sink(bot)
        self._discord_task = asyncio.get_running_loop().create_task(
            bot.run(token.get_secret_value()))

    async def _start_channel_sink(self, bot: DiscordFrontEnd) -> None:
        """The alert channel's receiver, which posts through the bot."""
        from .discord_bot import DiscordChannelSink

        cfg = self.config
        if cfg.discord.alert_channel_id:
            sink = DiscordChannelSink(
                cfg.discord.alert_channel_id, bot.logged_in_client, cfg.delivery, self.bus,
                severity_named(cfg.discord.alert_min_severity),
                cfg.daemon.state_dir / "outbox", self.metrics.on_delivery)
            await sink.start()
            self.bus.subscribe(sink.offer)
            self._sinks.append(sink)

    async def _start_sinks(self) -> None:
        cfg = self.config
        if self._sink_http is None:
            self._sink_http = httpx.AsyncClient()
        secret = cfg.n8n.signing_secret
        outboxes = cfg.daemon.state_dir / "outbox"
        auth = None
        if cfg.n8n.auth_header and cfg.n8n.auth_value is not None:
            auth = (cfg.n8n.auth_header, cfg.n8n.auth_value.get_secret_value())
        for url in cfg.n8n.event_webhook_urls:
            self._sinks.append(N8nSink(
                url, secret.get_secret_value() if secret else None, cfg.delivery, self.bus,
                self._sink_http, severity_named(cfg.n8n.min_severity), outboxes,
                self.metrics.on_delivery, auth=auth))
        if cfg.discord.alert_webhook_url:
            self._sinks.append(DiscordWebhookSink(
                cfg.discord.alert_webhook_url, cfg.delivery, self.bus, self._sink_http,
                severity_named(cfg.discord.alert_min_severity), outboxes,
                self.metrics.on_delivery))
        for sink in self._sinks:
            await sink.start()
            # Every event reaches offer(): a resolution below the receiver's threshold
            # still goes to a receiver that was sent the alert.
            self.bus.subscribe(sink.offer)

    async def _start_proxies(self) -> None:
        assert self.service is not None
        if not self.config.proxy and self.config.router.listen is None:
            return
        from .proxy import DemandProxies  # only nodes with proxies load them

        proxies = DemandProxies(self.service, self.bus, self.metrics,
                                self._files.proxies if self._files else None)
        try:
            await proxies.start()
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                hint = ("that address is not one of this host's (yet): a bridge's gateway "
                        "exists only while Docker runs (start gpuwarden after it), or fix "
                        "[proxy.NAME] listen")
            else:
                hint = ("is the workload itself still on that address? Move it to another "
                        "port (its url) and leave the proxy the address clients use "
                        "([proxy.NAME] listen)")
            raise GpuwardenError(f"a demand proxy cannot listen: {exc}; {hint}") from exc
        self._proxies = proxies
        self.service.status_sections["proxies"] = proxies.status
        if proxies.router is not None:
            self.service.status_sections["router"] = proxies.router.status
        self.metrics.proxy_budgets = proxies.budgets

    async def _listen(self, path: Path) -> None:
        assert self.service is not None
        api = self.config.api
        _claim_socket_path(path)
        self._storms = ErrorStorms()
        asyncio.get_running_loop().set_exception_handler(self._storms.loop_exception_handler)
        logging.getLogger("gpuwarden.http").addFilter(self._storms.http_filter)
        self._auth_failures = AuthFailures(api.auth_failure_burst, api.auth_failure_rate,
                                           self.bus)
        auth = self._auth = ApiAuth(api, ReplayGuard(self.config.daemon.state_dir /
                                                     "api-replay.json"))

        def app(node_page: bool = False) -> web.Application:
            assert self.service is not None and self._auth_failures is not None
            return build_app(self.service, api, self.metrics, auth, self._auth_failures,
                             node_page=node_page)

        # Every door's budget at once, so the proxies' floods cannot take what the API
        # and the control socket need (the proxies' budgets shrink first).
        self._files = fit_open_files(
            api.max_connections if api.listen else 0, api.socket_connections,
            _proxy_budgets(self.config))
        socket_budget = ConnectionBudget("socket", api.socket_connections,
                                         on_refused=self.metrics.on_connection_refused)
        self._doors.append(await serve(app(), socket_budget, idle_timeout=api.idle_timeout,
                                       unix_path=str(path)))
        if api.listen:
            host, _, port = api.listen.rpartition(":")
            tcp_budget = ConnectionBudget(
                "tcp", self._files.tcp, on_refused=self.metrics.on_connection_refused)
            self._doors.append(await serve(app(node_page=True), tcp_budget,
                                           idle_timeout=api.idle_timeout,
                                           host=host.strip("[]"), port=int(port)))
        self.metrics.connections = lambda: {d.budget.door: d.budget.open for d in self._doors}
        os.chmod(path, 0o660)
        group = self.config.daemon.socket_group
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                log.warning("group %r does not exist; the socket is root's only", group)
            else:
                # Under the unit the socket is born in the service's group already, and
                # chown() is outside its syscall filter (@privileged): only change what
                # differs.
                if os.stat(path).st_gid != gid:
                    os.chown(path, -1, gid)

    async def wait(self) -> None:
        await self.stop_requested.wait()

    async def cleanup(self) -> None:
        """Tear down in reverse order; collect errors instead of stopping at the first."""
        if self.state is DaemonState.CLOSED:
            return
        self.state = DaemonState.CLOSED
        self.notifier.stopping()
        self.bus.publish("daemon.stopping", "gpuwarden stopping", pid=os.getpid())
        errors: list[BaseException] = []
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if self._scheduler is not None and self._scheduler.running:
            # The scheduler's shutdown cancels a job under way: let a sample being
            # taken finish first (it is short), so it ends as a sample, not an error.
            self._scheduler.pause()
            ticking = self._ticking
            if ticking is not None and ticking is not asyncio.current_task():
                await asyncio.gather(asyncio.shield(ticking), return_exceptions=True)
            self._scheduler.shutdown(wait=False)
        for task in (self._restore_task, self._queue_reader):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._proxies is not None:  # waiting requests are answered 503 first
            await self._proxies.close()
        if self._docker_events is not None:
            await asyncio.to_thread(self._docker_events.stop)
        if self._guard is not None:
            await self._guard.close()
        if self._crashloop is not None:
            await self._crashloop.close()
        if self._restarter is not None:
            await self._restarter.close()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._switcher is not None:
            await self._switcher.close()
        self.bus.close_streams()  # followers' streams end, so the doors can close
        for door in self._doors:
            await door.runner.cleanup()
        if self._doors:
            with contextlib.suppress(FileNotFoundError):
                self.config.daemon.socket.unlink()
        if self._auth_failures is not None:
            self._auth_failures.end_quiet_episodes(everything=True)
        if self._storms is not None:
            self._storms.end_quiet(everything=True)
            logging.getLogger("gpuwarden.http").removeFilter(self._storms.http_filter)
        # Process workloads that are our children end with us, stopped by us (not by
        # systemd's final SIGKILL), and audited. Containers, units and transient units
        # stay up, to be found again by the next start.
        children = [w for w in self._workloads.values() if isinstance(w, ProcessWorkload)]
        ends = [self._end_child(w.name) for w in children]
        for workload, res in zip(children, await asyncio.gather(*ends, return_exceptions=True),
                                 strict=True):
            if isinstance(res, BaseException):
                errors.append(res)
            elif res:
                self.bus.publish("workload.stopped", f"{workload.name} stopped: gpuwarden is "
                                 "stopping", requested_by="daemon", workload=workload.name,
                                 gpu=self.config.gpu_of_workload(workload.name))
        for each in self._workloads.values():
            try:
                each.close()
            except Exception as exc:
                errors.append(exc)
        for sink in self._sinks:  # the Discord channel's first: it posts through the bot
            await sink.close()
        if self._discord is not None:
            await self._discord.close()
        if self._discord_task is not None:
            self._discord_task.cancel()
            await asyncio.gather(self._discord_task, return_exceptions=True)
        if self._sink_http is not None:
            await self._sink_http.aclose()
        if self._http is not None:
            await self._http.aclose()
        if self._backend is not None:
            await asyncio.to_thread(self._backend.close)
        if self._systemd is not None:
            await asyncio.to_thread(self._systemd.close)
        for error in errors:
            self.bus.publish("daemon.stopping", f"error during shutdown: {error}",
                             severity=Severity.ERROR, error=str(error))

    async def _end_child(self, name: str) -> bool:
        """Stop a process workload if it runs; True if it did. Under its lock, so a start
        still finishing in a thread (a switch cancelled by the shutdown) is seen."""
        if self.service is None or self.service.supervisor is None:
            return False
        supervisor = self.service.supervisor
        async with supervisor.lock(name):
            if not (await supervisor.status(name)).running:
                return False
            await supervisor.stop_locked(name, by="daemon", reason="gpuwarden is stopping",
                                         requested_by="daemon")
            return True


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket, but never one another running daemon answers on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise GpuwardenError(f"another gpuwarden daemon is listening on {path}")


def _proxy_budgets(config: Config) -> dict[str, int]:
    """The connection budgets of the demand proxies and the model router."""
    budgets = {name: proxy.max_connections for name, proxy in config.proxy.items()}
    if config.router.listen is not None:
        budgets["router"] = config.router.max_connections
    return budgets


def _try_bind(address: tuple[str, int]) -> None:
    with socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


def run(config: Config, path: str | Path | None = None) -> int:
    """Run the daemon to its end on uvloop's event loop where uvloop is installed (a
    dependency on Linux: each request through a proxy or the router costs less CPU and
    waits less), else on asyncio's own."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_daemon(config, path))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def run_daemon(config: Config, path: str | Path | None = None) -> int:
    """Run the daemon; `path`: the file `config` came from, read again on a reload."""
    daemon = Daemon(config, path=path)
    try:
        await daemon.setup()
        await daemon.wait()
    finally:
        await daemon.cleanup()
    return 0
