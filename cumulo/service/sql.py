"""The statements on every request's path (admission and settlement), run straight on the DBAPI cursor.

SQLAlchemy's expression building, cache-key hashing and result wrapping cost more CPU than the database work
itself on this path; plain SQL on the driver's cursor, inside the transaction SQLAlchemy began, costs almost
nothing. Written once with `:name` parameters (sqlite3's named style) and translated to psycopg's `%(name)s`.
The rest of the service uses ordinary SQLAlchemy. Valid on SQLite (>= 3.35, for RETURNING) and PostgreSQL.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.engine import Connection

_PARAM = re.compile(r"(?<![:\w]):(\w+)")


class Statement:
    def __init__(self, text: str, pg_suffix: str = "") -> None:
        self.sqlite = text
        self.postgresql = _PARAM.sub(r"%(\1)s", text) + pg_suffix

    def run(self, conn: Connection, params: dict[str, Any]) -> Any:
        """Executes on the connection's DBAPI cursor; returns the cursor (fetchone, rowcount)."""
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(self.postgresql if conn.dialect.name == "postgresql" else self.sqlite, params)
        return cursor


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
