"""Sending the outbox: MQTT with QoS 1 (paho-mqtt), and HTTP as the fallback.

MQTT. Each connection gets a fresh paho client with a clean session: the outbox, not paho's memory, is the
session, so after a reconnect the whole unacknowledged backlog is published again in seq order (paho would
otherwise re-send its own in-flight copies too). A result is removed from the outbox only in `pump()`, after its
PUBACK: paho calls `on_publish` on its network thread while holding its own lock, so the callback only queues
the message id and the agent's thread does the rest. A result whose PUBACK was lost with the connection is sent
again; the service keeps one per (device_id, seq).

HTTP. `POST /v1/edge/results` with a batch of envelopes and the credential as Bearer; a 2xx removes the batch.
The agent falls back to it when no broker is configured, or the broker has been out of reach for
`fallback_after` seconds. Enrolment and the desired state are plain HTTP calls on the same server.
"""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from cumulo.contracts.edge import (
    DOWN_DESIRED,
    DOWN_REQUESTS,
    MAX_BATCH,
    TOPIC_ROOT,
    UP_RESULTS,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    Envelope,
    ModelRef,
    model_id,
    parse_topic,
    topic_for,
)
from cumulo.edge.outbox import Outbox, Pending
from cumulo.errors import AuthenticationError, CumuloError, InvalidRequest


def envelope(item: Pending, device_id: str, credential: str, announced: set[str] | None = None) -> Envelope:
    """The wire form of a stored result; the credential is added at send time so a re-issued one applies.
    A result names its model by `mid` only, except the first one of each model on a link (`announced` holds
    the sha256s already sent in full on it): the service then knows the model even before the device's
    reported state arrives (another topic, not ordered with the results)."""
    sha256 = (item.model or {}).get("sha256")
    full = sha256 is not None and announced is not None and sha256 not in announced
    if full:
        announced.add(sha256)
    return Envelope(
        device_id=device_id,
        seq=item.seq,
        time=item.time,
        kind=item.kind,
        model=ModelRef(**item.model) if full else None,
        mid=model_id(sha256) if sha256 and not full else None,
        body=item.body,
        auth=credential,
    )


def mqtt_address(url: str) -> tuple[str, int]:
    """host and port of `mqtt://host[:port]` (or `tcp://`); a bare `host:port` works too."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise InvalidRequest(f"not an MQTT broker URL: {url!r} (expected mqtt://host:port)")
    try:
        return parts.hostname, parts.port or 1883
    except ValueError:
        raise InvalidRequest(f"not an MQTT broker URL: {url!r} (bad port)") from None


class HttpLink:
    """The service's device endpoints, over the standard library only (the agent stays light)."""

    def __init__(self, server: str, timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None, credential: str | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if credential:
            request.add_header("Authorization", f"Bearer {credential}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode(errors="replace")
            if error.code in (401, 403):
                raise AuthenticationError(f"{self.server} refused the device: {detail}") from None
            raise CumuloError(f"{method} {path} failed with HTTP {error.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise CumuloError(f"cannot reach {self.server}: {reason}") from None
        return json.loads(raw) if raw else None

    def enroll(self, token: str) -> EnrollResponse:
        return EnrollResponse.model_validate(
            self._call("POST", "/v1/edge/enroll", EnrollRequest(token=token).model_dump())
        )

    def desired(self, credential: str) -> DesiredState | None:
        data = self._call("GET", "/v1/edge/desired", credential=credential)
        return DesiredState.model_validate(data) if data else None

    def post_results(self, envelopes: list[Envelope], credential: str) -> None:
        self._call("POST", "/v1/edge/results", [e.wire() for e in envelopes], credential)

    def post_latest(self, leaf: str, message: Envelope, credential: str) -> None:
        """A heartbeat or reported state (`up/heartbeat` -> POST /v1/edge/heartbeat)."""
        self._call("POST", f"/v1/edge/{leaf.removeprefix('up/')}", [message.wire()], credential)


@dataclass
class MqttLink:
    """One broker connection at a time; `pump()` (the agent's thread) publishes and settles acknowledgements."""

    url: str
    device_id: str
    credential: str
    outbox: Outbox
    on_message: Callable[[str, bytes], None]  # (leaf, payload) of down/desired and down/requests
    topic_root: str = TOPIC_ROOT
    window: int = 50  # results in flight at once
    retry_s: float = 1.0
    _client: mqtt.Client | None = None
    _connected: bool = False
    _inflight: dict[int, int] = field(default_factory=dict)  # paho mid -> seq, for the current connection
    _sent_upto: int = 0
    _announced: set[str] = field(default_factory=set)  # models sent in full on the current connection
    _events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    _next_try: float = 0.0
    down_since: float = field(default_factory=time.monotonic)
    error: str | None = None

    def __post_init__(self) -> None:
        self.host, self.port = mqtt_address(self.url)

    @property
    def connected(self) -> bool:
        return self._connected

    def _start(self) -> None:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"cumulo-edge-{self.device_id}", clean_session=True
        )
        client.max_inflight_messages_set(self.window)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(1, 4)  # while the broker is unreachable, paho tries again every 1-4 s
        # Callbacks run on paho's thread: they only queue what happened; pump() acts on it.
        client.on_connect = lambda c, u, flags, rc, props: self._events.put(("connect", rc))
        client.on_disconnect = lambda c, u, flags, rc, props: self._events.put(("disconnect", (c, rc)))
        client.on_publish = lambda c, u, mid, rc, props: self._events.put(("puback", mid))
        client.on_message = lambda c, u, msg: self._events.put(("message", (msg.topic, msg.payload)))
        try:
            client.connect_async(self.host, self.port, keepalive=15)
            client.loop_start()
        except (OSError, ValueError) as error:
            self.error = f"cannot reach the broker {self.host}:{self.port}: {error}"
            self._next_try = time.monotonic() + self.retry_s
            return
        self._client = client

    def _drop(self, why: str) -> None:
        """Forget the connection; the unacknowledged backlog goes out again on the next one."""
        client, self._client = self._client, None
        if client is not None:
            client.loop_stop()
            client.disconnect()
        if self._connected:
            self.down_since = time.monotonic()
        self._connected = False
        self._inflight.clear()
        self._sent_upto = 0
        self._announced.clear()
        self.error = why
        self._next_try = time.monotonic() + self.retry_s

    def _settle(self) -> None:
        acked = []
        while True:
            try:
                what, data = self._events.get_nowait()
            except queue.Empty:
                break
            if what == "puback":
                seq = self._inflight.pop(data, None)
                if seq is not None:
                    acked.append(seq)
            elif what == "connect":
                if data.is_failure:
                    self._drop(f"the broker refused the connection: {data}")
                else:
                    self._connected, self.error = True, None
                    for leaf in (DOWN_DESIRED, DOWN_REQUESTS):
                        self._client.subscribe(topic_for(self.device_id, leaf, self.topic_root), qos=1)
            elif what == "disconnect":
                if data[0] is self._client:
                    self._drop(f"lost the broker: {data[1]}")
            elif what == "message":
                topic, payload = data
                self.on_message(parse_topic(topic, self.topic_root)[1], payload)
        self.outbox.ack(*acked)

    def pump(self) -> int:
        """Settle acknowledgements and messages, (re)connect when due, publish what the window allows.
        Returns how many results were published."""
        if self._client is None and time.monotonic() >= self._next_try:
            self._start()
        self._settle()
        if not self._connected:
            return 0
        room = self.window - len(self._inflight)
        sent = 0
        if room > 0:
            topic = topic_for(self.device_id, UP_RESULTS, self.topic_root)
            for item in self.outbox.pending(after=self._sent_upto, limit=room):
                payload = envelope(item, self.device_id, self.credential, self._announced).to_bytes()
                info = self._client.publish(topic, payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    self._drop(f"publish failed: {mqtt.error_string(info.rc)}")
                    break
                self._inflight[info.mid] = item.seq
                self._sent_upto = item.seq
                sent += 1
        return sent

    def publish(self, leaf: str, payload: bytes, qos: int = 0) -> bool:
        """A message outside the outbox (heartbeat, reported state): sent if connected, else skipped."""
        if not self._connected or self._client is None:
            return False
        return (
            self._client.publish(topic_for(self.device_id, leaf, self.topic_root), payload, qos=qos).rc == 0
        )

    def close(self) -> None:
        self._settle()
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
            self._client = None
        self._connected = False


class Sender:
    """MQTT when a broker is configured and reachable, HTTP when not (after `fallback_after` seconds)."""

    def __init__(
        self,
        outbox: Outbox,
        device_id: str,
        credential: str,
        server: str | None,
        mqtt_url: str | None,
        on_message: Callable[[str, bytes], None],
        topic_root: str = TOPIC_ROOT,
        fallback_after: float = 10.0,
        retry_s: float = 1.0,
    ) -> None:
        self.outbox, self.device_id, self.credential = outbox, device_id, credential
        self.http = HttpLink(server) if server else None
        self.mqtt = (
            MqttLink(mqtt_url, device_id, credential, outbox, on_message, topic_root, retry_s=retry_s)
            if mqtt_url
            else None
        )
        self.fallback_after, self.retry_s = fallback_after, retry_s
        self._http_next = 0.0
        self._http_announced: set[str] = set()  # models sent in full over HTTP since the start
        self.http_error: str | None = None

    def _use_http(self) -> bool:
        if self.http is None or time.monotonic() < self._http_next:
            return False
        return self.mqtt is None or (
            not self.mqtt.connected and time.monotonic() - self.mqtt.down_since >= self.fallback_after
        )

    def pump(self) -> int:
        sent = self.mqtt.pump() if self.mqtt else 0
        if self._use_http():
            items = self.outbox.pending(limit=MAX_BATCH)
            if items:
                announced = set(self._http_announced)  # kept only when the batch is acknowledged
                try:
                    self.http.post_results(
                        [envelope(i, self.device_id, self.credential, announced) for i in items],
                        self.credential,
                    )
                except CumuloError as error:
                    self.http_error = str(error)
                    self._http_next = time.monotonic() + self.retry_s
                else:
                    self.http_error = None
                    self._http_announced = announced
                    self.outbox.ack(*(i.seq for i in items))
                    sent += len(items)
        return sent

    def publish(self, leaf: str, message: Envelope, qos: int = 0) -> bool:
        """Heartbeats and reported state: over MQTT when connected, else over HTTP when it is due; a message
        that cannot go now is skipped (the next one says the same, newer)."""
        if self.mqtt and self.mqtt.publish(leaf, message.to_bytes(), qos):
            return True
        if not self._use_http():
            return False
        try:
            self.http.post_latest(leaf, message, self.credential)
        except CumuloError as error:
            self.http_error = str(error)
            self._http_next = time.monotonic() + self.retry_s
            return False
        return True

    @property
    def error(self) -> str | None:
        return (self.mqtt.error if self.mqtt else None) or self.http_error

    def close(self) -> None:
        if self.mqtt:
            self.mqtt.close()
