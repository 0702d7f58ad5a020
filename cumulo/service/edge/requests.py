"""One-off requests to a device, today an image of what its camera sees: the only way an image leaves a
device (docs/edge.md). A request is a row first; the next pass publishes it on the device's `down/requests`
topic (QoS 1, not retained: a retained request would be answered again on every reconnect). A device that was
offline then (its agent keeps a clean MQTT session, so the broker does not hold the message for it) gets it
again: a pass re-publishes an unanswered request once the device has been heard from since the last publish
and `resend_seconds` have passed, until it is answered or `REQUEST_TTL` old. The agent answers each request id
once (it keeps the ids it answered in its outbox database, in the transaction that stores the answer), so a
request sent twice is still answered once. The device answers
with `image` results (JPEG in base64 parts, each under the envelope limit) that are stored like any result;
when the last part arrives the whole JPEG is kept on the request, for its organisation to download.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from cumulo.contracts.edge import KIND_IMAGE, DeviceRequest, Envelope
from cumulo.errors import InvalidRequest, NotFound
from cumulo.service.edge.tables import EdgeDevice, EdgeRequest, EdgeResult

REQUEST_TTL = 86_400.0  # an unanswered request is (re)sent for a day, then given up
RESEND_SECONDS = (
    30.0  # an unanswered request is sent again this long after the last time, if the device is back
)


def create(session: Session, device: EdgeDevice, kind: str, reason: str | None, now: float) -> EdgeRequest:
    if device.credential_hash is None or device.revoked_at is not None:
        raise InvalidRequest(f"device {device.device_id!r} is not enrolled; it cannot answer a request")
    request = EdgeRequest(
        request_id="req_" + secrets.token_hex(8),
        org_id=device.org_id,
        device=device.id,
        kind=kind,
        reason=reason,
        created_at=now,
    )
    session.add(request)
    session.flush()
    return request


def due(
    session: Session, now: float, resend_seconds: float = RESEND_SECONDS
) -> list[tuple[EdgeRequest, str, DeviceRequest]]:
    """Requests to publish now (never published, or unanswered and missed: the device was heard from after the
    last publish, `resend_seconds` ago or more), with the device id (the topic) and the message itself."""
    missed = and_(
        EdgeDevice.last_seen > EdgeRequest.published_at, EdgeRequest.published_at <= now - resend_seconds
    )
    rows = session.execute(
        select(EdgeRequest, EdgeDevice.device_id)
        .join(EdgeDevice, EdgeDevice.id == EdgeRequest.device)
        .where(
            EdgeRequest.answered_at.is_(None),
            EdgeRequest.created_at >= now - REQUEST_TTL,
            EdgeDevice.revoked_at.is_(None),
            or_(EdgeRequest.published_at.is_(None), missed),
        )
        .order_by(EdgeRequest.id)
    )
    return [
        (row, device_id, DeviceRequest(id=row.request_id, kind="image", reason=row.reason))
        for row, device_id in rows
    ]


def take_part(session: Session, device: EdgeDevice, envelope: Envelope, now: float) -> EdgeRequest | None:
    """Called for every new `image` result: when it completes its request's parts, the JPEG is kept on the
    request. Returns the request when it became complete. Parts of an image nobody asked for are stored as
    results only (the agent never sends one; this keeps a misbehaving device from filling requests)."""
    request_id = envelope.body.get("request_id")
    parts = envelope.body.get("parts")
    if not isinstance(request_id, str) or not isinstance(parts, int) or not 0 < parts <= 1000:
        return None
    request = session.scalar(
        select(EdgeRequest).where(EdgeRequest.request_id == request_id, EdgeRequest.device == device.id)
    )
    if request is None or request.image is not None:
        return None
    found: dict[int, str] = {}
    for (body,) in session.execute(
        select(EdgeResult.body)
        .where(
            EdgeResult.device == device.id,
            EdgeResult.kind == KIND_IMAGE,
            EdgeResult.received_at >= request.created_at,
        )
        .order_by(EdgeResult.seq)
    ):
        part, data = body.get("part"), body.get("jpeg_b64")
        if body.get("request_id") == request_id and body.get("parts") == parts and isinstance(part, int):
            if isinstance(data, str):
                found.setdefault(part, data)  # answered twice (a re-delivered request): the first one wins
    if sorted(found) != list(range(parts)):
        return None
    try:
        image = base64.b64decode("".join(found[i] for i in range(parts)), validate=True)
    except (binascii.Error, TypeError):
        return None
    request.image, request.answered_at = image, now
    return request


def get(session: Session, org_id: int, request_id: str) -> EdgeRequest:
    request = session.scalar(
        select(EdgeRequest).where(EdgeRequest.request_id == request_id, EdgeRequest.org_id == org_id)
    )
    if request is None:
        raise NotFound(f"no request {request_id[:64]!r}")
    return request


def view(request: EdgeRequest, device_id: str) -> dict[str, Any]:
    state = "answered" if request.image is not None else ("sent" if request.published_at else "pending")
    return {
        "object": "edge.request",
        "id": request.request_id,
        "device_id": device_id,
        "kind": request.kind,
        "reason": request.reason,
        "state": state,
        "created_at": request.created_at,
        "published_at": request.published_at,
        "answered_at": request.answered_at,
        "bytes": len(request.image) if request.image is not None else None,
    }
