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
    UP_REPORTED,
    UP_RESULTS,
    ResultAck,
    parse_envelope,
    topic_for,
)
from cumulo.errors import AuthenticationError, CumuloError, InvalidRequest
from cumulo.service.edge import devices, results, rollouts
from cumulo.service.edge.tables import EdgeDevice
from cumulo.service.security import KeyHasher

log = logging.getLogger("cumulo.service.edge")
Publisher = Callable[[str, bytes], None]  # (topic, payload) published retained with QoS 1


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
            self._reject("malformed", source, error)
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
                new = results.store(session, device, envelope, len(payload), now)
                org_id = device.org_id
                item = self._item(envelope, now) if new else None
        except AuthenticationError as error:
            self._reject("unauthorized", source, error)
            raise
        if item is not None:
            self.subscribers.publish(org_id, item)
        return ResultAck(
            device_id=envelope.device_id, seq=envelope.seq, status="stored" if new else "duplicate"
        )

    def receive_quietly(self, leaf: str, payload: bytes, topic_device: str) -> bool:
        """`receive` for the bridge: True when the message is settled (handled, or refused for good and already
        counted and logged), False when it failed for a reason of ours (the database down): then the bridge
        does not acknowledge it, and the broker delivers it again after a reconnect."""
        try:
            self.receive(leaf, payload, topic_device=topic_device)
        except CumuloError:
            pass
        except Exception:
            self._reject("failed", topic_device, None)
            log.exception("edge message from %s could not be handled; left unacknowledged", topic_device)
            return False
        return True

    @staticmethod
    def _item(envelope: Any, now: float) -> dict[str, Any]:
        return {
            "object": "edge.result",
            "device_id": envelope.device_id,
            "seq": envelope.seq,
            "kind": envelope.kind,
            "time": envelope.time.timestamp(),
            "received_at": now,
            "model": envelope.model.model_dump() if envelope.model else None,
            "body": envelope.body,
        }

    def _reject(self, reason: str, source: str, error: Exception | None) -> None:
        with self._lock:
            self.rejected[reason] += 1
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
        self.publish_pending()

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
                    topic_for(device.device_id, "down/desired", self.topic_root),
                    state.model_dump_json().encode(),
                )
                device.published_revision = device.desired_revision
        return len(pending)
