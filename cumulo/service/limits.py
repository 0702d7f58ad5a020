"""Admission: decides, exactly and across every gateway sharing the database, whether a request may start.

All admissions of one key serialize on that key's row (SELECT ... FOR UPDATE on PostgreSQL; BEGIN IMMEDIATE on
SQLite), so counting and reserving happen atomically. Requests per minute and tokens per minute are sliding
60-second windows over the usage rows themselves; concurrency counts this key's 'in_progress' rows; the monthly
quota is a counter on the key row. A request reserves prompt + max_tokens; settlement refunds the unused part.
When a token limit leaves room for fewer tokens than asked, `max_tokens` is cut to fit instead of refusing.
A handful of fixed statements per admission (see `sql`): this is on every request's path.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace

from sqlalchemy.engine import Connection

from cumulo.errors import AuthenticationError, Conflict, CumuloError, QuotaExceeded, RateLimited
from cumulo.service import sql
from cumulo.service.db import Database

WINDOW = 60.0


def month_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


@dataclass(slots=True)
class RequestSpec:
    request_id: str
    endpoint: str
    model: str
    seal: str
    device: str
    gateway: str
    prompt_tokens: int  # billed once even when n > 1
    num_seqs: int  # sequences that each generate up to max_tokens
    max_tokens: int
    idempotency_key: str | None = None
    user: str | None = None


@dataclass(slots=True)
class Admission:
    usage_id: int
    key_id: int
    month: str
    reserved: int  # tokens counted against the limits until settlement
    max_tokens: int  # possibly cut to fit the remaining token allowance
    price_in: float  # USD per million tokens, as the plan said at admission
    price_out: float


@dataclass(slots=True)
class Replay:
    response: str  # the stored JSON response of the first attempt


def admit(
    db: Database, key_id: int, spec: RequestSpec, *, stale_after: float = 900.0, now: float | None = None
) -> Admission | Replay:
    now = time.time() if now is None else now
    month = month_of(now)
    refusal: CumuloError | None = None
    # A bare connection and fixed SQL on the driver's cursor (see `sql`): this runs on every request.
    with db.begin() as conn:
        found = sql.LOCK_KEY_AND_PLAN.run(conn, {"key_id": key_id}).fetchone()
        key = SimpleNamespace(**dict(zip(sql.KEY_AND_PLAN_COLUMNS, found, strict=True)))
        # Authentication may come from a short cache; revocation and expiry are exact here, under the lock.
        if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
            raise AuthenticationError("this API key has been revoked or has expired")
        if spec.idempotency_key is not None:
            earlier = sql.IDEMPOTENT.run(conn, {"key_id": key_id, "idem": spec.idempotency_key}).fetchone()
            if earlier is not None:
                status, response = earlier
                if response is not None:
                    return Replay(response)
                raise Conflict(
                    f"a request with this Idempotency-Key is {status.replace('_', ' ')}; "
                    "it is not run (or billed) twice"
                )
        month_tokens = key.month_tokens if key.quota_month == month else 0
        model_prices = json.loads(key.model_prices) if isinstance(key.model_prices, str) else key.model_prices
        price_in, price_out = prices(key.price_in, key.price_out, model_prices, spec.model)
        row = {
            "request_id": spec.request_id,
            "key_id": key_id,
            "org_id": key.org_id,
            "endpoint": spec.endpoint,
            "model": spec.model,
            "seal": spec.seal,
            "device": spec.device,
            "gateway": spec.gateway,
            "month": month,
            "started_at": now,
            "user": spec.user,
        }
        try:
            max_tokens = _check(conn, key_id, key, month_tokens, spec, now, stale_after)
        except CumuloError as exc:
            # The rejected row is the record that this request was seen; it commits, then we refuse.
            sql.INSERT_USAGE.run(
                conn,
                {
                    **row,
                    "status": "rejected",
                    "error_code": exc.code,
                    "prompt_tokens": 0,
                    "billed_tokens": 0,
                    "idempotency_key": None,
                },
            )
            refusal = exc
        else:
            reserved = spec.prompt_tokens + max_tokens * spec.num_seqs
            usage_id = sql.INSERT_USAGE.run(
                conn,
                {
                    **row,
                    "status": "in_progress",
                    "error_code": None,
                    "prompt_tokens": spec.prompt_tokens,
                    "billed_tokens": reserved,
                    "idempotency_key": spec.idempotency_key,
                },
            ).fetchone()[0]
            sql.SET_MONTH.run(
                conn, {"month": month, "month_tokens": month_tokens + reserved, "key_id": key_id}
            )
    if refusal is not None:
        raise refusal
    return Admission(usage_id, key_id, month, reserved, max_tokens, price_in, price_out)


def prices(price_in: float, price_out: float, model_prices: dict | None, model: str) -> tuple[float, float]:
    """USD per million input and output tokens; a per-model price overrides the plan's default."""
    if model_prices and model in model_prices:
        override_in, override_out = model_prices[model]
        return float(override_in), float(override_out)
    return float(price_in), float(price_out)


def _check(
    conn: Connection,
    key_id: int,
    plan: SimpleNamespace,
    month_tokens: int,
    spec: RequestSpec,
    now: float,
    stale_after: float,
) -> int:
    """Raises when a limit refuses; returns max_tokens, cut to the token allowance left."""
    if plan.concurrency is not None:
        running = sql.RUNNING.run(conn, {"key_id": key_id, "since": now - stale_after}).fetchone()[0]
        if running >= plan.concurrency:
            raise RateLimited(
                f"too many concurrent requests: plan {plan.name!r} allows {plan.concurrency}", 1.0
            )
    oldest = None
    allowance = math.inf
    tpm_binding = False
    if plan.rpm is not None or plan.tpm is not None:
        count, used, oldest = sql.WINDOW.run(conn, {"key_id": key_id, "since": now - WINDOW}).fetchone()
        if plan.rpm is not None and count >= plan.rpm:
            raise RateLimited(
                f"rate limit reached: plan {plan.name!r} allows {plan.rpm} requests per minute",
                _retry_after(oldest, now),
            )
        if plan.tpm is not None:
            allowance, tpm_binding = plan.tpm - int(used), True
    if plan.monthly_tokens is not None and plan.monthly_tokens - month_tokens < allowance:
        allowance, tpm_binding = plan.monthly_tokens - month_tokens, False
    if allowance == math.inf:
        return spec.max_tokens
    fits = int(allowance - spec.prompt_tokens) // spec.num_seqs
    if fits < 1:
        if tpm_binding:
            raise RateLimited(
                f"token rate limit reached: plan {plan.name!r} allows {plan.tpm} tokens per minute "
                f"and this request needs at least {spec.prompt_tokens + spec.num_seqs}",
                _retry_after(oldest, now),
            )
        raise QuotaExceeded(
            f"monthly token quota of plan {plan.name!r} is exhausted "
            f"({month_tokens} of {plan.monthly_tokens} tokens used this month)"
        )
    return min(spec.max_tokens, fits)


def _retry_after(oldest: float | None, now: float) -> float:
    if oldest is None:
        return 1.0
    return max(1.0, math.ceil(oldest + WINDOW - now))
