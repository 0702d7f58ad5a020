"""The statements on every request's path (admission and settlement), run straight on the DBAPI cursor.

SQLAlchemy's expression building, cache-key hashing and result wrapping cost more CPU than the database work
itself on this path; plain SQL on the driver's cursor, inside the transaction SQLAlchemy began, costs almost
nothing. Written once with `:name` parameters (sqlite3's named style) and translated to psycopg's `%(name)s`.
The rest of the service uses ordinary SQLAlchemy. Valid on SQLite (>= 3.35, for RETURNING) and PostgreSQL.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from sqlalchemy.engine import Connection

_PARAM = re.compile(r"(?<![:\w]):(\w+)")
# `{now}` in a statement: the database's own clock in epoch seconds, so that gateways on different hosts
# write and compare heartbeats on one clock.
_NOW_SQLITE = "((julianday('now') - 2440587.5) * 86400.0)"
_NOW_POSTGRESQL = "extract(epoch from clock_timestamp())::float8"


class Statement:
    def __init__(self, text: str, pg_suffix: str = "") -> None:
        self.sqlite = text.replace("{now}", _NOW_SQLITE)
        self.postgresql = _PARAM.sub(r"%(\1)s", text).replace("{now}", _NOW_POSTGRESQL) + pg_suffix

    def run(self, conn: Connection, params: dict[str, Any]) -> Any:
        """Executes on the connection's DBAPI cursor; returns the cursor (fetchone, rowcount)."""
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(self._text(conn), params)
        return cursor

    def _text(self, conn: Connection) -> str:
        return self.postgresql if conn.dialect.name == "postgresql" else self.sqlite


KEY_AND_PLAN_COLUMNS = (
    "revoked_at",
    "expires_at",
    "quota_month",
    "month_tokens",
    "org_id",
    "name",
    "rpm",
    "tpm",
    "concurrency",
    "monthly_tokens",
    "price_in",
    "price_out",
    "model_prices",
)
LOCK_KEY_AND_PLAN = Statement(
    "SELECT k.revoked_at, k.expires_at, k.quota_month, k.month_tokens, k.org_id, p.name, p.rpm, p.tpm, "
    "p.concurrency, p.monthly_tokens, p.price_in, p.price_out, p.model_prices "
    "FROM api_keys k JOIN plans p ON p.id = k.plan_id WHERE k.id = :key_id",
    pg_suffix=" FOR UPDATE OF k",  # SQLite has no row locks: BEGIN IMMEDIATE already holds the database
)

IDEMPOTENT = Statement(
    "SELECT status, response FROM usage WHERE key_id = :key_id AND idempotency_key = :idem"
)

RUNNING = Statement(
    "SELECT count(*) FROM usage WHERE key_id = :key_id AND status = 'in_progress' AND started_at > :since"
)

WINDOW = Statement(
    "SELECT count(*), coalesce(sum(billed_tokens), 0), min(started_at) FROM usage "
    "WHERE key_id = :key_id AND started_at > :since AND status <> 'rejected'"
)

INSERT_USAGE = Statement(
    "INSERT INTO usage (request_id, key_id, org_id, idempotency_key, endpoint, model, seal, device, gateway, "
    "month, status, error_code, prompt_tokens, completion_tokens, cached_tokens, billed_tokens, cost_nanos, "
    'started_at, "user") VALUES (:request_id, :key_id, :org_id, :idempotency_key, :endpoint, :model, :seal, '
    ":device, :gateway, :month, :status, :error_code, :prompt_tokens, 0, 0, :billed_tokens, 0, :started_at, "
    ":user) RETURNING id"
)

SET_MONTH = Statement(
    "UPDATE api_keys SET quota_month = :month, month_tokens = :month_tokens WHERE id = :key_id"
)

SETTLE_USAGE = Statement(
    "UPDATE usage SET status = :status, error_code = :error_code, prompt_tokens = :prompt_tokens, "
    "completion_tokens = :completion_tokens, cached_tokens = :cached_tokens, billed_tokens = :billed_tokens, "
    "ttft = :ttft, finished_at = :now, total_time = :now - started_at, cost_nanos = :cost_nanos, "
    "response = :response WHERE id = :usage_id AND status = 'in_progress'"
)

REFUND = Statement(
    "UPDATE api_keys SET month_tokens = month_tokens + :delta WHERE id = :key_id AND quota_month = :month"
)

# Gateways sharing the database (metering): heartbeats, delivered-token checkpoints, recovery of dead ones.

HEARTBEAT = Statement("UPDATE gateways SET last_seen = {now} WHERE id = :gateway")

REGISTER = Statement("INSERT INTO gateways (id, started_at, last_seen) VALUES (:gateway, {now}, {now})")

# A gateway with rows still in progress keeps its heartbeat row, so that it goes stale and peers settle them.
LEAVE = Statement(
    "DELETE FROM gateways WHERE id = :gateway AND NOT EXISTS "
    "(SELECT 1 FROM usage WHERE usage.gateway = gateways.id AND usage.status = 'in_progress')"
)

PRUNE = Statement(
    "DELETE FROM gateways WHERE last_seen < {now} - :stale AND NOT EXISTS "
    "(SELECT 1 FROM usage WHERE usage.gateway = gateways.id AND usage.status = 'in_progress')"
)

CHECKPOINT_ROWS = 400  # rows per checkpoint statement (two parameters each; old SQLite allows 999)


@functools.cache
def checkpoint(rows: int) -> Statement:
    """One UPDATE for `rows` in-progress usage rows (:u0, :t0, ...: usage id, completion tokens delivered).
    VALUES names its columns column1, column2 on both databases."""
    values = ", ".join(f"(:u{i}, :t{i})" for i in range(rows))
    return Statement(
        f"UPDATE usage SET completion_tokens = v.column2 FROM (VALUES {values}) AS v "
        "WHERE usage.id = v.column1 AND usage.status = 'in_progress'"
    )


DB_NOW = Statement("SELECT {now}")

# The status literal (not a parameter) lets both databases use the partial index ix_usage_in_progress.
IN_PROGRESS_COLUMNS = ("id", "gateway", "started_at", "last_seen")
IN_PROGRESS = Statement(
    "SELECT u.id, u.gateway, u.started_at, g.last_seen FROM usage u LEFT JOIN gateways g ON g.id = u.gateway "
    "WHERE u.status = 'in_progress'"
)

# Recovery reads the checkpoint under the row's lock (usage row, then key row: settlement's order).
LOCK_IN_PROGRESS_COLUMNS = (
    "key_id",
    "month",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "billed_tokens",
    "price_in",
    "price_out",
    "model_prices",
)
LOCK_IN_PROGRESS = Statement(
    "SELECT u.key_id, u.month, u.model, u.prompt_tokens, u.completion_tokens, u.billed_tokens, p.price_in, "
    "p.price_out, p.model_prices FROM usage u JOIN api_keys k ON k.id = u.key_id JOIN plans p ON p.id = k.plan_id "
    "WHERE u.id = :usage_id AND u.status = 'in_progress'",
    pg_suffix=" FOR UPDATE OF u",
)
