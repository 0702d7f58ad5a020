"""/admin/...: plans, organisations, keys and usage across tenants. Needs an admin key."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from cumulo.errors import NotFound
from cumulo.service import auth, crud
from cumulo.service.api import views
from cumulo.service.api.deps import Admin, After, EndTime, StartTime, State, only_query
from cumulo.service.api.schemas import (
    INT32_MAX,
    KeyCreate,
    OrgName,
    PlanCreate,
    PlanFinetuneTerms,
    PlanName,
)
from cumulo.service.db import Organization
from cumulo.service.finetune import terms

router = APIRouter(prefix="/admin")
OrgFilter = Annotated[OrgName | None, Query(description="organisation name")]
PlanPath = Annotated[PlanName, Path(description="plan name")]


@router.get("/plans")
async def list_plans(state: State, _: Admin) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            stored = terms.all_plans(session)
            data = [
                views.plan(p, terms.view(stored.get(p.id) or terms.of_plan(session, p.id)))
                for p in crud.list_plans(session)
            ]
            return {"object": "list", "data": data}

    return await run_in_threadpool(read)


@router.post("/plans", status_code=201)
async def create_plan(body: PlanCreate, state: State, _: Admin) -> dict[str, Any]:
    def write() -> dict[str, Any]:
        with state.sessions() as session, session.begin():
            plan = crud.create_plan(session, **body.model_dump(exclude={"fine_tuning"}))
            if body.fine_tuning is None:
                return views.plan(plan, terms.view(terms.of_plan(session, plan.id)))
            row = terms.set_terms(session, plan.id, **body.fine_tuning.model_dump())
            return views.plan(plan, terms.view(row))

    return await run_in_threadpool(write)


@router.get("/plans/{name}/fine_tuning")
async def get_plan_fine_tuning(name: PlanPath, state: State, _: Admin) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            plan = crud.get_plan(session, name)
            return {"plan": plan.name, **terms.view(terms.of_plan(session, plan.id))}

    return await run_in_threadpool(read)


@router.patch("/plans/{name}/fine_tuning")
async def set_plan_fine_tuning(
    name: PlanPath, body: PlanFinetuneTerms, state: State, _: Admin
) -> dict[str, Any]:
    """Changes the fields given; a field left out keeps its value, a cap set to null is lifted."""

    def write() -> dict[str, Any]:
        with state.sessions() as session, session.begin():
            plan = crud.get_plan(session, name)
            row = terms.set_terms(session, plan.id, **body.model_dump(exclude_unset=True))
            return {"plan": plan.name, **terms.view(row)}

    return await run_in_threadpool(write)


@router.get("/orgs")
async def list_orgs(state: State, _: Admin) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            return {"object": "list", "data": [views.org(o) for o in crud.list_orgs(session)]}

    return await run_in_threadpool(read)


@router.get("/keys", dependencies=[only_query("org")])
async def list_keys(state: State, _: Admin, org: OrgFilter = None) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            return {"object": "list", "data": [views.key(*row) for row in crud.list_keys(session, org)]}

    return await run_in_threadpool(read)


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, state: State, _: Admin) -> dict[str, Any]:
    def write() -> dict[str, Any]:
        with state.sessions() as session, session.begin():
            row, secret = crud.create_key(
                session,
                state.hasher,
                org_name=body.org,
                plan_name=body.plan,
                name=body.name,
                user_email=body.user,
                expires_at=body.expires_at,
            )
            return {**views.key(row, body.org, body.plan), "key": secret}

    return await run_in_threadpool(write)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(
    key_id: Annotated[int, Path(ge=1, le=INT32_MAX)], state: State, _: Admin
) -> dict[str, Any]:
    # The same function as the console's revoke: it also drops the key from this gateway's principal cache.
    return await run_in_threadpool(auth.revoke_key, state.sessions, state.principals, key_id)


@router.get("/usage", dependencies=[only_query("org", "start_time", "end_time", "limit", "after")])
async def usage(
    state: State,
    _: Admin,
    org: OrgFilter = None,
    start_time: StartTime = None,
    end_time: EndTime = None,
    limit: int = Query(default=20, ge=1, le=1000),
    after: After = None,
) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            org_id = None
            if org is not None:
                org_id = session.scalar(select(Organization.id).where(Organization.name == org))
                if org_id is None:
                    raise NotFound(f"no organisation named {org!r}")
            rows, has_more, totals = crud.usage_page(
                session, org_id=org_id, start_time=start_time, end_time=end_time, before_id=after, limit=limit
            )
            return {
                "object": "list",
                "data": [views.usage_row(r) for r in rows],
                "has_more": has_more,
                "totals": views.totals(totals),
            }

    return await run_in_threadpool(read)
