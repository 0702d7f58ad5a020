"""Tables of the service (SQLAlchemy 2) and how to open the database: SQLite by default, PostgreSQL by URL.

Times are stored as epoch seconds (float) so SQLite and PostgreSQL compare them the same way. Money is stored
as integer nano-dollars so ledgers sum exactly.
"""

from __future__ import annotations

import os
from typing import Any, TypeAlias

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

# SQLAlchemy calls its handle on a database (a connection pool and dialect) an Engine. In the service
# "engine" means an inference engine only, so the handle is a `Database`, and a `db` or `database` variable.
Database: TypeAlias = Engine


class Base(DeclarativeBase):
    pass


class Plan(Base):
    """A subscription: which models, how fast, how much per month, at what price (USD per million tokens)."""

    __tablename__ = "plans"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None = unlimited
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    monthly_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # None = every served model
    price_in: Mapped[float] = mapped_column(Float, default=0.0)
    price_out: Mapped[float] = mapped_column(Float, default=0.0)
    model_prices: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {model: [in, out]}
    explicit_label: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class Organization(Base):
    __tablename__ = "organizations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    email: Mapped[str] = mapped_column(String(256), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    """A key is a subscription seat: it belongs to an organisation, has a plan, and its limits count per key.

    Only the keyed hash of the secret is stored. The month counter lives on this row because every admission
    of this key locks the row anyway; it is what makes the monthly quota exact across gateway processes.
    """

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    prefix: Mapped[str] = mapped_column(String(32))  # first characters, safe to show in listings
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    quota_month: Mapped[str] = mapped_column(String(7), default="")  # "YYYY-MM" the counter belongs to
    month_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class ConsoleSignout(Base):
    """A console session ended by signing out, so a copied cookie value is refused too. Kept until the session
    would have expired anyway (`expires_at`), then pruned."""

    __tablename__ = "console_signouts"
    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class Usage(Base):
    """One row per request. Inserted at admission as 'in_progress' (its `billed_tokens` is the reservation),
    rewritten with the final counts in the transaction that settles the quota."""

    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    endpoint: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(256))
    seal: Mapped[str] = mapped_column(String(80), default="")
    device: Mapped[str] = mapped_column(String(64), default="")
    gateway: Mapped[str] = mapped_column(
        String(160), default=""
    )  # "host:pid:start" of the process serving it
    month: Mapped[str] = mapped_column(String(7))
    status: Mapped[str] = mapped_column(
        String(16)
    )  # in_progress|completed|aborted|error|interrupted|rejected
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    billed_tokens: Mapped[int] = mapped_column(Integer, default=0)  # reservation while in progress
    cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0)  # USD * 1e9
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft: Mapped[float | None] = mapped_column(Float, nullable=True)
    total_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    user: Mapped[str | None] = mapped_column(String(256), nullable=True)
    response: Mapped[str | None] = mapped_column(Text, nullable=True)  # stored for Idempotency-Key replays

    __table_args__ = (
        UniqueConstraint("key_id", "idempotency_key", name="uq_usage_key_idempotency"),
        Index("ix_usage_key_started", "key_id", "started_at"),
        Index("ix_usage_key_status", "key_id", "status"),
        # Recovery reads the rows in progress every few seconds: an index of those only, however long the ledger.
        Index(
            "ix_usage_in_progress",
            "gateway",
            postgresql_where=text("status = 'in_progress'"),
            sqlite_where=text("status = 'in_progress'"),
        ),
    )


class Gateway(Base):
    """A gateway serving from this database, by the heartbeat it writes every checkpoint period (metering).
    Times are the database's clock, so gateways on different hosts compare them on one clock."""

    __tablename__ = "gateways"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)  # the `gateway` of its usage rows
    started_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)


class Deployment(Base):
    """A model the pool should serve, and how: what `cumulo deploy` and POST /admin/deployments store.

    Undeploying keeps the row as state 'deleted' so that every gateway polling the table sees it go. Each write
    takes the next `generation` (one counter over the whole table, unique), so a controller polls
    max(generation) and rereads only when it moved.
    """

    __tablename__ = "deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(256), unique=True)  # the name clients call
    source: Mapped[str] = mapped_column(String(1024))  # catalog name, .gguf path or model directory
    replicas: Mapped[int] = mapped_column(Integer)  # replicas to start with
    min_replicas: Mapped[int] = mapped_column(Integer)
    max_replicas: Mapped[int] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(64), nullable=True)  # number format; None = as stored
    chip: Mapped[str | None] = mapped_column(String(128), nullable=True)  # catalog chip id; None = any
    ttft_slo_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tpot_slo_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    state: Mapped[str] = mapped_column(String(16))  # active|deleted
    generation: Mapped[int] = mapped_column(BigInteger, unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


def open_database(url: str) -> Database:
    """The database at `url`, opened so that its write transactions serialize correctly across processes.

    SQLite: every transaction starts with BEGIN IMMEDIATE (takes the write lock up front, so two gateways
    never both read a counter and both pass), WAL journal, a generous busy timeout.
    """
    if url.startswith("sqlite"):
        _create_private(make_url(url).database)
        database = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(database, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            # WAL + NORMAL: a commit survives kill -9 (it is in the WAL the OS holds); only a power cut can
            # lose the last few, and commits skip an fsync each, which is most of the gateway overhead.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(database, "begin")
        def _on_begin(conn: Any) -> None:
            conn.connection.dbapi_connection.execute("BEGIN IMMEDIATE")  # straight to sqlite3: hot path

        return database
    return create_engine(url, pool_size=10, max_overflow=30, pool_pre_ping=True)


def _create_private(path: str | None) -> None:
    """Usage rows hold stored responses: create the file owner-only (SQLite gives -wal/-shm the same mode)."""
    if not path or path == ":memory:" or os.path.exists(path):
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def session_factory(database: Database) -> sessionmaker:
    return sessionmaker(database, expire_on_commit=False)
