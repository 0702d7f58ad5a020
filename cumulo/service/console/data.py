"""/console/api/...: what the console shows that the API lacks, always scoped to the caller's organisation:
usage per day and per model with the plan's quotas, the request log with filters, and self-service keys.

Another organisation's key or request answers 404, exactly as one that does not exist.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy import case, func, literal, literal_column, select
from starlette.concurrency import run_in_threadpool

from cumulo.service import auth, crud
from cumulo.service.api import views
from cumulo.service.api.deps import After, Caller, EndTime, StartTime, State, only_query
from cumulo.service.api.schemas import INT32_MAX, KeyName
from cumulo.service.auth import Principal
from cumulo.service.db import ApiKey, Plan, Usage
from cumulo.service.limits import month_of

router = APIRouter(prefix="/console/api")
DAY = 86400.0
STATUSES = ("in_progress", "completed", "aborted", "error", "interrupted", "rejected")


def now() -> float:
    return time.time()


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


@router.get("/usage", dependencies=[only_query("days")])
async def usage(state: State, caller: Caller, days: int = Query(default=14, ge=1, le=90)) -> dict[str, Any]:
    """Tokens, requests and cost of the caller's organisation per UTC day and per model over the last `days`
    days (today included), and the caller's plan with what is left of its monthly tokens."""
    today = datetime.fromtimestamp(now(), UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since = today.timestamp() - (days - 1) * DAY
    labels = [day_of(since + i * DAY) for i in range(days)]

    # The day of each row as a CASE over the day boundaries: exact and the same in SQLite and PostgreSQL,
    # so the database sums and only days x models rows come back.
    bounds = [(Usage.started_at < since + (i + 1) * DAY, i) for i in range(days - 1)]
    day = case(*bounds, else_=days - 1) if bounds else literal(0)
    query = (
        select(
            day.label("day"),
            Usage.model,
            func.count(Usage.id),
            func.sum(Usage.prompt_tokens + Usage.completion_tokens),
            func.sum(Usage.cost_nanos),
        )
        .where(Usage.org_id == caller.org_id, Usage.started_at >= since, Usage.status != "rejected")
        .group_by(literal_column("day"), Usage.model)
    )

    def read() -> dict[str, Any]:
        with state.sessions() as session:
            rows = session.execute(query).all()
            quota = _quota(session, caller)
        per_day = [{"day": d, "requests": 0, "tokens": 0, "cost": 0.0} for d in labels]
        per_model: dict[str, dict[str, Any]] = {}
        tokens_by_model: dict[str, list[int]] = defaultdict(lambda: [0] * days)
        for index, model, requests, tokens, nanos in rows:
            for bucket in (
                per_day[index],
                per_model.setdefault(model, {"model": model, "requests": 0, "tokens": 0, "cost": 0.0}),
            ):
                bucket["requests"] += requests
                bucket["tokens"] += int(tokens)
                bucket["cost"] += int(nanos) / 1e9
            tokens_by_model[model][index] += int(tokens)
        return {
            "days": per_day,
            "models": sorted(per_model.values(), key=lambda m: -m["tokens"]),
            "tokens_by_model": dict(sorted(tokens_by_model.items())),
            "quota": quota,
        }

    return await run_in_threadpool(read)


def _quota(session: Any, caller: Principal) -> dict[str, Any]:
    key, plan = (
        session.get(ApiKey, caller.key_id),
        session.scalar(select(Plan).where(Plan.name == caller.plan.name)),
    )
    month = month_of(now())
    used = key.month_tokens if key is not None and key.quota_month == month else 0
    limit = plan.monthly_tokens if plan is not None else None
    return {
        "plan": caller.plan.name,
        "month": month,
        "rpm": plan.rpm if plan else None,
        "tpm": plan.tpm if plan else None,
        "concurrency": plan.concurrency if plan else None,
        "monthly_tokens": limit,
        "month_tokens_used": used,
        "month_tokens_left": None if limit is None else max(0, limit - used),
    }


@router.get(
    "/requests",
    dependencies=[only_query("status", "model", "key_id", "start_time", "end_time", "limit", "after")],
)
async def requests(
    state: State,
    caller: Caller,
    status: Annotated[str | None, Query(max_length=32, pattern="^(" + "|".join(STATUSES) + ")$")] = None,
    model: Annotated[str | None, Query(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")] = None,
    key_id: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
    start_time: StartTime = None,
    end_time: EndTime = None,
    limit: int = Query(default=50, ge=1, le=1000),
    after: After = None,
) -> dict[str, Any]:
    """The organisation's request log, newest first: status, timings, seal and the label id of each."""

    def read() -> dict[str, Any]:
        conditions = [Usage.org_id == caller.org_id]
        if status is not None:
            conditions.append(Usage.status == status)
        if model is not None:
            conditions.append(Usage.model == model)
        if key_id is not None:
            conditions.append(Usage.key_id == key_id)
        if start_time is not None:
            conditions.append(Usage.started_at >= start_time)
        if end_time is not None:
            conditions.append(Usage.started_at < end_time)
        if after is not None:
            conditions.append(Usage.id < after)
        with state.sessions() as session:
            rows = list(
                session.scalars(select(Usage).where(*conditions).order_by(Usage.id.desc()).limit(limit + 1))
            )
        data = [_request_row(r) for r in rows[:limit]]
        return {"object": "list", "data": data, "has_more": len(rows) > limit}

    return await run_in_threadpool(read)


def _request_row(row: Usage) -> dict[str, Any]:
    out = views.usage_row(row)
    # The label of choice 0 carries this content id (api/generation.py); POST /v1/labels/verify checks it.
    out["label_id"] = f"{row.request_id}-0" if row.status == "completed" else None
    return out


class KeyCreate(BaseModel):
    name: KeyName = ""
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


@router.get("/keys")
async def list_keys(state: State, caller: Caller) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            rows = crud.list_keys(session, caller.org_name)
        return {
            "object": "list",
            "data": [{**views.key(*row), "current": row[0].id == caller.key_id} for row in rows],
        }

    return await run_in_threadpool(read)


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, state: State, caller: Caller) -> dict[str, Any]:
    """A key of the caller's organisation on the caller's plan, never an admin key; its secret is in this
    answer only."""

    def write() -> dict[str, Any]:
        expires = None if body.expires_in_days is None else now() + body.expires_in_days * DAY
        with state.sessions() as session, session.begin():
            row, secret = crud.create_key(
                session,
                state.hasher,
                org_name=caller.org_name,
                plan_name=caller.plan.name,
                name=body.name,
                expires_at=expires,
            )
            return {**views.key(row, caller.org_name, caller.plan.name), "key": secret}

    return await run_in_threadpool(write)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(
    key_id: Annotated[int, Path(ge=1, le=INT32_MAX)], state: State, caller: Caller
) -> dict[str, Any]:
    return await run_in_threadpool(auth.revoke_key, state.sessions, state.principals, key_id, caller.org_id)
