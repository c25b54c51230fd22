"""A simulated GPU whose VRAM is held by real, live processes.

The ledger (a contract; README, "The simulated GPU's ledger"): `<ledger_dir>/*.mib`
are claims on GPU 0 and `<ledger_dir>/gpu<N>/*.mib` claims on GPU N. A claim's
content is a decimal MiB count, optionally followed by the word `leak`. A claim
counts as used VRAM while any process keeps the file open and for `release_delay`
seconds after the last holder was seen; a `leak` claim counts until the file is
deleted. The processes that keep a claim open are its GPU processes, by host PID,
found by scanning `/proc/*/fd` (the same PIDs NVML would report, also for processes
inside containers).

Holders are found by a full scan when a claim appears or is rewritten, when a known
holder goes away, and every 10 s; in between, known holders are re-checked cheaply.
A process that opens an existing claim without writing it is seen within 10 s, so a
holder writes its claim when it takes it, as the recipe does.

In busybox sh, inside a container with the ledger bind-mounted at /ledger:

    echo 6000 > /ledger/llm.mib; exec sleep 1000000 3</ledger/llm.mib

A holder the daemon may not inspect (another user's process: /proc/PID/fd needs the
same user or CAP_SYS_PTRACE) also takes a shared flock on its claim, which
/proc/locks shows to everyone: `flock -s 3` after opening it.

A fault for drills: while `<ledger_dir>/HANG` exists, sampling blocks, as a wedged
NVML call does. The daemon then stops sending WATCHDOG=1 and systemd restarts it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .model import MIB, GpuFault, GpuProcess, GpuSample, NodeSample

__all__ = ["Claim", "SimBackend", "read_claim", "scan_holders"]

_HANG = "HANG"

@dataclass(frozen=True, slots=True)
class Claim:
    mib: int
    leak: bool


def read_claim(path: Path) -> Claim | None:
    """The claim in a ledger file, or None when it is unreadable or malformed."""
    try:
        words = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if not words or not words[0].isdigit():
        return None
    return Claim(mib=int(words[0]), leak=len(words) > 1 and words[1].lower() == "leak")


Holder = tuple[int, int]  # (pid, fd)


def scan_holders(targets: dict[tuple[int, int], Path]) -> dict[Path, list[Holder]]:
    """Which (pid, fd) hold each target file open, matched by (device, inode).

    Matching by inode rather than by name makes this work across mount namespaces:
    a container sees the bind-mounted ledger under its own path.
    """
    holders: dict[Path, list[Holder]] = {}
    if not targets:
        return holders
    self_pid = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == self_pid:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            link = f"{fd_dir}/{fd}"
            try:
                if not os.readlink(link).endswith(".mib"):
                    continue
                st = os.stat(link)
            except OSError:
                continue
            path = targets.get((st.st_dev, st.st_ino))
            if path is not None:
                holders.setdefault(path, []).append((pid, int(fd)))
    for inode, pids in _flock_holders().items():
        path = targets.get(inode)
        if path is None:
            continue
        seen = {pid for pid, _ in holders.get(path, [])}
        holders.setdefault(path, []).extend((pid, _LOCK_FD) for pid in pids
                                            if pid not in seen and pid != self_pid)
    return holders


_LOCK_FD = -1  # a holder found by its flock, not by an open fd we may read


def _flock_holders() -> dict[tuple[int, int], list[int]]:
    """PIDs with a lock on each (st_dev, st_ino), from /proc/locks (readable by all)."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    found: dict[tuple[int, int], list[int]] = {}
    for line in lines:
        # "1: FLOCK  ADVISORY  READ  1234 08:01:5678 0 EOF"; "->" marks a waiter.
        fields = line.split()
        if len(fields) < 6 or "->" in fields[1]:
            continue
        try:
            pid = int(fields[4])
            major, minor, ino = fields[5].split(":")
            dev = os.makedev(int(major, 16), int(minor, 16))
            found.setdefault((dev, int(ino)), []).append(pid)
        except ValueError:
            continue
    return found


def still_held(holder: Holder, inode: tuple[int, int]) -> bool:
    """Whether a holder seen before still has the claim open (two syscalls, not a scan)."""
    pid, fd = holder
    if fd == _LOCK_FD:
        return pid in _flock_holders().get(inode, [])
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == inode


# A full /proc scan finds holders nobody has seen yet; between scans the known ones are
# re-checked cheaply. A scan also runs whenever a claim appears or is rewritten, or a
# known holder is gone, so releases are seen at once; only an extra holder of a claim
# that already has one can wait this long to be listed.
_FULL_SCAN_S = 10.0


@dataclass
class _ClaimState:
    # (inode, mtime) of the claim: a holder that (re)writes it starts a new allocation,
    # even if no sample saw it held before it exited again.
    signature: tuple[int, int]
    # Monotonic time the claim was first seen without a holder (None while held). The
    # release delay runs from there: the exit itself happened at most one sample before.
    unheld_since: float | None = None


class SimBackend:
    """A node of `count` simulated GPUs of `total_mib` each, backed by the ledger."""

    name = "sim"

    def __init__(
        self,
        ledger_dir: Path,
        *,
        total_mib: int = 20480,
        count: int = 1,
        release_delay: float = 0.15,
        gpu_name: str = "gpuwarden simulated GPU",
    ) -> None:
        self.ledger_dir = ledger_dir
        self.total_mib = total_mib
        self.count = count
        self.release_delay = release_delay
        self.gpu_name = gpu_name
        self._lock = threading.Lock()
        self._seen: dict[Path, _ClaimState] = {}
        self._holders: dict[Path, list[Holder]] = {}
        self._inodes: dict[tuple[int, int], Path] = {}
        self._last_scan = -_FULL_SCAN_S
        self._first_sample = True
        ledger_dir.mkdir(parents=True, exist_ok=True)
        for index in range(1, count):
            (ledger_dir / f"gpu{index}").mkdir(exist_ok=True)

    def gpu_dir(self, index: int) -> Path:
        return self.ledger_dir if index == 0 else self.ledger_dir / f"gpu{index}"

    def _claim_files(self) -> dict[Path, int]:
        files: dict[Path, int] = {}
        for index in range(self.count):
            try:
                entries = list(os.scandir(self.gpu_dir(index)))
            except OSError:
                continue
            for entry in entries:
                if entry.name.endswith(".mib") and entry.is_file():
                    files[Path(entry.path)] = index
        return files

    def sample(self) -> NodeSample:
        while (self.ledger_dir / _HANG).exists():  # the documented drill fault
            time.sleep(0.2)
        started = time.monotonic()
        with self._lock:
            try:
                gpus = self._sample(started)
            except OSError as exc:
                return NodeSample(
                    gpus=(), fault=GpuFault.UNKNOWN,
                    fault_detail=f"ledger {self.ledger_dir} unreadable: {exc}", taken_at=started,
                )
        return NodeSample(gpus=gpus, taken_at=started, duration_s=time.monotonic() - started)

    def _sample(self, now: float) -> tuple[GpuSample, ...]:
        files = self._claim_files()
        inodes: dict[tuple[int, int], Path] = {}
        signatures: dict[Path, tuple[int, int]] = {}
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue
            inodes[(st.st_dev, st.st_ino)] = path
            signatures[path] = (st.st_ino, st.st_mtime_ns)
        holders = self._find_holders(inodes, signatures, now)
        used_mib = [0] * self.count
        procs: list[dict[int, int]] = [{} for _ in range(self.count)]
        for path, index in files.items():
            claim = read_claim(path)
            if claim is None or path not in signatures:
                continue
            pids = sorted({pid for pid, _fd in holders.get(path, [])})
            state = self._seen.get(path)
            if state is None or state.signature != signatures[path]:
                state = self._seen[path] = _ClaimState(signature=signatures[path])
                if not pids and self._first_sample:
                    # Left from before this backend started (a daemon restart): its
                    # holder is long gone, and a GPU frees a dead process's memory.
                    state.unheld_since = now - self.release_delay
            if pids:
                state.unheld_since = None
                # A claim is one allocation: it is credited to one process, the lowest PID.
                procs[index][pids[0]] = procs[index].get(pids[0], 0) + claim.mib
            elif state.unheld_since is None:
                state.unheld_since = now
            counted = (
                bool(pids)
                or claim.leak
                or (state.unheld_since is not None
                    and now - state.unheld_since < self.release_delay)
            )
            if counted:
                used_mib[index] += claim.mib
        for gone in set(self._seen) - set(files):
            del self._seen[gone]
        self._first_sample = False
        total = self.total_mib * MIB
        samples = []
        for index in range(self.count):
            used = min(used_mib[index] * MIB, total)
            samples.append(
                GpuSample(
                    index=index,
                    uuid=self._uuid(index),
                    name=self.gpu_name,
                    total_bytes=total,
                    used_bytes=used,
                    free_bytes=total - used,
                    util_gpu_pct=0 if used == 0 else 100,
                    processes=tuple(
                        GpuProcess(pid=pid, used_bytes=mib * MIB)
                        for pid, mib in sorted(procs[index].items())
                    ),
                    taken_at=now,
                )
            )
        return tuple(samples)

    def _find_holders(self, inodes: dict[tuple[int, int], Path],
                      signatures: dict[Path, tuple[int, int]], now: float
                      ) -> dict[Path, list[Holder]]:
        known = {inode: path for inode, path in inodes.items()}
        unchanged = known == self._inodes and all(
            (state := self._seen.get(path)) is not None and state.signature == signatures[path]
            for path in signatures)
        if unchanged and now - self._last_scan < _FULL_SCAN_S:
            by_path = {path: inode for inode, path in inodes.items()}
            if all(still_held(h, by_path[path])
                   for path, hs in self._holders.items() for h in hs):
                return self._holders
        self._holders = scan_holders(inodes)
        self._inodes, self._last_scan = known, now
        return self._holders

    def _uuid(self, index: int) -> str:
        digest = hashlib.sha1(f"{self.ledger_dir.resolve()}:{index}".encode()).hexdigest()
        return f"GPU-sim-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{index:04d}"

    def close(self) -> None:
        """Nothing to release: the ledger belongs to its holders."""
