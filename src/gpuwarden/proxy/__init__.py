"""The demand proxy: one reverse proxy per workload (`[proxy.<workload>]`), and one
scheduler per GPU deciding when waiting demand gets its mode. A front end like the
HTTP API: it asks the service for switches and never touches workloads itself."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .cache import ReadCache
from .router import ModelRouter
from .scheduler import ROUTER, DemandScheduler, ModePolicy
from .server import WorkloadProxy

if TYPE_CHECKING:
    from ..events import EventBus
    from ..metrics import Metrics
    from ..service import Service

__all__ = ["DemandProxies"]


class DemandProxies:
    """Every configured proxy and the model router, started and stopped together."""

    def __init__(self, service: Service, bus: EventBus, metrics: Metrics | None,
                 budgets: dict[str, int] | None = None) -> None:
        """`budgets`: each proxy's max_connections (and the router's, as "router") as
        fitted to the open-files limit."""
        config = service.config
        router = config.router
        routed = sorted(set(config.routed_models().values())) if router.listen else []
        fronts = [(config.proxy_mode(name), p.min_dwell, p.preempt)
                  for name, p in config.proxy.items()]
        fronts += [(config.modes_of_workload(name)[0], router.min_dwell, router.preempt)
                   for name in routed]
        policies: dict[str, ModePolicy] = {}
        for mode, dwell, preempt in fronts:
            known = policies.get(mode)
            policies[mode] = ModePolicy(
                dwell_s=max(dwell, known.dwell_s if known else 0.0),
                priority=config.mode_priority(mode),
                preempt=preempt or bool(known and known.preempt))
        self.schedulers: dict[int, DemandScheduler] = {}

        def scheduler_of(name: str) -> DemandScheduler:
            gpu = config.gpu_of_workload(name)
            assert gpu is not None, "checked with the config"
            scheduler = self.schedulers.get(gpu)
            if scheduler is None:
                scheduler = self.schedulers[gpu] = DemandScheduler(
                    gpu, name, service, bus,
                    {m: p for m, p in policies.items() if config.all_modes()[m].gpu == gpu},
                    metrics)
            return scheduler

        self.proxies: list[WorkloadProxy] = []
        for name in config.proxy:
            cache = ReadCache(config.daemon.state_dir / "proxy" / name)
            self.proxies.append(WorkloadProxy(name, config, service, scheduler_of(name),
                                              cache, bus, metrics,
                                              (budgets or {}).get(name)))
        self.router: ModelRouter | None = None
        if routed:
            lanes = {name: WorkloadProxy(
                name, config, service, scheduler_of(name),
                ReadCache(config.daemon.state_dir / "proxy" / f"router-{name}"), bus,
                metrics, lane_of=router) for name in routed}
            self.router = ModelRouter(config, lanes, bus, metrics,
                                      (budgets or {}).get(ROUTER))

    async def start(self) -> None:
        """Listen on every proxy's address (raises OSError when one is taken)."""
        for proxy in self.proxies:
            await asyncio.to_thread(proxy.cache_load)
        for scheduler in self.schedulers.values():
            scheduler.start()
        fronts: list[WorkloadProxy | ModelRouter] = [*self.proxies]
        if self.router is not None:
            fronts.append(self.router)
        started: list[WorkloadProxy | ModelRouter] = []
        try:
            for front in fronts:
                await front.start()
                started.append(front)
        except BaseException:
            for front in started:
                await front.close()
            raise

    async def close(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.close()
        for proxy in self.proxies:
            await proxy.close()
        if self.router is not None:
            await self.router.close()

    def status(self) -> list[dict[str, Any]]:
        return [proxy.status() for proxy in self.proxies]

    def counts(self) -> dict[str, dict[str, Any]]:
        """What each proxy, the router and each of its lanes counted (see `carry`)."""
        found = {proxy.name: dict(proxy.counts) for proxy in self.proxies}
        if self.router is not None:
            found[ROUTER] = dict(self.router.counts)
            found |= {f"{ROUTER}/{name}": dict(lane.counts)
                      for name, lane in self.router.lanes.items()}
        return found

    def carry(self, counts: dict[str, dict[str, Any]]) -> None:
        """Go on from counts an earlier set counted (a reload is not a restart)."""
        for proxy in self.proxies:
            proxy.counts.update(counts.get(proxy.name, {}))
        if self.router is not None:
            self.router.counts.update(counts.get(ROUTER, {}))
            for name, lane in self.router.lanes.items():
                lane.counts.update(counts.get(f"{ROUTER}/{name}", {}))

    def end_quiet_episodes(self) -> None:
        """Announce the end of each proxy's overload that has been quiet long enough."""
        for proxy in self.proxies:
            proxy.overload.end_quiet()
        if self.router is not None:
            self.router.overload.end_quiet()

    def in_flight(self, workloads: set[str]) -> list[dict[str, Any]]:
        """The demand requests in flight to any of `workloads` (a switch would cut them)."""
        return [t.describe() for s in self.schedulers.values()
                for t in s.in_flight_to(workloads)]

    def end_in_flight(self, workloads: set[str], reason: str) -> int:
        """End each demand request in flight to `workloads` with an error in its own
        answer's format (a forced switch is about to stop them); how many."""
        tickets = [t for s in self.schedulers.values() for t in s.in_flight_to(workloads)]
        for ticket in tickets:
            ticket.abort(reason)
        return len(tickets)

    def last_used(self, mode: str) -> float | None:
        """When demand last used `mode` through any proxy or the router (Unix s)."""
        found = [t for s in self.schedulers.values() if (t := s.last_used(mode)) is not None]
        return max(found, default=None)

    def busy(self) -> int:
        """Requests waiting for their mode or in flight through any proxy."""
        return sum(s.busy() for s in self.schedulers.values())

    def budgets(self) -> dict[str, tuple[int, int]]:
        """Open connections and the budget of each proxy, for the metrics."""
        found = {proxy.name: (proxy.budget.open, proxy.budget.limit) for proxy in self.proxies}
        if self.router is not None:
            found[ROUTER] = (self.router.budget.open, self.router.budget.limit)
        return found
