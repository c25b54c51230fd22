"""The demand proxy: one reverse proxy per workload (`[proxy.<workload>]`), and one
scheduler per GPU deciding when waiting demand gets its mode. A front end like the
HTTP API: it asks the service for switches and never touches workloads itself."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .cache import ReadCache
from .scheduler import DemandScheduler, ModePolicy
from .server import WorkloadProxy

if TYPE_CHECKING:
    from ..events import EventBus
    from ..metrics import Metrics
    from ..service import Service

__all__ = ["DemandProxies"]


class DemandProxies:
    """Every configured proxy, started and stopped together."""

    def __init__(self, service: Service, bus: EventBus, metrics: Metrics | None,
                 budgets: dict[str, int] | None = None) -> None:
        """`budgets`: each proxy's max_connections as fitted to the open-files limit."""
        config = service.config
        policies: dict[str, ModePolicy] = {}
        for name, proxy in config.proxy.items():
            mode = config.proxy_mode(name)
            known = policies.get(mode)
            policies[mode] = ModePolicy(
                dwell_s=max(proxy.min_dwell, known.dwell_s if known else 0.0),
                priority=config.mode_priority(mode),
                preempt=proxy.preempt or bool(known and known.preempt))
        self.schedulers: dict[int, DemandScheduler] = {}
        self.proxies: list[WorkloadProxy] = []
        for name in config.proxy:
            gpu = config.gpu_of_workload(name)
            assert gpu is not None, "checked with the config"
            scheduler = self.schedulers.get(gpu)
            if scheduler is None:
                scheduler = self.schedulers[gpu] = DemandScheduler(
                    gpu, name, service, bus,
                    {m: p for m, p in policies.items() if config.all_modes()[m].gpu == gpu},
                    metrics)
            cache = ReadCache(config.daemon.state_dir / "proxy" / name)
            self.proxies.append(WorkloadProxy(name, config, service, scheduler, cache, bus,
                                              metrics, (budgets or {}).get(name)))

    async def start(self) -> None:
        """Listen on every proxy's address (raises OSError when one is taken)."""
        for proxy in self.proxies:
            await asyncio.to_thread(proxy.cache_load)
        for scheduler in self.schedulers.values():
            scheduler.start()
        started: list[WorkloadProxy] = []
        try:
            for proxy in self.proxies:
                await proxy.start()
                started.append(proxy)
        except BaseException:
            for proxy in started:
                await proxy.close()
            raise

    async def close(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.close()
        for proxy in self.proxies:
            await proxy.close()

    def status(self) -> list[dict[str, Any]]:
        return [proxy.status() for proxy in self.proxies]

    def end_quiet_episodes(self) -> None:
        """Announce the end of each proxy's overload that has been quiet long enough."""
        for proxy in self.proxies:
            proxy.overload.end_quiet()

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

    def busy(self) -> int:
        """Requests waiting for their mode or in flight through any proxy."""
        return sum(s.busy() for s in self.schedulers.values())

    def budgets(self) -> dict[str, tuple[int, int]]:
        """Open connections and the budget of each proxy, for the metrics."""
        return {proxy.name: (proxy.budget.open, proxy.budget.limit) for proxy in self.proxies}
