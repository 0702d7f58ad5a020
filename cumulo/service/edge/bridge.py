"""The MQTT bridge: subscribes to every device's `up/...` topics on the broker, hands each message to the fleet,
and publishes desired states (retained, QoS 1) and requests (QoS 1, not retained).

Exactly once, end to end: the bridge acknowledges a QoS 1 message to the broker (PUBACK) only after the fleet
has committed it, and keeps a persistent session (MQTT 5, `clean_start=False`, a session expiry), so messages
that arrive while the gateway restarts wait on the broker; whatever is delivered twice is deduplicated by
(device, seq). Several gateways share the work through one shared subscription (`$share/...`).

The device deletes a result on the broker's PUBACK, so the broker must not drop it on the way to the bridge.
Mosquitto queues at most `max_queued_messages` (1000) per subscriber beyond those in flight and drops the rest
silently: a backlog drained after an outage lost a third of its results that way (bench/edge/fleet.py). The
bridge therefore asks for MQTT 5's largest Receive Maximum (65535 in flight, held in its queue until committed);
a fleet whose backlogs together can exceed that needs the broker's `max_queued_messages` raised (docs/edge.md).

paho runs its network loop in a thread of its own; messages go through a queue to one worker thread that does
the database work, so a slow database never stalls keep-alives.
"""

from __future__ import annotations

import logging
import queue
import threading
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cumulo.contracts.edge import parse_topic
from cumulo.errors import InvalidRequest
from cumulo.service.edge.fleet import EdgeFleet

log = logging.getLogger("cumulo.service.edge")
SHARE_GROUP = "cumulo-gateways"
RECEIVE_MAXIMUM = 65535  # QoS 1 messages the broker may have in flight to the bridge (the most MQTT allows)


def broker_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise InvalidRequest(f"edge MQTT URL must look like mqtt://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port or 1883


class MqttBridge:
    def __init__(
        self, fleet: EdgeFleet, url: str, client_id: str, session_expiry: int = 3600, shared: bool = True
    ) -> None:
        self.fleet = fleet
        self.host, self.port = broker_address(url)
        self.session_expiry = session_expiry
        self.filter = f"{fleet.topic_root}/+/up/#"
        if shared:
            self.filter = f"$share/{SHARE_GROUP}/{self.filter}"
        self.connected = threading.Event()
        self._inbox: queue.Queue = queue.Queue()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name="edge-bridge", daemon=True)

    def start(self) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.session_expiry
        properties.ReceiveMaximum = RECEIVE_MAXIMUM
        self._worker.start()
        self._client.connect_async(
            self.host, self.port, keepalive=30, clean_start=False, properties=properties
        )
        self._client.loop_start()
        self.fleet.publisher = self.publish

    def stop(self) -> None:
        self.fleet.publisher = None
        self._client.disconnect()
        self._client.loop_stop()
        self._inbox.put(None)
        self._worker.join(timeout=10)

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain)

    def _on_connect(
        self, client: mqtt.Client, _userdata: object, _flags: object, reason: object, _p: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("edge MQTT broker %s:%d refused the bridge: %s", self.host, self.port, reason)
            return
        client.subscribe(self.filter, qos=1)  # again after every reconnect; the broker keeps the session
        self.connected.set()

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        self._inbox.put((message.topic, message.payload, message.mid, message.qos))

    def _work(self) -> None:
        while (item := self._inbox.get()) is not None:
            topic, payload, mid, qos = item
            try:
                device_id, leaf = parse_topic(topic, self.fleet.topic_root)
            except InvalidRequest:
                self.fleet.refuse_topic(topic)
            else:
                if not self.fleet.receive_quietly(leaf, payload, device_id):
                    continue  # not acknowledged: the broker delivers it again when the bridge reconnects
            if qos > 0:
                self._client.ack(mid, qos)  # after the commit: a crash before it means the broker re-sends
