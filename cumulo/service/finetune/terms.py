"""The fine-tuning terms of a subscription plan (`finetune_plans`): read with defaults, set with checks, shown.

A plan without a row has the defaults: priority 0, no cap on running jobs, no monthly training-token quota,
free training. `cumulo admin plan finetune` and `PATCH /admin/plans/{name}/fine_tuning` set them here.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cumulo.errors import InvalidRequest
from cumulo.service.api.schemas import INT32_MAX, INT64_MAX, MAX_PRICE
from cumulo.service.finetune.tables import FinetunePlan

FIELDS = ("priority", "max_jobs", "monthly_training_tokens", "price_training")
_UNSET: Any = object()


def of_plan(session: Session, plan_id: int) -> FinetunePlan:
    """The plan's terms; a detached row of defaults when it has none."""
    terms = session.get(FinetunePlan, plan_id)
    if terms is None:
        return FinetunePlan(
            plan_id=plan_id, priority=0, max_jobs=None, monthly_training_tokens=None, price_training=0.0
        )
    return terms


def all_plans(session: Session) -> dict[int, FinetunePlan]:
    """Every plan's stored terms by plan id (plans missing here have the defaults: `of_plan`)."""
    return {t.plan_id: t for t in session.scalars(select(FinetunePlan))}


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be a whole number, not {value!r}")
    if value < low:
        raise InvalidRequest(f"{name} must be {'1 or more' if low == 1 else 'positive or 0'}, not {value}")
    if value > high:
        raise InvalidRequest(f"{name} must be at most {high}, not {value}")
    return value


def set_terms(
    session: Session,
    plan_id: int,
    *,
    priority: int = _UNSET,
    max_jobs: int | None = _UNSET,
    monthly_training_tokens: int | None = _UNSET,
    price_training: float = _UNSET,
    labels: dict[str, str] | None = None,
) -> FinetunePlan:
    """Changes the terms given (a cap of None removes the cap), creating the plan's row when it has none; the
    terms not given keep their values. Each value is checked first: nothing changes when one is wrong. Errors
    name a term by `labels` (the command line's flags), else by its column."""
    label = {name: name for name in FIELDS} | (labels or {})
    changes: dict[str, Any] = {}
    if priority is not _UNSET:
        changes["priority"] = _whole(label["priority"], priority, 0, INT32_MAX)
    if max_jobs is not _UNSET:
        # 0 would queue the plan's jobs for ever; a plan that may not fine-tune gets a quota of 0 tokens instead.
        changes["max_jobs"] = None if max_jobs is None else _whole(label["max_jobs"], max_jobs, 1, INT32_MAX)
    if monthly_training_tokens is not _UNSET:
        changes["monthly_training_tokens"] = (
            None
            if monthly_training_tokens is None
            else _whole(label["monthly_training_tokens"], monthly_training_tokens, 0, INT64_MAX)
        )
    if price_training is not _UNSET:
        if isinstance(price_training, bool) or not isinstance(price_training, int | float):
            raise InvalidRequest(f"{label['price_training']} must be a number, not {price_training!r}")
        if not math.isfinite(price_training) or not 0 <= price_training <= MAX_PRICE:
            raise InvalidRequest(
                f"{label['price_training']} must be 0 to {MAX_PRICE:g} USD, not {price_training}"
            )
        changes["price_training"] = float(price_training)
    terms = session.get(FinetunePlan, plan_id)
    if terms is None:
        terms = of_plan(session, plan_id)
        session.add(terms)
    for name, value in changes.items():
        setattr(terms, name, value)
    session.flush()
    return terms


def view(terms: FinetunePlan) -> dict[str, Any]:
    return {name: getattr(terms, name) for name in FIELDS}
