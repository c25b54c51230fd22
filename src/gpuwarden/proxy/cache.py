"""The last answers to reads, kept on disk, for while the upstream does not run.

Open WebUI lists Ollama's models before anyone can chat, and ComfyUI's page must load
before anyone can queue a prompt. While the other mode holds the GPU those reads are
answered from here, marked as such, so the client gets to the point of sending
demand. An answer read again unchanged is not written again for a while (see
`unchanged`): Open WebUI polls its lists every few seconds. Each answer is two files
(its head as JSON, its body) written to a temporary name and renamed, so a crash
leaves an old answer or none, never half of one. The folder is bounded: answers over
`entry_limit` are not kept, and the oldest go first.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CachedAnswer", "ReadCache"]

log = logging.getLogger(__name__)

# The largest answer `unchanged` compares (a model list is a few KiB; 256 KiB hash in
# about 0.3 ms).
_HASHED_HERE = 256 << 10
# Response headers worth replaying; the rest belong to the original exchange.
_KEPT_HEADERS = ("content-type", "content-encoding", "content-language", "etag",
                 "last-modified", "cache-control")


@dataclass(frozen=True)
class CachedAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    stored_at: float  # Unix time


def cache_key(method: str, path_qs: str, body: bytes | None) -> str:
    digest = hashlib.sha256(f"{method} {path_qs}\n".encode())
    if body:
        digest.update(body)
    return digest.hexdigest()[:32]


class ReadCache:
    """Answers by key, on disk under `folder`, at most `total_limit` bytes of bodies."""

    def __init__(self, folder: Path, *, entry_limit: int = 8 << 20,
                 total_limit: int = 64 << 20, rewrite_after_s: float = 300.0) -> None:
        """`rewrite_after_s`: an answer seen again unchanged is written again only once
        its copy on disk is this old (its age after a restart is at most this far off)."""
        self.folder = folder
        self.entry_limit = entry_limit
        self.total_limit = total_limit
        self.rewrite_after_s = rewrite_after_s
        self._sizes: dict[str, tuple[float, int]] = {}  # key -> (stored_at, bytes)
        # What this run wrote or saw again: key -> (digest, written at, last seen at).
        self._seen: dict[str, tuple[bytes, float, float]] = {}
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Index what an earlier run kept (blocking: call at start-up, in a thread)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        for head in self.folder.glob("*.json"):
            body = head.with_suffix(".body")
            try:
                self._sizes[head.stem] = (head.stat().st_mtime, body.stat().st_size)
            except OSError:
                head.unlink(missing_ok=True)  # half of an answer: drop it
        for stray in self.folder.glob("*.tmp"):
            stray.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._sizes)

    async def get(self, key: str) -> CachedAnswer | None:
        """The answer kept under `key`, its `stored_at` when it was last seen."""
        if key not in self._sizes:
            return None
        answer = await asyncio.to_thread(self._read, key)
        seen = self._seen.get(key)
        if answer is not None and seen is not None and seen[2] > answer.stored_at:
            answer = CachedAnswer(answer.status, answer.headers, answer.body, seen[2])
        return answer

    def unchanged(self, key: str, status: int, headers: dict[str, str],
                  body: bytes) -> bool:
        """Whether this answer (up to 256 KiB) is the one this run kept under `key`,
        written less than `rewrite_after_s` ago: then it is only noted as seen now, and
        need not be put."""
        seen = self._seen.get(key)
        # A large answer (an image) is not hashed here, on the event loop: it is
        # written again, in a thread, as before.
        if seen is None or key not in self._sizes or len(body) > _HASHED_HERE:
            return False
        digest, written_at, _ = seen
        now = time.time()
        if now - written_at >= self.rewrite_after_s or \
                _digest(status, _kept(headers), body) != digest:
            return False
        self._seen[key] = (digest, written_at, now)
        return True

    def _read(self, key: str) -> CachedAnswer | None:
        try:
            head = json.loads((self.folder / f"{key}.json").read_text())
            body = (self.folder / f"{key}.body").read_bytes()
            return CachedAnswer(int(head["status"]), dict(head["headers"]), body,
                                float(head["stored_at"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("read cache %s: answer %s unreadable, dropped: %s", self.folder,
                        key, exc)
            self._sizes.pop(key, None)
            return None

    async def put(self, key: str, status: int, headers: dict[str, str], body: bytes) -> None:
        if len(body) > self.entry_limit:
            return
        kept = _kept(headers)
        async with self._lock:  # one writer: the size bound holds
            await asyncio.to_thread(self._write, key, status, kept, body)

    def _write(self, key: str, status: int, headers: dict[str, str], body: bytes) -> None:
        now = time.time()
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o750)
            body_path = self.folder / f"{key}.body"
            tmp = body_path.with_suffix(".body.tmp")
            tmp.write_bytes(body)
            os.replace(tmp, body_path)
            head = self.folder / f"{key}.json"
            tmp = head.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"status": status, "headers": headers,
                                       "stored_at": now}))
            os.replace(tmp, head)  # the head last: it is what marks the answer whole
        except OSError as exc:
            log.warning("read cache %s: cannot keep an answer: %s", self.folder, exc)
            return
        self._sizes[key] = (now, len(body))
        self._seen[key] = (_digest(status, headers, body), now, now)
        total = sum(size for _, size in self._sizes.values())
        for old in sorted(self._sizes, key=lambda k: self._sizes[k][0]):
            if total <= self.total_limit:
                break
            total -= self._sizes.pop(old)[1]
            self._seen.pop(old, None)
            (self.folder / f"{old}.json").unlink(missing_ok=True)
            (self.folder / f"{old}.body").unlink(missing_ok=True)


def _kept(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() in _KEPT_HEADERS}


def _digest(status: int, headers: dict[str, str], body: bytes) -> bytes:
    digest = hashlib.blake2b(f"{status} {sorted(headers.items())}\n".encode(),
                             digest_size=16)
    digest.update(body)
    return digest.digest()
