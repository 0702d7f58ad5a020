"""GET /v1/usage: a key's own usage records, newest first, paginated, with totals over the filtered range."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from cumulo.service import crud
from cumulo.service.api import views
from cumulo.service.api.deps import After, Caller, EndTime, StartTime, State, only_query

router = APIRouter()


@router.get("/v1/usage", dependencies=[only_query("start_time", "end_time", "limit", "after")])
async def usage(
    state: State,
    principal: Caller,
    start_time: StartTime = None,
    end_time: EndTime = None,
    limit: int = Query(default=20, ge=1, le=100),
    after: After = None,
) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            rows, has_more, totals = crud.usage_page(
                session,
                key_id=principal.key_id,
                start_time=start_time,
                end_time=end_time,
                before_id=after,
                limit=limit,
            )
        data = [views.usage_row(r) for r in rows]
        return {
            "object": "list",
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "totals": views.totals(totals),
        }

    return await run_in_threadpool(read)
