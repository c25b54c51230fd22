"""Which workload owns a GPU process, for both backends.

NVML and the simulated ledger both report host PIDs. A PID belongs to a workload
when its cgroup names the workload's Docker container (how NVML PIDs inside
containers are attributed) or its systemd unit (`.../ollama.service`, and the
transient unit of a process workload under systemd), or when it descends from, or
shares a session with, a workload's root process (a process workload started as
the daemon's child, in its own session).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .model import GpuSample, NodeSample

__all__ = ["AttributedSample", "OwnerIndex", "ProcessOwner", "container_id_of", "parent_of"]

_CONTAINER_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")


def _cgroup_text(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup", encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def container_id_of(pid: int, cgroup: str | None = None) -> str | None:
    """The Docker container id in /proc/PID/cgroup (v1 or v2, cgroupfs or systemd driver)."""
    text = _cgroup_text(pid) if cgroup is None else cgroup
    match = _CONTAINER_ID.search(text or "")
    return match.group(1) if match else None


def cgroup_components(cgroup: str) -> set[str]:
    """Every path component of every hierarchy in a /proc/PID/cgroup text: a unit's
    processes, its sub-cgroups included, all name `ollama.service` in theirs."""
    parts: set[str] = set()
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        parts.update(p for p in path.split("/") if p)
    return parts


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else None


def _comm(pid: int) -> str | None:
    """/proc/PID/comm, or None when this /proc has no such process."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class ProcessOwner:
    pid: int
    workload: str | None  # None: no workload owns it
    command: str  # /proc/PID/comm, for people and allow lists
    # False when the GPU lists a PID this /proc does not have: a process that exited
    # with its VRAM not yet freed, or one in another PID namespace. Either way nothing
    # can be proven about it.
    visible: bool = True


@dataclass(frozen=True, slots=True)
class AttributedSample:
    """A node sample plus the owner of every GPU process in it."""

    node: NodeSample
    owners: dict[int, ProcessOwner]

    def owned_mib(self, gpu: GpuSample, workloads: set[str] | None = None) -> int:
        """MiB held by processes of `workloads` (any workload when None)."""
        total = 0
        for proc in gpu.processes:
            owner = self.owners.get(proc.pid)
            if owner is None or owner.workload is None:
                continue
            if workloads is None or owner.workload in workloads:
                total += proc.used_mib or 0
        return total

    def unowned_mib(self, gpu: GpuSample) -> int:
        return sum(
            proc.used_mib or 0
            for proc in gpu.processes
            if (owner := self.owners.get(proc.pid)) is None or owner.workload is None
        )


class OwnerIndex:
    """The workloads' roots (container ids, root PIDs), updated as workloads start and stop.

    Written on the event loop, read from the sampling thread: every update replaces
    a whole dict, so a reader never sees one half-changed.
    """

    _MAX_DEPTH = 64

    def __init__(self) -> None:
        self._containers: dict[str, str] = {}
        self._units: dict[str, str] = {}
        self._roots: dict[int, str] = {}

    def set_unit(self, workload: str, unit: str) -> None:
        self._units = {**{u: w for u, w in self._units.items() if w != workload},
                       unit: workload}

    def set_container(self, workload: str, container_id: str | None) -> None:
        containers = {cid: w for cid, w in self._containers.items() if w != workload}
        if container_id:
            containers[container_id] = workload
        self._containers = containers

    def set_root(self, workload: str, pid: int | None) -> None:
        roots = {p: w for p, w in self._roots.items() if w != workload}
        if pid:
            roots[pid] = workload
        self._roots = roots

    def owner_of(self, pid: int) -> str | None:
        containers, units, roots = self._containers, self._units, self._roots
        if containers or units:
            cgroup = _cgroup_text(pid) or ""
            cid = container_id_of(pid, cgroup) if containers else None
            if cid is not None and cid in containers:
                return containers[cid]
            if units:
                for part in cgroup_components(cgroup) & units.keys():
                    return units[part]
        if not roots:
            return None
        try:
            sid = os.getsid(pid)
        except OSError:
            sid = None
        if sid in roots:
            return roots[sid]
        current: int | None = pid
        for _ in range(self._MAX_DEPTH):
            if current is None or current <= 1:
                break
            if current in roots:
                return roots[current]
            current = parent_of(current)
        return None

    def attribute(self, node: NodeSample) -> AttributedSample:
        """Owners of every GPU process in `node` (blocking: reads /proc)."""
        owners: dict[int, ProcessOwner] = {}
        for gpu in node.gpus:
            for proc in gpu.processes:
                if proc.pid not in owners:
                    command = _comm(proc.pid)
                    owners[proc.pid] = ProcessOwner(
                        pid=proc.pid, workload=self.owner_of(proc.pid), command=command or "",
                        visible=command is not None,
                    )
        return AttributedSample(node=node, owners=owners)
