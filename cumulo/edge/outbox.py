"""The on-disk outbox: every result is written here, with its sequence number, before it is sent.

A result leaves the outbox only when the broker acknowledged it (MQTT PUBACK, QoS 1) or the service answered 2xx
over HTTP, so results made while the network is down, or before the agent was killed, are sent later. The seq
counter lives in the same database and is taken in the same transaction that stores the result, so it grows
strictly across restarts and a seq never names two different results; the service deduplicates by
(device_id, seq), which turns at-least-once sending into exactly-once storage.

SQLite in WAL mode with synchronous=FULL: a committed result survives a SIGKILL and a power cut. The outbox
has a cap: when full, the oldest summaries go first, then the oldest events, and every drop is counted
(`stats()`), so the agent reports drops instead of losing results silently.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cumulo.contracts.edge import now

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    summary INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_summary ON outbox (summary, seq);
CREATE TABLE IF NOT EXISTS answered (request_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""
KEEP_ANSWERED = 10_000  # request ids remembered (the service gives up on a request after a day)


@dataclass(frozen=True)
class Pending:
    """A stored result waiting for its acknowledgement: everything of the envelope but device id and auth."""

    seq: int
    kind: str
    time: datetime
    model: dict[str, Any] | None
    body: dict[str, Any]


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    next_seq: int
    dropped_summaries: int
    dropped_events: int

    @property
    def dropped(self) -> int:
        return self.dropped_summaries + self.dropped_events


class Outbox:
    def __init__(self, path: str | Path, max_items: int = 100_000) -> None:
        if max_items < 1:
            raise ValueError("an outbox holds at least one result")
        self.path = Path(path)
        self.max_items = max_items
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        if fresh:
            os.chmod(self.path, 0o600)  # results may say what a shop sells: for this device only
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            for key in ("next_seq", "dropped_summaries", "dropped_events"):
                self._db.execute(
                    "INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, 1 if key == "next_seq" else 0)
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def add(
        self, kind: str, body: dict[str, Any], model: dict[str, Any] | None = None, summary: bool = False
    ) -> int:
        """Store one result under the next seq (durably, before anyone sends it); returns that seq."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("next_seq")
                record = json.dumps({"time": now().isoformat(), "model": model, "body": body})
                self._db.execute("INSERT INTO outbox VALUES (?, ?, ?, ?)", (seq, kind, int(summary), record))
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
                self._enforce_cap()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return seq

    def answer(
        self, request_id: str, results: list[tuple[str, dict[str, Any]]], model: dict[str, Any] | None = None
    ) -> bool:
        """Store the answer to a request from the service (its results, in order) and remember the request id, in
        one transaction; False, storing nothing, when this id was answered before (a request sent again)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute("SELECT 1 FROM answered WHERE request_id = ?", (request_id,)).fetchone():
                    self._db.execute("ROLLBACK")
                    return False
                seq = self._meta("next_seq")
                for offset, (kind, body) in enumerate(results):
                    record = json.dumps({"time": now().isoformat(), "model": model, "body": body})
                    self._db.execute("INSERT INTO outbox VALUES (?, ?, 0, ?)", (seq + offset, kind, record))
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + len(results),))
                self._db.execute("INSERT INTO answered VALUES (?, ?)", (request_id, seq))
                self._db.execute(
                    "DELETE FROM answered WHERE seq < (SELECT min(seq) FROM "
                    "(SELECT seq FROM answered ORDER BY seq DESC LIMIT ?))",
                    (KEEP_ANSWERED,),
                )
                self._enforce_cap()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return True

    def _enforce_cap(self) -> None:
        """Drop the oldest summaries, then the oldest events, until the cap holds; count what went."""
        over = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]) - self.max_items
        for summary, counter in ((1, "dropped_summaries"), (0, "dropped_events")):
            if over <= 0:
                return
            gone = self._db.execute(
                "DELETE FROM outbox WHERE seq IN "
                "(SELECT seq FROM outbox WHERE summary = ? ORDER BY seq LIMIT ?)",
                (summary, over),
            ).rowcount
            self._db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (gone, counter))
            over -= gone

    def pending(self, after: int = 0, limit: int = 100) -> list[Pending]:
        """Stored results with seq > `after`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, record FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        out = []
        for seq, kind, record in rows:
            data = json.loads(record)
            out.append(Pending(seq, kind, datetime.fromisoformat(data["time"]), data["model"], data["body"]))
        return out

    def ack(self, *seqs: int) -> None:
        """The broker or the service has these: remove them for good."""
        if not seqs:
            return
        with self._lock:
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def stats(self) -> OutboxStats:
        with self._lock:
            pending = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])
            return OutboxStats(
                pending, self._meta("next_seq"), self._meta("dropped_summaries"), self._meta("dropped_events")
            )
