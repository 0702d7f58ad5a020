"""Tables of the edge fleet, on the service's `Base` so one migration history covers them (0004, 0006).

Times are epoch seconds (float) from the fleet's clock, as in the rest of the service. A device's `device_id`
is unique across organisations because it is a level of the MQTT topics every device shares; everything else
is read through the organisation that owns the device.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from cumulo.service.db import Base


class EdgeDevice(Base):
    """A camera or sensor of an organisation. Secrets are kept only as keyed hashes (as API keys are): the
    one-time enrolment token until it is used, then the device credential."""

    __tablename__ = "edge_devices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    device_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    token_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    credential_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    enrolled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    reported: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {"model", "body", "at"}
    desired_model: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # a DesiredModel
    desired_config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    desired_rollout: Mapped[int | None] = mapped_column(Integer, nullable=True)
    desired_revision: Mapped[int] = mapped_column(Integer, default=0)
    # The revision last published to the broker: the bridge publishes whenever desired_revision is ahead, so a
    # change made by the command line or another gateway reaches the device too.
    published_revision: Mapped[int] = mapped_column(Integer, default=0)
    # The model this device last ran as part of a completed rollout (or got on joining the fleet): what a failed
    # rollout sends it back to. Per device, because devices enrolled at different times ran different models.
    good_model: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    refused: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)  # refused messages by reason
    # A chip id of the catalog (imx500, rpi5, ...): given at creation or in the device's reported state; a
    # rollout's package is checked against every class it targets (`app.state.edge_fit_check`).
    device_class: Mapped[str | None] = mapped_column(String(64), nullable=True)


class EdgeResult(Base):
    """One result envelope as it arrived; (device, seq) is unique, which is what makes a re-send harmless."""

    __tablename__ = "edge_results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    device: Mapped[int] = mapped_column(ForeignKey("edge_devices.id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    time: Mapped[float] = mapped_column(Float)  # when the device made it (its clock)
    received_at: Mapped[float] = mapped_column(Float)  # the fleet's clock
    model: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    size: Mapped[int] = mapped_column(Integer)  # bytes of the envelope as received (metered)

    __table_args__ = (
        UniqueConstraint("device", "seq", name="uq_edge_results_device_seq"),
        Index("ix_edge_results_org_time", "org_id", "time"),
        Index("ix_edge_results_device_time", "device", "time"),
    )


class EdgeUsage(Base):
    """Messages and bytes per device and month: counted in the transaction that stores the result, only when
    it was new, so a re-send is never metered twice."""

    __tablename__ = "edge_usage"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    device: Mapped[int] = mapped_column(ForeignKey("edge_devices.id"))
    month: Mapped[str] = mapped_column(String(7))  # "YYYY-MM"
    messages: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (UniqueConstraint("device", "month", name="uq_edge_usage_device_month"),)


class EdgeRollout(Base):
    """A model pushed to an organisation's devices in stages: canaries first, the rest after a healthy window,
    back to `previous_model` (the last good one) when a canary fails. Rows are never deleted: the history."""

    __tablename__ = "edge_rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    model: Mapped[dict[str, Any]] = mapped_column(JSON)  # a DesiredModel
    previous_model: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    canary_share: Mapped[float] = mapped_column(Float)
    window_seconds: Mapped[float] = mapped_column(Float)  # canaries must stay healthy this long
    silence_seconds: Mapped[float] = mapped_column(Float)  # a canary without a heartbeat this long failed
    canaries: Mapped[list[int]] = mapped_column(JSON)  # device row ids
    rest: Mapped[list[int]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))  # canary | completed | rolled_back
    reason: Mapped[str | None] = mapped_column(String(512), nullable=True)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{"at", "event", "detail"}]
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class EdgeRequest(Base):
    """A one-off ask to a device (an image of what its camera sees now). Published on the device's
    down/requests topic by the next pass after it is made; the image parts the device answers with are stored
    as results like any other, and the whole JPEG is kept here once every part has arrived."""

    __tablename__ = "edge_requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    device: Mapped[int] = mapped_column(ForeignKey("edge_devices.id"))
    kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    published_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    answered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    image: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # the JPEG, once complete


class EdgeWebhook(Base):
    """An organisation's receiver of results of some kinds. The secret signs each delivery (HMAC-SHA256), so
    it is kept as given: a keyed hash of it could not sign anything."""

    __tablename__ = "edge_webhooks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    webhook_id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128))
    kinds: Mapped[list[str]] = mapped_column(JSON)  # empty: every kind
    created_at: Mapped[float] = mapped_column(Float)
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class EdgeDelivery(Base):
    """One result owed to one webhook: written in the transaction that stores the result, so a result is never
    stored without its deliveries (at least once, even across a gateway crash), and deleted by nobody."""

    __tablename__ = "edge_deliveries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    webhook: Mapped[int] = mapped_column(ForeignKey("edge_webhooks.id"))
    result: Mapped[int] = mapped_column(ForeignKey("edge_results.id"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # None once delivered or given up
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(512), nullable=True)

    __table_args__ = (
        UniqueConstraint("webhook", "result", name="uq_edge_deliveries_webhook_result"),
        Index("ix_edge_deliveries_next_at", "next_at"),
    )
