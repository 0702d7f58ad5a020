"""The routes an organisation calls about its edge fleet, with its API key: devices (enrol, list, revoke),
results (query, live stream), rollouts and metered usage. Another organisation's device or rollout is a 404,
exactly like one that does not exist, so ids reveal nothing."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from cumulo.contracts.edge import DEVICE_ID_PATTERN, KIND_PATTERN, DesiredModel
from cumulo.service.api.deps import After, Caller, only_query
from cumulo.service.api.routes.edge_devices import fleet_of
from cumulo.service.api.schemas import LATEST_TIME
from cumulo.service.api.sse import EventStream, sse
from cumulo.service.edge import devices, results, rollouts

router = APIRouter(prefix="/v1/edge")
DeviceId = Annotated[str, Path(max_length=64, pattern=DEVICE_ID_PATTERN)]
DeviceFilter = Annotated[str | None, Query(max_length=64, pattern=DEVICE_ID_PATTERN)]
KindFilter = Annotated[str | None, Query(max_length=32, pattern=KIND_PATTERN)]
Time = Annotated[float | None, Query(ge=0, le=LATEST_TIME, description="Unix seconds")]


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str | None = Field(default=None, max_length=64, pattern=DEVICE_ID_PATTERN)
    name: str = Field(default="", max_length=128)
    device_class: str | None = Field(default=None, max_length=64, pattern=devices.DEVICE_CLASS_PATTERN)


class RolloutCreate(DesiredModel):
    canary_share: float = Field(default=0.1, gt=0, le=1)
    window_seconds: float = Field(default=300.0, gt=0, le=30 * 86400)
    silence_seconds: float = Field(default=120.0, gt=0, le=30 * 86400)


@router.post("/devices", status_code=201)
async def create_device(body: DeviceCreate, request: Request, principal: Caller) -> dict[str, Any]:
    fleet = fleet_of(request)

    def write() -> dict[str, Any]:
        now = fleet.clock()
        with fleet.sessions() as session, session.begin():
            device, token = devices.create(
                session,
                fleet.hasher,
                principal.org_id,
                body.device_id,
                body.name,
                now,
                fleet.token_ttl,
                body.device_class,
            )
            return {
                **devices.view(device, now, fleet.online_seconds),
                "enrollment_token": token,
                "token_expires_at": device.token_expires_at,
            }

    return await run_in_threadpool(write)


@router.get("/devices")
async def list_devices(request: Request, principal: Caller) -> dict[str, Any]:
    fleet = fleet_of(request)

    def read() -> dict[str, Any]:
        now = fleet.clock()
        with fleet.sessions() as session:
            found = devices.list_for(session, principal.org_id)
            return {"object": "list", "data": [devices.view(d, now, fleet.online_seconds) for d in found]}

    return await run_in_threadpool(read)


@router.get("/devices/{device_id}")
async def get_device(device_id: DeviceId, request: Request, principal: Caller) -> dict[str, Any]:
    fleet = fleet_of(request)

    def read() -> dict[str, Any]:
        with fleet.sessions() as session:
            device = devices.get(session, principal.org_id, device_id)
            return devices.view(device, fleet.clock(), fleet.online_seconds)

    return await run_in_threadpool(read)


@router.post("/devices/{device_id}/revoke")
async def revoke_device(device_id: DeviceId, request: Request, principal: Caller) -> dict[str, Any]:
    fleet = fleet_of(request)

    def write() -> dict[str, Any]:
        now = fleet.clock()
        with fleet.sessions() as session, session.begin():
            device = devices.get(session, principal.org_id, device_id)
            devices.revoke(device, now)
            return devices.view(device, now, fleet.online_seconds)

    return await run_in_threadpool(write)


@router.post("/devices/{device_id}/token")
async def reissue_token(device_id: DeviceId, request: Request, principal: Caller) -> dict[str, Any]:
    """A new one-time token for a device (a replaced or reset camera); its old credential stops working."""
    fleet = fleet_of(request)

    def write() -> dict[str, Any]:
        now = fleet.clock()
        with fleet.sessions() as session, session.begin():
            device = devices.get(session, principal.org_id, device_id)
            token = devices.reissue_token(device, fleet.hasher, now, fleet.token_ttl)
            return {
                "device_id": device.device_id,
                "enrollment_token": token,
                "token_expires_at": device.token_expires_at,
            }

    return await run_in_threadpool(write)


@router.get("/results", dependencies=[only_query("device", "kind", "since", "until", "after", "limit")])
async def list_results(
    request: Request,
    principal: Caller,
    device: DeviceFilter = None,
    kind: KindFilter = None,
    since: Time = None,
    until: Time = None,
    after: After = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> dict[str, Any]:
    """Results by device time (`since` inclusive, `until` exclusive), oldest first, `after` the last id seen."""
    fleet = fleet_of(request)

    def read() -> dict[str, Any]:
        with fleet.sessions() as session:
            device_pk = devices.get(session, principal.org_id, device).id if device else None
            rows = results.query(
                session,
                principal.org_id,
                device=device_pk,
                kind=kind,
                since=since,
                until=until,
                after=after,
                limit=limit + 1,
            )
        data = [results.view(row, name) for row, name in rows[:limit]]
        return {
            "object": "list",
            "data": data,
            "has_more": len(rows) > limit,
            "last_id": data[-1]["id"] if data else None,
        }

    return await run_in_threadpool(read)


# Left out of the OpenAPI schema: the stream never ends by itself, so a schema-driven client (the fuzz test
# walks every operation in the schema) would wait on it forever. Its parameters are checked as any route's.
@router.get("/results/stream", dependencies=[only_query("device", "kind")], include_in_schema=False)
async def stream_results(
    request: Request, principal: Caller, device: DeviceFilter = None, kind: KindFilter = None
) -> EventStream:
    """Server-sent events, one per result stored from now on; a subscriber too slow to keep up is told how many
    it lost (`{"object": "edge.lost", "count": n}`) and can read them from GET /v1/edge/results."""
    fleet = fleet_of(request)
    if device is not None:

        def check() -> None:
            with fleet.sessions() as session:
                devices.get(session, principal.org_id, device)

        await run_in_threadpool(check)
    subscriber = fleet.subscribers.add(principal.org_id, device, kind)

    async def events() -> Any:
        try:
            yield b": subscribed\n\n"
            while True:
                try:
                    item = await asyncio.wait_for(subscriber.queue.get(), timeout=15.0)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if subscriber.lost:
                    yield sse({"object": "edge.lost", "count": subscriber.lost})
                    subscriber.lost = 0
                yield sse(item)
        finally:
            fleet.subscribers.remove(subscriber)

    return EventStream(events(), media_type="text/event-stream")


@router.post("/rollouts", status_code=201)
async def create_rollout(body: RolloutCreate, request: Request, principal: Caller) -> dict[str, Any]:
    fleet = fleet_of(request)
    model = DesiredModel(name=body.name, version=body.version, sha256=body.sha256, url=body.url)
    # `app.state.edge_fit_check(model, device_class)`, installed by `cumulo serve` from the command line layer
    # (the service may not import the chip catalog): raises a one-line InvalidRequest when the package does not
    # fit a class of device the rollout targets. Without it (tests, embedded use) nothing is checked.
    fit_check = getattr(request.app.state, "edge_fit_check", None)

    def check_fit() -> None:
        with fleet.sessions() as session:
            classes = {d.device_class for d in devices.targets(session, principal.org_id) if d.device_class}
        for device_class in sorted(classes):
            fit_check(model, device_class)

    def write() -> dict[str, Any]:
        with fleet.sessions() as session, session.begin():
            rollout = rollouts.start(
                session,
                principal.org_id,
                model,
                fleet.clock(),
                canary_share=body.canary_share,
                window_seconds=body.window_seconds,
                silence_seconds=body.silence_seconds,
            )
            return rollouts.view(session, rollout)

    if fit_check is not None:
        await run_in_threadpool(check_fit)  # downloads and measures the package: before any row is written
    answer = await run_in_threadpool(write)
    await run_in_threadpool(fleet.publish_pending)
    return answer


@router.get("/rollouts")
async def list_rollouts(request: Request, principal: Caller) -> dict[str, Any]:
    fleet = fleet_of(request)

    def read() -> dict[str, Any]:
        with fleet.sessions() as session:
            found = rollouts.list_for(session, principal.org_id)
            return {"object": "list", "data": [rollouts.view(session, r) for r in found]}

    return await run_in_threadpool(read)


@router.get("/rollouts/{rollout_id}")
async def get_rollout(
    rollout_id: Annotated[int, Path(ge=1, le=2**31 - 1)], request: Request, principal: Caller
) -> dict[str, Any]:
    fleet = fleet_of(request)

    def read() -> dict[str, Any]:
        with fleet.sessions() as session:
            return rollouts.view(session, rollouts.get(session, principal.org_id, rollout_id))

    return await run_in_threadpool(read)


@router.get("/usage", dependencies=[only_query("month")])
async def usage(
    request: Request,
    principal: Caller,
    month: Annotated[str | None, Query(max_length=7, pattern=r"^\d{4}-\d{2}$")] = None,
) -> dict[str, Any]:
    """Messages and bytes of results per device and month (each result counted once, re-sends never)."""
    fleet = fleet_of(request)

    def read() -> dict[str, Any]:
        with fleet.sessions() as session:
            return {"object": "list", "data": results.usage(session, principal.org_id, month)}

    return await run_in_threadpool(read)
