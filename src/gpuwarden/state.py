"""Persisted state: each GPU's mode, an in-flight transition, crash-loop blocks.

Written atomically (temp file, fsync, rename, fsync of the folder) so a crash at any
instant leaves either the old or the new state, never a torn one. A switch records
its transition here *before* acting (write-ahead), so a daemon killed mid-switch can
finish or undo it on the next start.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import GpuwardenError

__all__ = ["STATE_VERSION", "Block", "GpuState", "State", "StateError", "StateStore", "Transition"]

STATE_VERSION = 1


class StateError(GpuwardenError):
    """The state file exists but cannot be used; it is left untouched for a person."""


@dataclass
class Transition:
    """A mode switch in flight: what it was doing when last recorded."""

    id: str
    from_mode: str
    to_mode: str
    step: str  # "planned" | "releasing" | "stopping" | "verifying" | "starting" | "recovering"
    requested_by: str
    started_at: float  # unix seconds


@dataclass
class GpuState:
    mode: str | None = None
    mode_since: float | None = None  # unix seconds the mode became active (for leases)
    transition: Transition | None = None
    # The last failed switch, kept visible in status until the next success.
    failure: dict[str, Any] | None = None


@dataclass
class Block:
    """A crash-loop block on a workload; lifted only by a person (unblock)."""

    workload: str
    blocked_at: float
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class State:
    gpus: dict[int, GpuState] = field(default_factory=dict)
    blocks: dict[str, Block] = field(default_factory=dict)

    def gpu(self, index: int) -> GpuState:
        return self.gpus.setdefault(index, GpuState())

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "gpus": {str(i): asdict(g) for i, g in sorted(self.gpus.items())},
            "blocks": {name: asdict(b) for name, b in sorted(self.blocks.items())},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> State:
        doc = _migrate(doc)
        gpus: dict[int, GpuState] = {}
        for key, raw in doc.get("gpus", {}).items():
            tr = raw.get("transition")
            gpus[int(key)] = GpuState(
                mode=raw.get("mode"),
                mode_since=raw.get("mode_since"),
                transition=Transition(**tr) if tr else None,
                failure=raw.get("failure"),
            )
        blocks = {name: Block(**raw) for name, raw in doc.get("blocks", {}).items()}
        return cls(gpus=gpus, blocks=blocks)


def _migrate(doc: dict[str, Any]) -> dict[str, Any]:
    """Bring a state document written by any earlier version to the current shape."""
    version = doc.get("version", 0)
    if not isinstance(version, int) or version > STATE_VERSION:
        raise StateError(
            f"state written by a newer gpuwarden (version {version}, this one reads up to "
            f"{STATE_VERSION}); upgrade gpuwarden or move the file aside"
        )
    if version == 0:
        # Pre-release layout: {"mode": "llm", "blocked": ["comfyui", ...]} for one GPU.
        doc = {
            "version": 1,
            "gpus": {"0": {"mode": doc.get("mode")}} if doc.get("mode") else {},
            "blocks": {
                name: {"workload": name, "blocked_at": 0.0, "reason": "migrated block"}
                for name in doc.get("blocked", [])
            },
        }
    return doc


class StateStore:
    """Loads and atomically saves the state file `<state_dir>/state.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"
        self._lock = asyncio.Lock()

    def load(self) -> State:
        """The saved state, or an empty one when none was ever written.

        Raises:
            StateError: the file is unreadable, not JSON, or from a newer version.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        try:
            return State.from_json(json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateError(f"{self.path} is not a gpuwarden state file: {exc}") from exc

    def save(self, state: State) -> None:
        self._write(self._encode(state))

    async def save_async(self, state: State) -> None:
        """Save without blocking the loop: encoded here, written (fsync) in a thread.

        Encoding at call time and writing under a FIFO lock keeps the writes in call
        order, so an older state never lands after a newer one.
        """
        data = self._encode(state)
        async with self._lock:
            await asyncio.to_thread(self._write, data)

    @staticmethod
    def _encode(state: State) -> bytes:
        return json.dumps(state.to_json(), indent=2, sort_keys=True).encode()

    def _write(self, data: bytes) -> None:
        write_atomically(self.path, data)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, whole:
    a temp file, fsync, rename, fsync of the folder. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
