"""Results: stored once per (device, seq) and metered in the same transaction, read back by device, kind and
time, and handed to live subscribers (`Subscribers`, behind GET /v1/edge/results/stream).

The insert is `INSERT ... ON CONFLICT (device, seq) DO NOTHING RETURNING id` on SQLite and PostgreSQL alike: a
re-sent result returns no row, so it is acknowledged as a duplicate and neither stored nor metered again, even
when two gateways receive the same message at once.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cumulo.contracts.edge import Envelope
from cumulo.service.edge.tables import EdgeDevice, EdgeResult, EdgeUsage


def _insert(session: Session, table: Any) -> Any:
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def model_of(device: EdgeDevice, envelope: Envelope) -> dict[str, Any] | None:
    """The full model reference a result is stored with: its own `model` (older agents), else the device's
    model whose sha256 begins with the result's `mid` (the one it reports, the one it was told to run, or its
    last good one), else `{"mid": ...}` (a result that arrived before any word of its model)."""
    if envelope.model is not None:
        return envelope.model.model_dump()
    if envelope.mid is None:
        return None
    reported = (device.reported or {}).get("model")
    for known in (reported, device.desired_model, device.good_model):
        if known and str(known.get("sha256", "")).startswith(envelope.mid):
            return {key: known[key] for key in ("name", "version", "sha256") if key in known}
    return {"mid": envelope.mid}


def store(session: Session, device: EdgeDevice, envelope: Envelope, size: int, now: float) -> int | None:
    """The new row's id when the result is new (stored and metered), None for a re-send of a stored one."""
    insert = _insert(session, EdgeResult).values(
        org_id=device.org_id,
        device=device.id,
        seq=envelope.seq,
        kind=envelope.kind,
        time=envelope.time.timestamp(),
        received_at=now,
        model=model_of(device, envelope),
        body=envelope.body,
        size=size,
    )
    stored = session.execute(
        insert.on_conflict_do_nothing(index_elements=["device", "seq"]).returning(EdgeResult.id)
    ).first()
    if stored is None:
        return None
    month = datetime.fromtimestamp(now, UTC).strftime("%Y-%m")
    meter = _insert(session, EdgeUsage).values(
        org_id=device.org_id, device=device.id, month=month, messages=1, bytes=size
    )
    session.execute(
        meter.on_conflict_do_update(
            index_elements=["device", "month"],
            set_={"messages": EdgeUsage.messages + 1, "bytes": EdgeUsage.bytes + size},
        )
    )
    return stored[0]


def query(
    session: Session,
    org_id: int,
    *,
    device: int | None = None,
    kind: str | None = None,
    since: float | None = None,
    until: float | None = None,
    after: int | None = None,
    limit: int = 100,
) -> list[tuple[EdgeResult, str]]:
    """(result, device id) oldest first by device time; `after` is the last result id of the previous page.
    `since` is inclusive, `until` exclusive."""
    statement = (
        select(EdgeResult, EdgeDevice.device_id)
        .join(EdgeDevice, EdgeDevice.id == EdgeResult.device)
        .where(EdgeResult.org_id == org_id)
    )
    if device is not None:
        statement = statement.where(EdgeResult.device == device)
    if kind is not None:
        statement = statement.where(EdgeResult.kind == kind)
    if since is not None:
        statement = statement.where(EdgeResult.time >= since)
    if until is not None:
        statement = statement.where(EdgeResult.time < until)
    if after is not None:
        statement = statement.where(EdgeResult.id > after)
    statement = statement.order_by(EdgeResult.id).limit(limit)
    return [(row, device_id) for row, device_id in session.execute(statement)]


def usage(session: Session, org_id: int, month: str | None = None) -> list[dict[str, Any]]:
    statement = (
        select(EdgeUsage, EdgeDevice.device_id)
        .join(EdgeDevice, EdgeDevice.id == EdgeUsage.device)
        .where(EdgeUsage.org_id == org_id)
        .order_by(EdgeUsage.month, EdgeDevice.device_id)
    )
    if month is not None:
        statement = statement.where(EdgeUsage.month == month)
    return [
        {"device_id": device_id, "month": row.month, "messages": row.messages, "bytes": row.bytes}
        for row, device_id in session.execute(statement)
    ]


def view(result: EdgeResult, device_id: str) -> dict[str, Any]:
    return {
        "object": "edge.result",
        "id": result.id,
        "device_id": device_id,
        "seq": result.seq,
        "kind": result.kind,
        "time": result.time,
        "received_at": result.received_at,
        "model": result.model,
        "body": result.body,
    }


@dataclass(eq=False)
class Subscriber:
    org_id: int
    device_id: str | None
    kind: str | None
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    lost: int = 0  # results dropped because the subscriber read too slowly


class Subscribers:
    """Live subscribers of an organisation's results. Results are stored by whichever thread received them (the
    MQTT bridge's, a request's), so each is handed to a subscriber's own event loop; a subscriber that falls
    `capacity` results behind loses the newest and is told how many (they stay in the database)."""

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()

    def add(self, org_id: int, device_id: str | None, kind: str | None) -> Subscriber:
        subscriber = Subscriber(
            org_id, device_id, kind, asyncio.Queue(self.capacity), asyncio.get_running_loop()
        )
        with self._lock:
            self._subscribers.add(subscriber)
        return subscriber

    def remove(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def publish(self, org_id: int, item: dict[str, Any]) -> None:
        with self._lock:
            targets = [
                s
                for s in self._subscribers
                if s.org_id == org_id
                and s.device_id in (None, item["device_id"])
                and s.kind in (None, item["kind"])
            ]
        for subscriber in targets:
            try:
                subscriber.loop.call_soon_threadsafe(_offer, subscriber, item)
            except RuntimeError:  # its loop closed before it could unsubscribe
                self.remove(subscriber)


def _offer(subscriber: Subscriber, item: dict[str, Any]) -> None:
    try:
        subscriber.queue.put_nowait(item)
    except asyncio.QueueFull:
        subscriber.lost += 1
