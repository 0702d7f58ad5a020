"""Plain reads and writes of plans, organisations, users, keys and usage; each function takes a Session.

Limit checks and quota settlement are not here: they live in `limits` and `metering` because they need locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cumulo.errors import Conflict, InvalidRequest, NotFound
from cumulo.service.db import ApiKey, Organization, Plan, Usage, User
from cumulo.service.security import KeyHasher, display_prefix, new_key

ADMIN_ORG = "admin"


# -- plans ---------------------------------------------------------------------------------------------------
def create_plan(
    session: Session,
    name: str,
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    concurrency: int | None = None,
    monthly_tokens: int | None = None,
    models: list[str] | None = None,
    price_in: float = 0.0,
    price_out: float = 0.0,
    model_prices: dict[str, list[float]] | None = None,
    explicit_label: bool = False,
) -> Plan:
    for label, value in (
        ("rpm", rpm),
        ("tpm", tpm),
        ("concurrency", concurrency),
        ("monthly_tokens", monthly_tokens),
    ):
        if value is not None and value < 0:
            raise InvalidRequest(f"{label} must not be negative")
    if price_in < 0 or price_out < 0:
        raise InvalidRequest("prices must not be negative")
    if session.scalar(select(Plan).where(Plan.name == name)) is not None:
        raise Conflict(f"plan {name!r} already exists")
    plan = Plan(
        name=name,
        rpm=rpm,
        tpm=tpm,
        concurrency=concurrency,
        monthly_tokens=monthly_tokens,
        models=models,
        price_in=price_in,
        price_out=price_out,
        model_prices=model_prices,
        explicit_label=explicit_label,
        created_at=time.time(),
    )
    session.add(plan)
    session.flush()
    return plan


def get_plan(session: Session, name: str) -> Plan:
    plan = session.scalar(select(Plan).where(Plan.name == name))
    if plan is None:
        raise NotFound(f"no plan named {name!r}")
    return plan


def list_plans(session: Session) -> list[Plan]:
    return list(session.scalars(select(Plan).order_by(Plan.id)))


# -- organisations and users ---------------------------------------------------------------------------------
def get_or_create_org(session: Session, name: str) -> Organization:
    if not name or len(name) > 128:
        raise InvalidRequest("organisation name must be 1 to 128 characters")
    org = session.scalar(select(Organization).where(Organization.name == name))
    if org is None:
        org = Organization(name=name, created_at=time.time())
        session.add(org)
        session.flush()
    return org


def list_orgs(session: Session) -> list[Organization]:
    return list(session.scalars(select(Organization).order_by(Organization.id)))


def get_or_create_user(session: Session, org: Organization, email: str) -> User:
    user = session.scalar(select(User).where(User.email == email))
    if user is None:
        user = User(org_id=org.id, email=email, created_at=time.time())
        session.add(user)
        session.flush()
    elif user.org_id != org.id:
        raise Conflict(f"user {email!r} belongs to another organisation")
    return user


# -- keys ----------------------------------------------------------------------------------------------------
def create_key(
    session: Session,
    hasher: KeyHasher,
    *,
    org_name: str,
    plan_name: str = "default",
    name: str = "",
    user_email: str | None = None,
    expires_at: float | None = None,
    is_admin: bool = False,
) -> tuple[ApiKey, str]:
    """Returns the row and the secret; the secret exists only in this return value."""
    org = get_or_create_org(session, org_name)
    plan = get_plan(session, plan_name)
    user = get_or_create_user(session, org, user_email) if user_email else None
    secret = new_key()
    row = ApiKey(
        org_id=org.id,
        plan_id=plan.id,
        user_id=user.id if user else None,
        name=name,
        prefix=display_prefix(secret),
        key_hash=hasher.hash(secret),
        is_admin=is_admin,
        created_at=time.time(),
        expires_at=expires_at,
        quota_month="",
        month_tokens=0,
    )
    session.add(row)
    session.flush()
    return row, secret


def list_keys(session: Session, org_name: str | None = None) -> list[tuple[ApiKey, str, str]]:
    """(key, organisation name, plan name) rows."""
    query = (
        select(ApiKey, Organization.name, Plan.name)
        .join(Organization, Organization.id == ApiKey.org_id)
        .join(Plan, Plan.id == ApiKey.plan_id)
        .order_by(ApiKey.id)
    )
    if org_name:
        query = query.where(Organization.name == org_name)
    return [(k, o, p) for k, o, p in session.execute(query)]


def revoke_key(session: Session, key_id: int) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no key with id {key_id}")
    if key.revoked_at is None:
        key.revoked_at = time.time()
    return key


def has_admin_key(session: Session) -> bool:
    now = time.time()
    query = select(ApiKey.id).where(
        ApiKey.is_admin.is_(True),
        ApiKey.revoked_at.is_(None),
        (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now),
    )
    return session.scalar(query.limit(1)) is not None


# -- usage ---------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class UsageTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_nanos: int


def usage_page(
    session: Session,
    *,
    key_id: int | None = None,
    org_id: int | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
    before_id: int | None = None,
    limit: int = 20,
) -> tuple[list[Usage], bool, UsageTotals]:
    """Newest first; `before_id` is the cursor (the last id of the previous page). Totals cover the whole
    filtered range, not just the page."""
    conditions = []
    if key_id is not None:
        conditions.append(Usage.key_id == key_id)
    if org_id is not None:
        conditions.append(Usage.org_id == org_id)
    if start_time is not None:
        conditions.append(Usage.started_at >= start_time)
    if end_time is not None:
        conditions.append(Usage.started_at < end_time)
    page_query = select(Usage).where(*conditions)
    if before_id is not None:
        page_query = page_query.where(Usage.id < before_id)
    rows = list(session.scalars(page_query.order_by(Usage.id.desc()).limit(limit + 1)))
    totals_row = session.execute(
        select(
            func.count(Usage.id),
            func.coalesce(func.sum(Usage.prompt_tokens), 0),
            func.coalesce(func.sum(Usage.completion_tokens), 0),
            func.coalesce(func.sum(Usage.cached_tokens), 0),
            func.coalesce(func.sum(Usage.cost_nanos), 0),
        ).where(*conditions, Usage.status != "rejected")
    ).one()
    totals = UsageTotals(*(int(v) for v in totals_row))
    return rows[:limit], len(rows) > limit, totals
