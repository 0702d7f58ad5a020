"""The routes a device calls (the HTTP fallback of the edge protocol, `cumulo.contracts.edge`): enrolment with
its one-time token, results, heartbeats and reported state, and its desired state. Everything but enrolment
takes the device credential as `Authorization: Bearer`; every envelope must carry that same credential."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from cumulo.contracts.edge import (
    MAX_BATCH,
    MAX_ENVELOPE_BYTES,
    UP_HEARTBEAT,
    UP_REPORTED,
    UP_RESULTS,
    EnrollRequest,
    EnrollResponse,
    ResultsAck,
)
from cumulo.errors import AuthenticationError, InvalidRequest
from cumulo.service.api.deps import State, _bearer
from cumulo.service.edge import devices, rollouts
from cumulo.service.edge.fleet import EdgeFleet

router = APIRouter(prefix="/v1/edge")


def fleet_of(request: Request) -> EdgeFleet:
    return request.app.state.edge


def _credential(request: Request) -> str:
    credential = _bearer(request)
    if not credential:
        raise AuthenticationError("missing device credential: send 'Authorization: Bearer cumulo-device-...'")
    return credential


@router.post("/enroll")
async def enroll(body: EnrollRequest, request: Request, state: State) -> EnrollResponse:
    fleet = fleet_of(request)

    def write() -> EnrollResponse:
        with fleet.sessions() as session, session.begin():
            device, credential = devices.enroll(session, fleet.hasher, body.token, fleet.clock())
            rollouts.join(session, device, fleet.clock())  # what the fleet runs at this stage
            return EnrollResponse(
                device_id=device.device_id,
                credential=credential,
                topic_root=fleet.topic_root,
                mqtt_url=state.settings.edge_mqtt_url or None,
            )

    answer = await run_in_threadpool(write)
    await run_in_threadpool(fleet.publish_pending)
    return answer


async def _envelopes(request: Request) -> list[bytes]:
    """The body as one envelope or a list of them, each re-encoded to bytes as a device would publish it."""
    raw = await request.body()
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        raise InvalidRequest("body is not JSON: send one envelope or a list of them") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not 1 <= len(items) <= MAX_BATCH:
        raise InvalidRequest(f"send 1 to {MAX_BATCH} envelopes at once, got {len(items)}")
    encoded = [json.dumps(item, separators=(",", ":")).encode() for item in items]
    for item in encoded:
        if len(item) > MAX_ENVELOPE_BYTES:
            raise InvalidRequest(
                f"an envelope of {len(item)} bytes is over the limit of {MAX_ENVELOPE_BYTES}"
            )
    return encoded


@router.post("/results")
async def post_results(request: Request) -> ResultsAck:
    """Stores each envelope once; a re-sent one is acknowledged as a duplicate. All or nothing is not promised:
    envelopes before a bad one are stored, and the device re-sends the rest (duplicates are harmless)."""
    fleet, credential = fleet_of(request), _credential(request)
    envelopes = await _envelopes(request)

    def write() -> ResultsAck:
        acks = [fleet.receive(UP_RESULTS, item, bearer=credential) for item in envelopes]
        return ResultsAck(acks=[a for a in acks if a is not None])

    return await run_in_threadpool(write)


@router.post("/heartbeat", status_code=204)
async def heartbeat(request: Request) -> None:
    fleet, credential = fleet_of(request), _credential(request)
    for item in await _envelopes(request):
        await run_in_threadpool(fleet.receive, UP_HEARTBEAT, item, bearer=credential)


@router.post("/reported", status_code=204)
async def reported(request: Request) -> None:
    fleet, credential = fleet_of(request), _credential(request)
    for item in await _envelopes(request):
        await run_in_threadpool(fleet.receive, UP_REPORTED, item, bearer=credential)


@router.get("/desired")
async def desired(request: Request) -> dict[str, Any]:
    fleet, credential = fleet_of(request), _credential(request)

    def read() -> dict[str, Any]:
        with fleet.sessions() as session:
            device = devices.authenticate(session, fleet.hasher, credential)
            return devices.desired_state(device).model_dump(mode="json")

    return await run_in_threadpool(read)
