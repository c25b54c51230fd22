"""One receiver's undelivered events on disk, oldest first, bounded.

Why SQLite (stdlib `sqlite3`, WAL mode) and not an append-only log of our own: taking
the delivered head off, trimming the oldest at the bound and remembering which alert
groups are open are each one transaction, and a crash at any instant leaves the file
consistent, with no compaction or torn-record handling to write. `synchronous=NORMAL`
in WAL mode survives the daemon being killed at any point (what restarts and
`kill -9` do); only a power loss may take the last few events.

Blocking: every method runs in the caller's thread. The sink gives each outbox one
thread of its own, which also keeps events in order.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Entry", "Outbox"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS open_groups (group_key TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    msg_id: str  # the same on every attempt and across restarts (Standard Webhooks)
    doc: dict[str, Any]


class Outbox:
    def __init__(self, path: Path, bound: int) -> None:
        """Open (or create) the outbox at `path`. A file that is not a usable outbox is
        renamed aside (`set_aside` says where) and a new one is started."""
        self.path = path
        self.bound = bound
        self.set_aside: Path | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError:
            self.set_aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                part = path.with_name(path.name + suffix)
                if part.exists():
                    part.rename(self.set_aside.with_name(self.set_aside.name + suffix))
            self._db = self._open()
        self._prefix = self._meta_prefix()
        # Updated only by this outbox's own writes, which run in order on one I/O
        # thread, so readers on other threads never see an older count win.
        self.queued = self.count()

    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():  # as private as state.json; the WAL inherits the mode
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o640))
        db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; explicit BEGIN
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # The WAL is checkpointed every 1000 pages (SQLite's default) and cut back
            # to this size then, so a long outage does not leave a large file behind.
            db.execute("PRAGMA journal_size_limit=4194304")
            db.executescript(_SCHEMA)
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _meta_prefix(self) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'prefix'").fetchone()
        if row is not None:
            return str(row[0])
        prefix = uuid.uuid4().hex[:12]
        self._db.execute("INSERT INTO meta (key, value) VALUES ('prefix', ?)", (prefix,))
        return prefix

    def put(self, doc: dict[str, Any]) -> tuple[int, int]:
        """Append one event; drop the oldest beyond the bound. Returns (queued, dropped)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO events (doc) VALUES (?)",
                       (json.dumps(doc, default=str, separators=(",", ":")),))
            queued = int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
            dropped = max(0, queued - self.bound)
            if dropped:
                db.execute("DELETE FROM events WHERE seq IN "
                           "(SELECT seq FROM events ORDER BY seq LIMIT ?)", (dropped,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.queued = queued - dropped
        return self.queued, dropped

    def peek(self, limit: int = 1) -> list[Entry]:
        """The oldest undelivered events, at most `limit`, oldest first."""
        rows = self._db.execute("SELECT seq, doc FROM events ORDER BY seq LIMIT ?",
                                (limit,)).fetchall()
        return [Entry(int(seq), f"msg_{self._prefix}_{seq}", json.loads(doc))
                for seq, doc in rows]

    def remove(self, seqs: list[int]) -> int:
        """Take delivered (or rejected) events off; returns how many are left."""
        marks = ",".join("?" * len(seqs))  # one statement: all of them or none
        self._db.execute(f"DELETE FROM events WHERE seq IN ({marks})", seqs)
        self.queued = self.count()
        return self.queued

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def open_groups(self) -> set[str]:
        """Alert groups this receiver was sent an alert for and no resolution yet."""
        return {str(r[0]) for r in self._db.execute("SELECT group_key FROM open_groups")}

    def mark_group(self, group_key: str, is_open: bool) -> None:
        if is_open:
            self._db.execute("INSERT OR IGNORE INTO open_groups (group_key, since) "
                             "VALUES (?, ?)", (group_key, time.time()))
        else:
            self._db.execute("DELETE FROM open_groups WHERE group_key = ?", (group_key,))

    def failing_since(self) -> float | None:
        """When the receiver's current outage began, kept across restarts."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'failing_since'").fetchone()
        return None if row is None else float(row[0])

    def set_failing_since(self, since: float | None) -> None:
        if since is None:
            self._db.execute("DELETE FROM meta WHERE key = 'failing_since'")
        else:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) "
                             "VALUES ('failing_since', ?)", (repr(since),))

    def close(self) -> None:
        self._db.close()
