"""Staged model rollouts to an organisation's devices, with automatic rollback.

A rollout first sets the new model as the desired state of its canaries (a share of the enrolled devices).
Each pass of `evaluate` (the gateway runs one every few seconds; tests call it with their own clock) looks at
the canaries: one that reported a `status` result with an error for this rollout (its `rollout_id`; an old
error from an earlier rollout delivered late out of a backlog says nothing about this one), or that has not been
heard from for `silence_seconds`, fails the rollout, and every canary goes back to its own last good model
(`EdgeDevice.good_model`: the model of the last completed rollout it confirmed; with none, the desired model is
none and the device stops the failed model and runs its factory model, `FACTORY` in the history). Canaries healthy for
`window_seconds` promote the model to the remaining devices, and to those enrolled since (`join`): it becomes
every device's good model and the rollout is completed; a device that reports afterwards that it could not
install it goes back to the model it had before. Every step, per device, is appended to the rollout's history, and rows are never deleted.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cumulo.contracts.edge import KIND_STATUS, DesiredModel
from cumulo.errors import Conflict, InvalidRequest, NotFound
from cumulo.service.edge import devices
from cumulo.service.edge.tables import EdgeDevice, EdgeResult, EdgeRollout

CANARY, COMPLETED, ROLLED_BACK = "canary", "completed", "rolled_back"
# No good model to go back to (no rollout completed while the device was in the fleet): the desired model is
# none, which tells the agent to stop the rollout's model and run the one it was made with.
FACTORY = "factory"


def start(
    session: Session,
    org_id: int,
    model: DesiredModel,
    now: float,
    *,
    canary_share: float = 0.1,
    window_seconds: float = 300.0,
    silence_seconds: float = 120.0,
) -> EdgeRollout:
    if not 0 < canary_share <= 1:
        raise InvalidRequest(f"canary share must be in (0, 1], got {canary_share}")
    if window_seconds <= 0 or silence_seconds <= 0:
        raise InvalidRequest("the canary window and the silence limit must be positive seconds")
    running = session.scalar(
        select(EdgeRollout.id).where(EdgeRollout.org_id == org_id, EdgeRollout.state == CANARY)
    )
    if running is not None:
        raise Conflict(f"rollout {running} is still in its canary stage; wait for it or let it roll back")
    fleet = devices.targets(session, org_id)
    if not fleet:
        raise InvalidRequest("this organisation has no enrolled devices to roll out to")
    fleet.sort(key=lambda d: d.device_id)
    count = max(1, math.ceil(canary_share * len(fleet)))
    canaries, rest = fleet[:count], fleet[count:]
    previous = session.scalar(
        select(EdgeRollout.model)
        .where(EdgeRollout.org_id == org_id, EdgeRollout.state == COMPLETED)
        .order_by(EdgeRollout.id.desc())
        .limit(1)
    )
    rollout = EdgeRollout(
        org_id=org_id,
        model=model.model_dump(),
        previous_model=previous,
        canary_share=canary_share,
        window_seconds=window_seconds,
        silence_seconds=silence_seconds,
        canaries=[d.id for d in canaries],
        rest=[d.id for d in rest],
        state=CANARY,
        reason=None,
        history=[],
        created_at=now,
        updated_at=now,
    )
    session.add(rollout)
    session.flush()
    for device in canaries:
        devices.set_desired(device, rollout.model, rollout.id)
    _note(rollout, now, "canaries", {"devices": [d.device_id for d in canaries]})
    return rollout


def evaluate(session: Session, now: float) -> list[EdgeRollout]:
    """One pass over every rollout in its canary stage; returns those that moved (promoted or rolled back)."""
    moved = []
    for rollout in session.scalars(select(EdgeRollout).where(EdgeRollout.state == CANARY)):
        failure = _canary_failure(session, rollout, now)
        if failure is not None:
            _roll_back(session, rollout, now, failure)
            moved.append(rollout)
        elif now >= rollout.created_at + rollout.window_seconds:
            # Healthy for the whole window: the model becomes every device's good one. What each had before is
            # kept in the history, where a device that fails to install it later is sent back to.
            kept = [d for d in _devices(session, rollout.canaries) if d.desired_rollout == rollout.id]
            promoted = [d for d in _devices(session, rollout.rest) if d.revoked_at is None]
            before = {d.device_id: d.good_model for d in kept + promoted}
            for device in promoted:
                devices.set_desired(device, rollout.model, rollout.id)
            for device in kept + promoted:
                device.good_model = rollout.model
            rollout.state = COMPLETED
            _note(rollout, now, "completed", {"devices": [d.device_id for d in promoted], "from": before})
            moved.append(rollout)
    return moved


def _canary_failure(session: Session, rollout: EdgeRollout, now: float) -> str | None:
    canaries = _devices(session, rollout.canaries)
    statuses = session.execute(
        select(EdgeResult.device, EdgeResult.body)
        .where(
            EdgeResult.device.in_(rollout.canaries),
            EdgeResult.kind == KIND_STATUS,
            EdgeResult.received_at >= rollout.created_at,
        )
        .order_by(EdgeResult.id)
    )
    names = {d.id: d.device_id for d in canaries}
    for device_id, body in statuses:
        if failed_for(body) == rollout.id:
            return f"canary {names.get(device_id, device_id)} reported an error: {str(body['error'])[:200]}"
    for device in canaries:
        heard = max(device.last_seen or 0.0, rollout.created_at)
        if now - heard > rollout.silence_seconds:
            return f"canary {device.device_id} silent for {now - heard:.0f} s"
    return None


def failed_for(body: Any) -> int | None:
    """The rollout a status result says failed on the device: its `rollout_id` when it carries an error."""
    if isinstance(body, dict) and body.get("error") and isinstance(body.get("rollout_id"), int):
        return body["rollout_id"]
    return None


def _roll_back(session: Session, rollout: EdgeRollout, now: float, reason: str) -> None:
    back = {}
    for device in _devices(session, rollout.canaries):
        if device.desired_rollout == rollout.id:
            devices.set_desired(device, device.good_model, None)
            back[device.device_id] = _version(device.good_model)
    rollout.state = ROLLED_BACK
    rollout.reason = reason[:512]
    detail: dict[str, Any] = {"reason": reason, "devices": back}
    if factory := sorted(name for name, to in back.items() if to == FACTORY):
        detail["factory"] = factory  # told to stop the failed model and run their own
    _note(rollout, now, "rolled_back", detail)


def join(session: Session, device: EdgeDevice, now: float) -> None:
    """A device just enrolled gets what the fleet runs at this stage: during a canary stage the last good model
    (and it is promoted with the others), otherwise the last completed rollout's model."""
    running = session.scalar(
        select(EdgeRollout).where(EdgeRollout.org_id == device.org_id, EdgeRollout.state == CANARY)
    )
    if running is not None:
        if device.id not in running.canaries + running.rest:
            running.rest = [*running.rest, device.id]
        device.good_model = running.previous_model
        if running.previous_model is not None:
            devices.set_desired(device, running.previous_model, None)
        _note(running, now, "joined", {"device": device.device_id, "stage": CANARY})
        return
    last = session.scalar(
        select(EdgeRollout)
        .where(EdgeRollout.org_id == device.org_id, EdgeRollout.state == COMPLETED)
        .order_by(EdgeRollout.id.desc())
        .limit(1)
    )
    if last is not None:
        devices.set_desired(device, last.model, last.id)
        device.good_model = last.model
        _note(last, now, "joined", {"device": device.device_id, "stage": COMPLETED})


def note_status(session: Session, device: EdgeDevice, body: dict[str, Any], now: float) -> None:
    """A device's word on a rollout's model (a `status` result carrying `rollout_id`), kept in its history. After
    the rollout completed, a failure sends the device back to the model it had before."""
    rollout_id = body.get("rollout_id")
    rollout = session.get(EdgeRollout, rollout_id) if isinstance(rollout_id, int) else None
    if rollout is None or rollout.org_id != device.org_id:
        return
    failed = failed_for(body) == rollout.id
    detail: dict[str, Any] = {"device": device.device_id}
    if failed:
        detail["error"] = str(body["error"])[:200]
    _note(rollout, now, "failed" if failed else "installed", detail)
    if not failed or rollout.state != COMPLETED or device.desired_rollout != rollout.id:
        return
    completed = next(h for h in rollout.history if h["event"] == "completed")
    before = completed["detail"].get("from", {}).get(device.device_id)
    device.good_model = before
    devices.set_desired(device, before, None)
    _note(rollout, now, "device_rolled_back", {"device": device.device_id, "to": _version(before)})


def _version(model: dict[str, Any] | None) -> str:
    """A model as the history names it: its version, or FACTORY for none (the device's own model)."""
    return model["version"] if model else FACTORY


def _devices(session: Session, ids: list[int]) -> list[EdgeDevice]:
    if not ids:
        return []
    return list(session.scalars(select(EdgeDevice).where(EdgeDevice.id.in_(ids)).order_by(EdgeDevice.id)))


def _note(rollout: EdgeRollout, now: float, event: str, detail: dict[str, Any]) -> None:
    rollout.history = [*rollout.history, {"at": now, "event": event, "detail": detail}]  # a new list: JSON
    rollout.updated_at = now


def get(session: Session, org_id: int, rollout_id: int) -> EdgeRollout:
    rollout = session.get(EdgeRollout, rollout_id)
    if rollout is None or rollout.org_id != org_id:
        raise NotFound(f"no rollout {rollout_id}")
    return rollout


def list_for(session: Session, org_id: int) -> list[EdgeRollout]:
    return list(
        session.scalars(
            select(EdgeRollout).where(EdgeRollout.org_id == org_id).order_by(EdgeRollout.id.desc())
        )
    )


def view(session: Session, rollout: EdgeRollout) -> dict[str, Any]:
    names = {d.id: d.device_id for d in _devices(session, rollout.canaries + rollout.rest)}
    return {
        "object": "edge.rollout",
        "id": rollout.id,
        "model": rollout.model,
        "previous_model": rollout.previous_model,
        "state": rollout.state,
        "reason": rollout.reason,
        "canary_share": rollout.canary_share,
        "window_seconds": rollout.window_seconds,
        "silence_seconds": rollout.silence_seconds,
        "canaries": [names[i] for i in rollout.canaries if i in names],
        "rest": [names[i] for i in rollout.rest if i in names],
        "history": rollout.history,
        "created_at": rollout.created_at,
        "updated_at": rollout.updated_at,
    }
