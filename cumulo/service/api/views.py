"""JSON views of database rows for the usage and admin endpoints (one place, so both show the same fields)."""

from __future__ import annotations

from typing import Any

from cumulo.service.crud import UsageTotals
from cumulo.service.db import ApiKey, Organization, Plan, Usage


def usage_row(row: Usage) -> dict[str, Any]:
    return {
        "id": row.id,
        "request_id": row.request_id,
        "endpoint": row.endpoint,
        "model": row.model,
        "seal": row.seal,
        "device": row.device,
        "status": row.status,
        "error_code": row.error_code,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cached_tokens": row.cached_tokens,
        "cost": row.cost_nanos / 1e9,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "ttft": row.ttft,
        "total_time": row.total_time,
        "user": row.user,
        "key_id": row.key_id,
        "org_id": row.org_id,
    }


def totals(t: UsageTotals) -> dict[str, Any]:
    return {
        "requests": t.requests,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "cached_tokens": t.cached_tokens,
        "total_tokens": t.prompt_tokens + t.completion_tokens,
        "cost": t.cost_nanos / 1e9,
        "cost_nanos": t.cost_nanos,
    }


def plan(p: Plan, fine_tuning: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": p.id,
        "name": p.name,
        "rpm": p.rpm,
        "tpm": p.tpm,
        "concurrency": p.concurrency,
        "monthly_tokens": p.monthly_tokens,
        "models": p.models,
        "price_in": p.price_in,
        "price_out": p.price_out,
        "model_prices": p.model_prices,
        "explicit_label": p.explicit_label,
        "fine_tuning": fine_tuning,
        "created_at": p.created_at,
    }


def org(o: Organization) -> dict[str, Any]:
    return {"id": o.id, "name": o.name, "created_at": o.created_at}


def key(k: ApiKey, org_name: str, plan_name: str) -> dict[str, Any]:
    return {
        "id": k.id,
        "prefix": k.prefix,
        "name": k.name,
        "org": org_name,
        "plan": plan_name,
        "admin": k.is_admin,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
        "month": k.quota_month,
        "month_tokens": k.month_tokens,
    }
