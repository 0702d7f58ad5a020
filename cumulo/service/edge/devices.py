"""Devices of an organisation: enrolment with a one-time token, the device credential, revocation, heartbeats,
reported and desired state. Each function takes a Session (the caller owns the transaction) and the fleet's
clock reading `now`, so tests drive time.

Secrets are stored as the service's keyed hash (HMAC, `security.KeyHasher`), never in the clear: a copy of the
database alone cannot enrol a device or pose as one.
"""

from __future__ import annotations

import hmac
import re
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cumulo.contracts.edge import (
    DEVICE_ID_PATTERN,
    KIND_HEARTBEAT,
    KIND_REPORTED,
    DesiredModel,
    DesiredState,
    Envelope,
)
from cumulo.errors import AuthenticationError, Conflict, InvalidRequest, NotFound
from cumulo.service.edge.tables import EdgeDevice
from cumulo.service.security import KeyHasher

TOKEN_PREFIX = "cumulo-enroll-"
CREDENTIAL_PREFIX = "cumulo-device-"


def _check_device_id(device_id: str) -> str:
    if not re.fullmatch(DEVICE_ID_PATTERN, device_id):
        raise InvalidRequest(
            f"device id {device_id[:80]!r} must be 1 to 64 letters, digits, '_', '.' or '-' (a topic level)"
        )
    return device_id


DEVICE_CLASS_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"  # a chip id of the catalog


def create(
    session: Session,
    hasher: KeyHasher,
    org_id: int,
    device_id: str | None,
    name: str,
    now: float,
    ttl: float,
    device_class: str | None = None,
) -> tuple[EdgeDevice, str]:
    """A new device and its one-time enrolment token (returned once, stored as a keyed hash)."""
    device_id = _check_device_id(device_id) if device_id else "dev-" + secrets.token_hex(6)
    if session.scalar(select(EdgeDevice.id).where(EdgeDevice.device_id == device_id)) is not None:
        # Device ids are topic levels shared by every organisation on the broker, so they are unique overall.
        raise Conflict(f"device id {device_id!r} is taken; choose another")
    device = EdgeDevice(
        org_id=org_id,
        device_id=device_id,
        name=name[:128],
        device_class=device_class,
        created_at=now,
        desired_revision=0,
        published_revision=0,
    )
    session.add(device)
    token = _new_token(device, hasher, now, ttl)
    session.flush()
    return device, token


def reissue_token(device: EdgeDevice, hasher: KeyHasher, now: float, ttl: float) -> str:
    """A fresh enrolment token for a device (a replaced camera): its old credential stops working now."""
    device.credential_hash = None
    device.revoked_at = None
    return _new_token(device, hasher, now, ttl)


def _new_token(device: EdgeDevice, hasher: KeyHasher, now: float, ttl: float) -> str:
    token = TOKEN_PREFIX + secrets.token_urlsafe(24)
    device.token_hash = hasher.hash(token)
    device.token_expires_at = now + ttl
    return token


def enroll(session: Session, hasher: KeyHasher, token: str, now: float) -> tuple[EdgeDevice, str]:
    """Trades a one-time token for the device credential; the token cannot be used again."""
    device = None
    if token.startswith(TOKEN_PREFIX):
        device = session.scalar(select(EdgeDevice).where(EdgeDevice.token_hash == hasher.hash(token)))
    if device is None or device.revoked_at is not None:
        raise AuthenticationError("invalid or already used enrolment token")
    if device.token_expires_at is not None and device.token_expires_at <= now:
        raise AuthenticationError("this enrolment token has expired; issue a new one")
    credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
    device.token_hash = None
    device.token_expires_at = None
    device.credential_hash = hasher.hash(credential)
    device.enrolled_at = now
    device.last_seen = now
    return device, credential


def authenticate(
    session: Session, hasher: KeyHasher, credential: str, device_id: str | None = None
) -> EdgeDevice:
    """The device this credential belongs to, not revoked, and `device_id` when the message names one."""
    device = None
    if credential.startswith(CREDENTIAL_PREFIX):
        device = session.scalar(
            select(EdgeDevice).where(EdgeDevice.credential_hash == hasher.hash(credential))
        )
    named = device_id if device_id is not None else (device.device_id if device else "")
    if device is None or not hmac.compare_digest(device.device_id, named):
        raise AuthenticationError(
            f"invalid device credential for {named[:64]!r}" if named else "invalid device credential"
        )
    if device.revoked_at is not None:
        raise AuthenticationError(f"device {named!r} has been revoked")
    return device


def get(session: Session, org_id: int, device_id: str) -> EdgeDevice:
    """A device of this organisation; another organisation's device is not found, exactly like a missing one."""
    device = session.scalar(
        select(EdgeDevice).where(EdgeDevice.device_id == device_id, EdgeDevice.org_id == org_id)
    )
    if device is None:
        raise NotFound(f"no device {device_id[:64]!r}")
    return device


def list_for(session: Session, org_id: int) -> list[EdgeDevice]:
    return list(
        session.scalars(select(EdgeDevice).where(EdgeDevice.org_id == org_id).order_by(EdgeDevice.id))
    )


def targets(session: Session, org_id: int) -> list[EdgeDevice]:
    """The devices a rollout goes to: enrolled and not revoked."""
    return [d for d in list_for(session, org_id) if d.credential_hash is not None and d.revoked_at is None]


def revoke(device: EdgeDevice, now: float) -> None:
    if device.revoked_at is None:
        device.revoked_at = now
    device.credential_hash = None
    device.token_hash = None


def note_seen(device: EdgeDevice, envelope: Envelope, now: float) -> None:
    """Any message: last seen and the model it names. A heartbeat or reported state that names a
    `device_class` (a chip id: the agent's --device-class) replaces the class the device was created with;
    anything but a plain lower-case id is ignored."""
    device.last_seen = max(device.last_seen or 0.0, now)
    named = envelope.body.get("device_class") if envelope.kind in (KIND_HEARTBEAT, KIND_REPORTED) else None
    if isinstance(named, str) and re.fullmatch(DEVICE_CLASS_PATTERN, named):
        device.device_class = named
    if envelope.model is not None:
        reported = dict(device.reported or {})
        reported["model"] = envelope.model.model_dump()
        device.reported = reported


def note_reported(device: EdgeDevice, envelope: Envelope, now: float) -> None:
    """The device's reported state (its `device_class`, if named, was taken by `note_seen`)."""
    device.reported = {
        "model": envelope.model.model_dump() if envelope.model else None,
        "body": envelope.body,
        "at": now,
    }


def set_desired(
    device: EdgeDevice, model: dict[str, Any] | None, rollout_id: int | None, config: dict | None = None
) -> None:
    """A new desired state; the revision moves so the bridge publishes it and the device can drop stale ones."""
    device.desired_model = model
    device.desired_rollout = rollout_id
    if config is not None:
        device.desired_config = config
    device.desired_revision = (device.desired_revision or 0) + 1


def desired_state(device: EdgeDevice) -> DesiredState:
    return DesiredState(
        device_id=device.device_id,
        revision=device.desired_revision or 0,
        model=DesiredModel.model_validate(device.desired_model) if device.desired_model else None,
        config=device.desired_config or {},
        rollout_id=device.desired_rollout,
    )


def view(device: EdgeDevice, now: float, online_seconds: float) -> dict[str, Any]:
    state = "revoked" if device.revoked_at else ("enrolled" if device.credential_hash else "pending")
    online = device.last_seen is not None and now - device.last_seen <= online_seconds and state == "enrolled"
    return {
        "object": "edge.device",
        "device_id": device.device_id,
        "name": device.name,
        "device_class": device.device_class,
        "state": state,
        "online": online,
        "created_at": device.created_at,
        "enrolled_at": device.enrolled_at,
        "revoked_at": device.revoked_at,
        "last_seen": device.last_seen,
        "reported": device.reported,
        "refused": device.refused or {},  # messages refused in its name, by reason (written each pass)
        "desired": desired_state(device).model_dump(mode="json"),
    }
