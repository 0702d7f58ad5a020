"""Webhooks: an organisation's HTTP receivers of its results, by kind.

At least once. A delivery row is written in the transaction that stores the result, so no stored result can
miss its deliveries, whatever crashes after. `deliver_due` (the gateway's delivery thread; tests call it with
their own clock) claims due rows one at a time (a conditional UPDATE, so gateways sharing the database never
post the same attempt twice), POSTs the result and marks it delivered on a 2xx; anything else is tried again
after 1, 2, 4 ... seconds (at most `max_backoff`), `max_attempts` times in all. A receiver can still see a
result twice (its answer lost on the way back), so every delivery carries the result's stable id,
`{device_id}:{seq}`, in the body and in `X-Cumulo-Delivery`: receivers deduplicate by it.

Signature. `X-Cumulo-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body, keyed by the secret>`
(the scheme Stripe's receivers know): the receiver recomputes it and may refuse old timestamps against replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from cumulo.errors import InvalidRequest, NotFound
from cumulo.service.edge.tables import EdgeDelivery, EdgeDevice, EdgeResult, EdgeWebhook

SIGNATURE_HEADER = "X-Cumulo-Signature"
DELIVERY_HEADER = "X-Cumulo-Delivery"
MAX_WEBHOOKS = 20  # per organisation


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def create(
    session: Session, org_id: int, url: str, secret: str | None, kinds: list[str], now: float
) -> tuple[EdgeWebhook, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"webhook url must be http(s)://HOST/..., got {url[:200]!r}")
    live = session.scalars(
        select(EdgeWebhook.id).where(EdgeWebhook.org_id == org_id, EdgeWebhook.deleted_at.is_(None))
    ).all()
    if len(live) >= MAX_WEBHOOKS:
        raise InvalidRequest(f"an organisation has at most {MAX_WEBHOOKS} webhooks; delete one first")
    secret = secret or "whsec_" + secrets.token_urlsafe(24)
    hook = EdgeWebhook(
        webhook_id="wh_" + secrets.token_hex(8),
        org_id=org_id,
        url=url,
        secret=secret,
        kinds=sorted(set(kinds)),
        created_at=now,
    )
    session.add(hook)
    session.flush()
    return hook, secret


def get(session: Session, org_id: int, webhook_id: str) -> EdgeWebhook:
    hook = session.scalar(
        select(EdgeWebhook).where(
            EdgeWebhook.webhook_id == webhook_id,
            EdgeWebhook.org_id == org_id,
            EdgeWebhook.deleted_at.is_(None),
        )
    )
    if hook is None:
        raise NotFound(f"no webhook {webhook_id[:64]!r}")
    return hook


def list_for(session: Session, org_id: int) -> list[EdgeWebhook]:
    return list(
        session.scalars(
            select(EdgeWebhook)
            .where(EdgeWebhook.org_id == org_id, EdgeWebhook.deleted_at.is_(None))
            .order_by(EdgeWebhook.id)
        )
    )


def view(session: Session, hook: EdgeWebhook) -> dict[str, Any]:
    rows = session.execute(
        select(EdgeDelivery.delivered_at, EdgeDelivery.next_at).where(EdgeDelivery.webhook == hook.id)
    ).all()
    return {
        "object": "edge.webhook",
        "id": hook.webhook_id,
        "url": hook.url,
        "kinds": hook.kinds,
        "created_at": hook.created_at,
        "delivered": sum(1 for d, _ in rows if d is not None),
        "pending": sum(1 for d, n in rows if d is None and n is not None),
        "failed": sum(1 for d, n in rows if d is None and n is None),
    }


def enqueue(session: Session, org_id: int, result_id: int, kind: str, now: float) -> int:
    """Owes the new result to every webhook of the organisation that takes its kind; in the storing
    transaction. Returns how many deliveries it made."""
    hooks = session.scalars(
        select(EdgeWebhook).where(EdgeWebhook.org_id == org_id, EdgeWebhook.deleted_at.is_(None))
    ).all()
    owed = [h for h in hooks if not h.kinds or kind in h.kinds]
    for hook in owed:
        session.add(EdgeDelivery(webhook=hook.id, result=result_id, attempts=0, next_at=now))
    return len(owed)


@dataclass
class Outcome:
    delivered: int = 0
    retried: int = 0
    failed: int = 0


def payload(result: EdgeResult, device_id: str, webhook_id: str) -> bytes:
    item = {
        "object": "edge.result",
        "id": f"{device_id}:{result.seq}",  # stable across retries: receivers deduplicate by it
        "webhook_id": webhook_id,
        "device_id": device_id,
        "seq": result.seq,
        "kind": result.kind,
        "time": result.time,
        "received_at": result.received_at,
        "model": result.model,
        "body": result.body,
    }
    return json.dumps(item, separators=(",", ":")).encode()


def deliver_due(
    sessions: sessionmaker,
    now: float,
    *,
    client: httpx.Client,
    limit: int = 100,
    lease: float = 60.0,
    max_attempts: int = 12,
    max_backoff: float = 600.0,
) -> Outcome:
    """One round of due deliveries; each is claimed by moving its next_at `lease` seconds ahead first."""
    outcome = Outcome()
    with sessions() as session:
        due = session.scalars(
            select(EdgeDelivery.id)
            .where(EdgeDelivery.next_at.is_not(None), EdgeDelivery.next_at <= now)
            .order_by(EdgeDelivery.next_at, EdgeDelivery.id)
            .limit(limit)
        ).all()
    for delivery_id in due:
        with sessions() as session, session.begin():
            claimed = session.execute(
                update(EdgeDelivery)
                .where(EdgeDelivery.id == delivery_id, EdgeDelivery.next_at <= now)
                .values(next_at=now + lease)
            ).rowcount
            if not claimed:
                continue  # another gateway took it
            delivery = session.get(EdgeDelivery, delivery_id)
            hook = session.get(EdgeWebhook, delivery.webhook)
            result = session.get(EdgeResult, delivery.result)
            device_id = session.scalar(select(EdgeDevice.device_id).where(EdgeDevice.id == result.device))
            body = payload(result, device_id, hook.webhook_id)
            url, secret = hook.url, hook.secret
            gone = hook.deleted_at is not None
        delivery_name = f"{device_id}:{result.seq}"
        error = "webhook deleted" if gone else _post(client, url, secret, body, delivery_name, now)
        with sessions() as session, session.begin():
            delivery = session.get(EdgeDelivery, delivery_id)
            delivery.attempts += 1
            if error is None:
                delivery.delivered_at, delivery.next_at, delivery.last_error = now, None, None
                outcome.delivered += 1
            elif gone or delivery.attempts >= max_attempts:
                delivery.next_at, delivery.last_error = None, error[:512]
                outcome.failed += 1
            else:
                delivery.next_at = now + min(2.0 ** (delivery.attempts - 1), max_backoff)
                delivery.last_error = error[:512]
                outcome.retried += 1
    return outcome


def _post(client: httpx.Client, url: str, secret: str, body: bytes, delivery: str, now: float) -> str | None:
    """None when the receiver took it (2xx), else why not, in one line."""
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(secret, int(now), body),
        DELIVERY_HEADER: delivery,
        "User-Agent": "cumulo-webhooks/1",
    }
    try:
        answer = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {str(error)[:200]}"
    if 200 <= answer.status_code < 300:
        return None
    return f"HTTP {answer.status_code}"
