"""Settlement: turns a request's reservation into its final usage record and cost, in one transaction with the
quota counter, so the ledger and the quota can never disagree. Also settles requests of dead gateways.

No deadlock on PostgreSQL: settlement locks an existing usage row then its key row; admission locks the key row
and only inserts usage rows, so no two transactions ever wait on each other in a cycle.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from sqlalchemy import select

from cumulo.service import sql
from cumulo.service.db import ApiKey, Database, Plan, Usage
from cumulo.service.limits import Admission, prices

_keys, _plans, _usage = ApiKey.__table__, Plan.__table__, Usage.__table__


@dataclass(slots=True)
class Outcome:
    status: str  # completed | aborted | error | interrupted
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    ttft: float | None = None
    error_code: str | None = None
    response: str | None = None  # JSON kept for Idempotency-Key replays


def cost_nanos(price_in: float, price_out: float, prompt_tokens: int, completion_tokens: int) -> int:
    # tokens * (USD per 1e6 tokens) * 1e9 nano-USD per USD / 1e6 = tokens * price * 1e3
    return round(prompt_tokens * price_in * 1000 + completion_tokens * price_out * 1000)


def settle(db: Database, admission: Admission, outcome: Outcome, now: float | None = None) -> bool:
    """Writes the final record and refunds the unused reservation; False if it was settled already."""
    now = time.time() if now is None else now
    billed = outcome.prompt_tokens + outcome.completion_tokens
    with db.begin() as conn:
        # The usage row first: only the transaction that moves it out of 'in_progress' touches the counter.
        moved = sql.SETTLE_USAGE.run(
            conn,
            {
                "status": outcome.status,
                "error_code": outcome.error_code,
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
                "cached_tokens": outcome.cached_tokens,
                "billed_tokens": billed,
                "ttft": outcome.ttft,
                "now": now,
                "response": outcome.response,
                "cost_nanos": cost_nanos(
                    admission.price_in, admission.price_out, outcome.prompt_tokens, outcome.completion_tokens
                ),
                "usage_id": admission.usage_id,
            },
        ).rowcount
        if moved == 0:
            return False  # settled already (e.g. by recovery): never bill twice
        sql.REFUND.run(
            conn, {"delta": billed - admission.reserved, "key_id": admission.key_id, "month": admission.month}
        )
    return True


def gateway_id(started: float) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{int(started)}"


def _dead_here(gateway: str) -> bool:
    host, _, rest = gateway.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def settle_interrupted(db: Database, stale_after: float, now: float | None = None) -> int:
    """Requests left 'in_progress' by a gateway that died (kill -9, power loss): on this host when its process
    is gone, anywhere when older than `stale_after`. They pay their prompt only; what was generated is unknown."""
    now = time.time() if now is None else now
    with db.connect() as conn:
        rows = conn.execute(
            select(
                _usage.c.id,
                _usage.c.key_id,
                _usage.c.month,
                _usage.c.billed_tokens,
                _usage.c.prompt_tokens,
                _usage.c.model,
                _usage.c.gateway,
                _usage.c.started_at,
                _plans.c.price_in,
                _plans.c.price_out,
                _plans.c.model_prices,
            )
            .join(_keys, _keys.c.id == _usage.c.key_id)
            .join(_plans, _plans.c.id == _keys.c.plan_id)
            .where(_usage.c.status == "in_progress")
        ).all()
    settled = 0
    for row in rows:
        if row.started_at >= now - stale_after and not _dead_here(row.gateway):
            continue
        price_in, price_out = prices(row.price_in, row.price_out, row.model_prices, row.model)
        admission = Admission(row.id, row.key_id, row.month, row.billed_tokens, 0, price_in, price_out)
        outcome = Outcome("interrupted", row.prompt_tokens, 0, error_code="gateway_lost")
        settled += settle(db, admission, outcome, now)
    return settled
