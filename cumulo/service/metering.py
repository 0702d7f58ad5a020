"""Settlement: turns a request's reservation into its final usage record and cost, in one transaction with the
quota counter, so the ledger and the quota can never disagree. Also keeps this gateway's side of a database
shared by several gateways, and settles the requests of gateways that died.

While a request streams, the completion tokens delivered to its client are checkpointed into its usage row
(`completion_tokens` of an 'in_progress' row) with the gateway's heartbeat, one transaction per period for all
its streams (`beat`). A gateway is dead when its process is gone (same host and pid namespace) or its heartbeat
is older than the stale limit; `settle_interrupted` settles its rows as 'interrupted' with the checkpointed
tokens billed. A row whose gateway never kept a heartbeat (an older version) is settled when its process is
gone or once older than `stale_after`.

No deadlock on PostgreSQL: settlement and recovery lock an existing usage row then its key row; admission locks
the key row and only inserts usage rows; checkpoints lock usage rows only, in id order.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection

from cumulo.service import sql
from cumulo.service.db import Database
from cumulo.service.limits import Admission, prices

log = logging.getLogger("cumulo.service")


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
    with db.begin() as conn:
        return _settle(conn, admission, outcome, time.time() if now is None else now)


def _settle(conn: Connection, admission: Admission, outcome: Outcome, now: float) -> bool:
    billed = outcome.prompt_tokens + outcome.completion_tokens
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


@dataclass(slots=True)
class Checkpoints:
    """Completion tokens delivered so far per in-progress usage row of this gateway (noted on every chunk sent,
    written by `beat` only when changed). Touched only on the event loop."""

    delivered: dict[int, int] = field(default_factory=dict)
    written: dict[int, int] = field(default_factory=dict)

    def note(self, usage_id: int, tokens: int) -> None:
        self.delivered[usage_id] = tokens

    def forget(self, usage_id: int) -> None:
        self.delivered.pop(usage_id, None)
        self.written.pop(usage_id, None)

    def due(self) -> dict[int, int]:
        return {u: n for u, n in self.delivered.items() if self.written.get(u) != n}

    def done(self, batch: dict[int, int]) -> None:
        for usage_id, tokens in batch.items():
            if usage_id in self.delivered:
                self.written[usage_id] = tokens


def beat(db: Database, gateway: str, checkpoints: dict[int, int]) -> bool:
    """One transaction: this gateway's heartbeat and its streams' delivered tokens. False when its heartbeat row
    was gone (first beat, or peers had found it dead and settled its rows): it is written again."""
    with db.begin() as conn:
        known = sql.HEARTBEAT.run(conn, {"gateway": gateway}).rowcount > 0
        if not known:
            sql.REGISTER.run(conn, {"gateway": gateway})
        batch = sorted(checkpoints.items())
        for start in range(0, len(batch), sql.CHECKPOINT_ROWS):
            part = batch[start : start + sql.CHECKPOINT_ROWS]
            params = {}
            for i, (usage_id, tokens) in enumerate(part):
                params[f"u{i}"], params[f"t{i}"] = usage_id, tokens
            sql.checkpoint(len(part)).run(conn, params)
    return known


def leave(db: Database, gateway: str) -> None:
    """A gateway stopping cleanly drops its heartbeat row, unless rows of it are still in progress."""
    with db.begin() as conn:
        sql.LEAVE.run(conn, {"gateway": gateway})


@functools.cache
def _place() -> str:
    """This host and pid namespace: where a gateway's pid means something (containers may share a hostname)."""
    host = socket.gethostname()
    try:
        return f"{host}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def gateway_id(started: float) -> str:
    return f"{_place()}:{os.getpid()}:{int(started)}"


def _dead_here(gateway: str) -> bool:
    """True only when the gateway ran where this process runs and its process is gone."""
    parts = gateway.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != _place() or not parts[1].isdigit() or int(parts[1]) == os.getpid():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def settle_interrupted(
    db: Database, stale_after: float, now: float | None = None, *, heartbeat_stale: float = 30.0
) -> int:
    """Settles the rows left 'in_progress' by dead gateways (kill -9, lost host) as 'interrupted': the prompt
    and the checkpointed completion tokens are billed, the rest of the reservation refunded. `now` stands for
    both clocks (tests). Also drops the heartbeat rows of dead gateways with nothing left in progress."""
    with db.begin() as conn:
        db_now = sql.DB_NOW.run(conn, {}).fetchone()[0] if now is None else now
        rows = [
            dict(zip(sql.IN_PROGRESS_COLUMNS, r, strict=True))
            for r in sql.IN_PROGRESS.run(conn, {}).fetchall()
        ]
    now = time.time() if now is None else now
    settled = 0
    gone: dict[str, bool] = {}  # gateway -> its process is known gone (asked once per gateway)
    for row in rows:
        if row["last_seen"] is not None:
            dead = row["last_seen"] < db_now - heartbeat_stale
        else:
            dead = row["started_at"] < now - stale_after
        if not dead:
            dead = gone.setdefault(row["gateway"], _dead_here(row["gateway"]))
        if dead:
            settled += _settle_lost(db, row["id"], now)
    with db.begin() as conn:
        sql.PRUNE.run(conn, {"stale": heartbeat_stale})
    return settled


def _settle_lost(db: Database, usage_id: int, now: float) -> bool:
    with db.begin() as conn:
        found = sql.LOCK_IN_PROGRESS.run(conn, {"usage_id": usage_id}).fetchone()
        if found is None:
            return False  # settled meanwhile, by its gateway or another's recovery
        row = dict(zip(sql.LOCK_IN_PROGRESS_COLUMNS, found, strict=True))
        model_prices = row["model_prices"]
        if isinstance(model_prices, str):
            model_prices = json.loads(model_prices)
        price_in, price_out = prices(row["price_in"], row["price_out"], model_prices, row["model"])
        admission = Admission(
            usage_id, row["key_id"], row["month"], row["billed_tokens"], 0, price_in, price_out
        )
        outcome = Outcome(
            "interrupted", row["prompt_tokens"], row["completion_tokens"], error_code="gateway_lost"
        )
        return _settle(conn, admission, outcome, now)
