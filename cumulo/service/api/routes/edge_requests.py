"""The routes an organisation calls to ask one of its devices for an image (the only way an image leaves a
device) and to register webhooks that receive its results. Another organisation's device, request or webhook
is a 404, exactly like a missing one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from cumulo.contracts.edge import KIND_PATTERN
from cumulo.errors import NotFound
from cumulo.service.api.deps import Caller
from cumulo.service.api.routes.edge import DeviceId
from cumulo.service.api.routes.edge_devices import fleet_of
from cumulo.service.edge import devices, requests, webhooks
from cumulo.service.edge.tables import EdgeDevice

router = APIRouter(prefix="/v1/edge")
RequestId = Annotated[str, Path(max_length=64, pattern=r"^req_[0-9a-f]{1,60}$")]
WebhookId = Annotated[str, Path(max_length=64, pattern=r"^wh_[0-9a-f]{1,60}$")]


class RequestCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(max_length=16, pattern=r"^image$", description="what to send: only 'image' for now")
    reason: str | None = Field(default=None, max_length=256)


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    secret: str | None = Field(default=None, min_length=16, max_length=128)
    kinds: list[Annotated[str, Field(max_length=32, pattern=KIND_PATTERN)]] = Field(
        default_factory=list, max_length=32
    )


@router.post("/devices/{device_id}/requests", status_code=201)
async def create_request(
    device_id: DeviceId, body: RequestCreate, request: Request, principal: Caller
) -> dict[str, Any]:
    """Asks the device for one image; it is published on the device's down/requests topic at once (or by the
    next pass of a gateway that bridges the broker) and the answer is read from GET /v1/edge/requests/{id}."""
    fleet = fleet_of(request)

    def write() -> dict[str, Any]:
        with fleet.sessions() as session, session.begin():
            device = devices.get(session, principal.org_id, device_id)
            made = requests.create(session, device, body.kind, body.reason, fleet.clock())
            return requests.view(made, device.device_id)

    made = await run_in_threadpool(write)
    await run_in_threadpool(fleet.publish_pending)
    return await run_in_threadpool(_read_request, request, principal.org_id, made["id"])


def _read_request(request: Request, org_id: int, request_id: str) -> dict[str, Any]:
    fleet = fleet_of(request)
    with fleet.sessions() as session:
        found = requests.get(session, org_id, request_id)
        device = session.get(EdgeDevice, found.device)
        return requests.view(found, device.device_id)


@router.get("/requests/{request_id}")
async def get_request(request_id: RequestId, request: Request, principal: Caller) -> dict[str, Any]:
    return await run_in_threadpool(_read_request, request, principal.org_id, request_id)


@router.get("/requests/{request_id}/image", response_class=Response)
async def get_image(request_id: RequestId, request: Request, principal: Caller) -> Response:
    """The JPEG the device answered with, once every part of it has arrived."""
    fleet = fleet_of(request)

    def read() -> bytes:
        with fleet.sessions() as session:
            found = requests.get(session, principal.org_id, request_id)
            if found.image is None:
                raise NotFound(
                    f"request {request_id!r} has no image yet (state: {requests.view(found, '')['state']})"
                )
            return found.image

    return Response(await run_in_threadpool(read), media_type="image/jpeg")


@router.post("/webhooks", status_code=201)
async def create_webhook(body: WebhookCreate, request: Request, principal: Caller) -> dict[str, Any]:
    """Results of the given kinds (all when none are given) are POSTed to `url`, signed with `secret` (one is
    made and shown once when none is given)."""
    fleet = fleet_of(request)

    def write() -> dict[str, Any]:
        with fleet.sessions() as session, session.begin():
            hook, secret = webhooks.create(
                session, principal.org_id, body.url, body.secret, body.kinds, fleet.clock()
            )
            return {**webhooks.view(session, hook), "secret": secret}

    return await run_in_threadpool(write)


@router.get("/webhooks")
async def list_webhooks(request: Request, principal: Caller) -> dict[str, Any]:
    fleet = fleet_of(request)

    def read() -> dict[str, Any]:
        with fleet.sessions() as session:
            found = webhooks.list_for(session, principal.org_id)
            return {"object": "list", "data": [webhooks.view(session, h) for h in found]}

    return await run_in_threadpool(read)


@router.delete("/webhooks/{webhook_id}")
async def delete_webhook(webhook_id: WebhookId, request: Request, principal: Caller) -> dict[str, Any]:
    """Stops deliveries to the webhook, those still owed too."""
    fleet = fleet_of(request)

    def write() -> dict[str, Any]:
        with fleet.sessions() as session, session.begin():
            hook = webhooks.get(session, principal.org_id, webhook_id)
            hook.deleted_at = fleet.clock()
            return {"object": "edge.webhook.deleted", "id": hook.webhook_id, "deleted": True}

    return await run_in_threadpool(write)
