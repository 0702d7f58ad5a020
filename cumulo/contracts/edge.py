"""The edge protocol: what a device and the fleet side of the service say to each other (issue #15).

Both ends import this module, the agent (`cumulo.edge`) and the service (`cumulo.service.edge`), so the topics,
the envelope and its limits are written once. It sits in the bottom layer and imports only pydantic and
`cumulo.errors`.

Transport. Over MQTT a device publishes on `cumulo/v1/devices/{device_id}/up/{results,heartbeat,reported}` and
subscribes to `.../down/desired` (retained, QoS 1) and `.../down/requests`. Over HTTP, the fallback, the same
envelope JSON (one, or a list) is POSTed to `/v1/edge/results` and the desired state is read from
`GET /v1/edge/desired`, with the device credential as `Authorization: Bearer`. Every upward MQTT message carries
that same credential in its envelope's `auth`, because an anonymous broker cannot tell devices apart.

Exactly once. A device numbers its messages with `seq`, strictly increasing across restarts (its outbox
persists the counter), and re-sends until acknowledged; the service keeps one result per (device_id, seq) and
acknowledges a re-sent one without storing it again. Only `up/results` is deduplicated: heartbeats and
reported state are the latest wins.

Which model made a result. Heartbeats and reported state carry the full `model` (name, version, sha256); a
result carries only `mid`, the first `MODEL_ID_CHARS` hex digits of that sha256 (the full reference was 115 of
a result's 327 bytes), except the first result of each model on a connection, which carries the full `model`
(reported state travels on another topic, unordered with the results). The service stores each result with the full reference of the device's model whose
sha256 begins with `mid` (reported, desired or last good), or `{"mid": ...}` when it knows none yet. A result
with a full `model` (older agents) is stored as before. Fields that are None are left out of the JSON.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cumulo.errors import InvalidRequest

PROTOCOL_VERSION = 1
MAX_ENVELOPE_BYTES = 64 * 1024  # one result message; images asked for by a request are sent in parts below it
MAX_BATCH = 100  # envelopes in one HTTP POST
TOPIC_ROOT = "cumulo/v1/devices"

# topic leaves under cumulo/v1/devices/{device_id}/
UP_RESULTS = "up/results"  # device -> server, QoS 1, deduplicated by (device_id, seq)
UP_HEARTBEAT = "up/heartbeat"  # device -> server, QoS 0 or 1, updates last-seen
UP_REPORTED = "up/reported"  # device -> server, QoS 1: the model it runs and its state
DOWN_DESIRED = "down/desired"  # server -> device, retained, QoS 1: a DesiredState
DOWN_REQUESTS = "down/requests"  # server -> device, QoS 1: a DeviceRequest (e.g. send one image)
UP_LEAVES = (UP_RESULTS, UP_HEARTBEAT, UP_REPORTED)
DOWN_LEAVES = (DOWN_DESIRED, DOWN_REQUESTS)

# kinds of envelope; results may use other lower-case kinds too (the edge app names its own)
KIND_EVENT = "event"  # body: {"type": "slot_empty", "slot": 4, ...}
KIND_COUNT = "count"  # body: {"label": "bottle", "count": 12}
KIND_DETECTIONS = "detections"  # body: {"detections": [{"label", "score", "box": [x0, y0, x1, y1]}]}
KIND_STATUS = "status"  # body: {"ok": bool, "error": str | None}; an error counts against a canary rollout
KIND_IMAGE = "image"  # body: {"request_id", "part", "parts", "jpeg_b64"}: only when the server asked for one
KIND_HEARTBEAT = "heartbeat"  # on up/heartbeat; body: {"uptime_s": float, ...}
KIND_REPORTED = "reported"  # on up/reported; body: {"state": "running"|"downloading"|"failed", "error": ...}

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # no '/', '+', '#': it is a topic level
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MODEL_ID_CHARS = 12  # a result's `mid`: 48 bits of the sha256, unique among the few models a fleet runs
MODEL_ID_PATTERN = r"^[0-9a-f]{8,64}$"
KIND_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"


class ModelRef(BaseModel):
    """Which model produced a result or runs on a device: the sha256 is what a rollout compares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    sha256: str = Field(max_length=64, pattern=SHA256_PATTERN)


class DesiredModel(ModelRef):
    """A model the device should run, and where to fetch it (the device checks the sha256 before use)."""

    url: str = Field(min_length=1, max_length=2048)


class Envelope(BaseModel):
    """Every message a device sends, over MQTT or HTTP alike."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = PROTOCOL_VERSION
    device_id: str = Field(max_length=64, pattern=DEVICE_ID_PATTERN)
    seq: int = Field(ge=0, lt=2**63)
    time: datetime  # RFC 3339 with an offset, when the device made it
    kind: str = Field(max_length=32, pattern=KIND_PATTERN)
    model: ModelRef | None = None
    mid: str | None = Field(default=None, pattern=MODEL_ID_PATTERN)  # a result's model: sha256 prefix
    body: dict[str, Any] = Field(default_factory=dict)
    auth: str = Field(min_length=1, max_length=256)  # the device credential, as the HTTP Bearer

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("time must carry a UTC offset (RFC 3339)")
        return value

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def wire(self) -> dict[str, Any]:
        """The JSON object sent over HTTP: the same fields as `to_bytes`."""
        return self.model_dump(mode="json", exclude_none=True)


def model_id(sha256: str) -> str:
    """The short model id a result carries (`Envelope.mid`) for a model with this sha256."""
    return sha256[:MODEL_ID_CHARS]


class DesiredState(BaseModel):
    """What the service wants a device to run; retained on down/desired and served by GET /v1/edge/desired."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = PROTOCOL_VERSION
    device_id: str = Field(max_length=64, pattern=DEVICE_ID_PATTERN)
    revision: int = Field(ge=0)  # grows with every change, so a device can ignore a stale retained message
    model: DesiredModel | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    rollout_id: int | None = None


class DeviceRequest(BaseModel):
    """A one-off ask from the service on down/requests; images leave a device only this way."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = PROTOCOL_VERSION
    id: str = Field(min_length=1, max_length=64)
    kind: Literal["image"]
    reason: str | None = Field(default=None, max_length=256)


class EnrollRequest(BaseModel):
    """POST /v1/edge/enroll: a device trades its one-time token for a credential (once)."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=256)


class EnrollResponse(BaseModel):
    device_id: str
    credential: str  # shown once; the service keeps only its keyed hash
    topic_root: str = TOPIC_ROOT
    mqtt_url: str | None = None  # the broker the service bridges, if any


class ResultAck(BaseModel):
    """The answer to POST /v1/edge/results: per envelope, stored now or already stored before."""

    device_id: str
    seq: int
    status: Literal["stored", "duplicate"]


class ResultsAck(BaseModel):
    acks: list[ResultAck]


def now() -> datetime:
    return datetime.now(UTC)


def topic_for(device_id: str, leaf: str, root: str = TOPIC_ROOT) -> str:
    """The MQTT topic of one device's leaf; `root` lets tests and brokers shared by fleets keep apart."""
    if leaf not in UP_LEAVES + DOWN_LEAVES:
        raise InvalidRequest(f"unknown edge topic leaf {leaf!r}")
    return f"{root}/{device_id}/{leaf}"


def parse_topic(topic: str, root: str = TOPIC_ROOT) -> tuple[str, str]:
    """(device_id, leaf) of a topic under `root`; InvalidRequest for anything else."""
    prefix = root + "/"
    rest = topic[len(prefix) :] if topic.startswith(prefix) else ""
    device_id, _, leaf = rest.partition("/")
    if not device_id or leaf not in UP_LEAVES + DOWN_LEAVES:
        raise InvalidRequest(f"not an edge topic: {topic[:200]!r}")
    return device_id, leaf


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "envelope"
    return f"{where}: {first['msg']}"


def parse_envelope(data: bytes | str | dict[str, Any]) -> Envelope:
    """Validate one envelope; every way it can be wrong is an InvalidRequest with a one-line message."""
    if isinstance(data, dict):
        raw: Any = data
    else:
        size = len(data.encode() if isinstance(data, str) else data)
        if size > MAX_ENVELOPE_BYTES:
            raise InvalidRequest(f"envelope of {size} bytes is over the limit of {MAX_ENVELOPE_BYTES}")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidRequest(f"envelope is not JSON: {str(error)[:120]}") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("envelope must be a JSON object")
    try:
        return Envelope.model_validate(raw)
    except ValidationError as error:
        raise InvalidRequest(f"invalid envelope: {_one_line(error)}") from None
