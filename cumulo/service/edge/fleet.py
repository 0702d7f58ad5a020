"""`EdgeFleet`: the one path every device message takes, whether it came over MQTT or HTTP, and the periodic
pass that moves rollouts along and publishes desired states.

A message is parsed (`parse_envelope`), its credential checked against the device it names (and the topic it
came on), then handled in one transaction by topic leaf. Anything wrong is refused with a `CumuloError`, counted
in `rejected` by reason and logged once per reason and source, so a misbehaving device cannot flood the log or
stop the bridge, and nothing of it is stored.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from cumulo.contracts.edge import (
    DOWN_DESIRED,
    DOWN_REQUESTS,
    KIND_IMAGE,
    KIND_STATUS,
    UP_REPORTED,
    UP_RESULTS,
    ResultAck,
    parse_envelope,
    topic_for,
)
from cumulo.errors import AuthenticationError, CumuloError, InvalidRequest
from cumulo.service.edge import devices, requests, results, rollouts, webhooks
from cumulo.service.edge.tables import EdgeDevice
from cumulo.service.metrics import Metrics
from cumulo.service.security import KeyHasher

log = logging.getLogger("cumulo.service.edge")
Publisher = Callable[[str, bytes, bool], None]  # (topic, payload, retain) published with QoS 1
MAX_REFUSING_DEVICES = 10_000  # device ids whose refusals wait in memory for the next pass


class EdgeFleet:
    def __init__(
        self,
        sessions: sessionmaker,
        hasher: KeyHasher,
        *,
        topic_root: str,
        clock: Callable[[], float] = time.time,
        token_ttl: float = 86400.0,
        online_seconds: float = 120.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.sessions = sessions
        self.hasher = hasher
        self.topic_root = topic_root
        self.clock = clock
        self.token_ttl = token_ttl
        self.online_seconds = online_seconds
        self.subscribers = results.Subscribers()
        self.publisher: Publisher | None = None  # set by the MQTT bridge while it runs
        self.rejected: Counter[str] = Counter()
        self.metrics = metrics
        self.webhooks_due = threading.Event()  # set when a stored result owes a webhook delivery
        self.request_resend_seconds = requests.RESEND_SECONDS  # an unanswered request missed: sent again
        self.background_deliveries = True  # the gateway's delivery thread runs rounds (tests turn it off)
        self._refused_by_device: Counter[tuple[str, str]] = Counter()  # written to edge_devices each pass
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    # -- messages from devices ---------------------------------------------------------------------------
    def receive(
        self, leaf: str, payload: bytes, *, topic_device: str | None = None, bearer: str | None = None
    ) -> ResultAck | None:
        """Handles one envelope from a device; the ack for a result, None for a heartbeat or reported state.
        Raises InvalidRequest or AuthenticationError (counted and logged once) and stores nothing then."""
        source = topic_device or "http"
        try:
            envelope = parse_envelope(payload)
        except InvalidRequest as error:
            self._reject("malformed", source, error, topic_device)
            raise
        try:
            if topic_device is not None and envelope.device_id != topic_device:
                raise AuthenticationError(
                    f"envelope of {envelope.device_id!r} on the topic of {topic_device!r}"
                )
            if bearer is not None and not hmac.compare_digest(envelope.auth, bearer):
                raise AuthenticationError("the envelope's auth is not the credential of the request")
            with self.sessions() as session, session.begin():
                device = devices.authenticate(session, self.hasher, envelope.auth, envelope.device_id)
                now = self.clock()
                devices.note_seen(device, envelope, now)
                if leaf == UP_REPORTED:
                    devices.note_reported(device, envelope, now)
                    return None
                if leaf != UP_RESULTS:
                    return None  # a heartbeat: last seen (and the model it runs) is all it says
                result_id = results.store(session, device, envelope, len(payload), now)
                new = result_id is not None
                if new:
                    self._after_store(session, device, envelope, result_id, now)
                org_id = device.org_id
                item = self._item(envelope, results.model_of(device, envelope), now) if new else None
        except AuthenticationError as error:
            self._reject("unauthorized", source, error, topic_device or envelope.device_id)
            raise
        if item is not None:
            self.subscribers.publish(org_id, item)
        return ResultAck(
            device_id=envelope.device_id, seq=envelope.seq, status="stored" if new else "duplicate"
        )

    def _after_store(
        self, session: Any, device: EdgeDevice, envelope: Any, result_id: int, now: float
    ) -> None:
        """What a new result sets off, in its own transaction: a rollout's word from the device, an image part,
        and the webhook deliveries it owes."""
        if envelope.kind == KIND_STATUS and "rollout_id" in envelope.body:
            rollouts.note_status(session, device, envelope.body, now)
        elif envelope.kind == KIND_IMAGE:
            requests.take_part(session, device, envelope, now)
        if webhooks.enqueue(session, device.org_id, result_id, envelope.kind, now):
            self.webhooks_due.set()

    def receive_quietly(self, leaf: str, payload: bytes, topic_device: str) -> bool:
        """`receive` for the bridge: True when the message is settled (handled, or refused for good and already
        counted and logged), False when it failed for a reason of ours (the database down): then the bridge
        does not acknowledge it, and the broker delivers it again after a reconnect."""
        try:
            self.receive(leaf, payload, topic_device=topic_device)
        except CumuloError:
            pass
        except Exception:
            self._reject("failed", topic_device, None, None)
            log.exception("edge message from %s could not be handled; left unacknowledged", topic_device)
            return False
        return True

    @staticmethod
    def _item(envelope: Any, model: dict[str, Any] | None, now: float) -> dict[str, Any]:
        return {
            "object": "edge.result",
            "device_id": envelope.device_id,
            "seq": envelope.seq,
            "kind": envelope.kind,
            "time": envelope.time.timestamp(),
            "received_at": now,
            "model": model,
            "body": envelope.body,
        }

    def refuse_topic(self, topic: str) -> None:
        """A message on a topic that names no device leaf (the bridge's filter lets few through)."""
        self._reject("topic", topic[:80], InvalidRequest("not an edge topic"), None)

    def _reject(self, reason: str, source: str, error: Exception | None, device_id: str | None) -> None:
        """Counts a refused message by reason (here and in Prometheus) and, when it names a device, against that
        device (written to its row on the next pass, for `cumulo edge devices`); logs once per reason and source."""
        if self.metrics is not None:
            self.metrics.edge_refused.labels(reason=reason).inc()
        with self._lock:
            self.rejected[reason] += 1
            key = (device_id or "", reason)
            if device_id and (
                key in self._refused_by_device or len(self._refused_by_device) < MAX_REFUSING_DEVICES
            ):
                self._refused_by_device[key] += 1
            first = (reason, source) not in self._logged
            if first and len(self._logged) < 10_000:
                self._logged.add((reason, source))
        if first:
            log.warning(
                "edge message from %s refused (%s): %s; further ones are counted only", source, reason, error
            )

    # -- the periodic pass ---------------------------------------------------------------------------------
    def tick(self) -> None:
        """Moves rollouts along, then publishes every desired state not yet published (also those written by
        the command line or another gateway)."""
        with self.sessions() as session, session.begin():
            for rollout in rollouts.evaluate(session, self.clock()):
                log.info("edge rollout %d: %s (%s)", rollout.id, rollout.state, rollout.reason or "healthy")
        self.flush_refused()
        self.publish_pending()

    def flush_refused(self) -> None:
        """Adds the refusals counted since the last pass to each named device's row (devices that exist)."""
        with self._lock:
            counts, self._refused_by_device = self._refused_by_device, Counter()
        if not counts:
            return
        with self.sessions() as session, session.begin():
            names = sorted({name for name, _ in counts})
            for device in session.scalars(select(EdgeDevice).where(EdgeDevice.device_id.in_(names))):
                refused = dict(device.refused or {})
                for (name, reason), count in counts.items():
                    if name == device.device_id:
                        refused[reason] = refused.get(reason, 0) + count
                device.refused = refused

    def deliver_webhooks(self, client: Any) -> webhooks.Outcome:
        """One round of due webhook deliveries (an `httpx.Client`), counted in Prometheus by outcome."""
        outcome = webhooks.deliver_due(self.sessions, self.clock(), client=client)
        if self.metrics is not None:
            for name in ("delivered", "retried", "failed"):
                if count := getattr(outcome, name):
                    self.metrics.edge_webhooks.labels(outcome=name).inc(count)
        return outcome

    def publish_pending(self) -> int:
        publisher = self.publisher
        if publisher is None:
            return 0
        with self.sessions() as session, session.begin():
            pending = session.scalars(
                select(EdgeDevice).where(EdgeDevice.desired_revision > EdgeDevice.published_revision)
            ).all()
            for device in pending:
                state = devices.desired_state(device)
                publisher(
                    topic_for(device.device_id, DOWN_DESIRED, self.topic_root),
                    state.model_dump_json().encode(),
                    True,  # retained: a device that connects later still learns what it should run
                )
                device.published_revision = device.desired_revision
            now = self.clock()
            asks = requests.due(session, now, self.request_resend_seconds)
            for row, device_id, message in asks:
                topic = topic_for(device_id, DOWN_REQUESTS, self.topic_root)
                publisher(topic, message.model_dump_json().encode(), False)  # never retained
                row.published_at = now
        return len(pending) + len(asks)
