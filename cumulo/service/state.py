"""Everything a request handler needs, built once per process: settings, database, key hasher, labeler,
metrics and the served engines; and the loop that keeps this gateway's side of the shared ledger."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from cumulo.contracts import EngineClient
from cumulo.errors import ModelNotFound
from cumulo.service.auth import PrincipalCache
from cumulo.service.db import Database, open_database, session_factory
from cumulo.service.labels import Labeler, load_or_create_signing_key
from cumulo.service.metering import Checkpoints, beat, gateway_id, leave, settle_interrupted
from cumulo.service.metrics import Metrics
from cumulo.service.migrate import upgrade
from cumulo.service.security import KeyHasher, load_or_create_secret
from cumulo.service.settings import Settings

T = TypeVar("T")
log = logging.getLogger("cumulo.service")


@dataclass
class ServiceState:
    settings: Settings
    db: Database
    sessions: sessionmaker
    hasher: KeyHasher
    labeler: Labeler
    engines: dict[str, EngineClient]
    gateway: str
    metrics: Metrics = field(default_factory=Metrics)
    principals: PrincipalCache = field(default_factory=PrincipalCache)
    started_at: float = field(default_factory=time.time)
    checkpoints: Checkpoints = field(default_factory=Checkpoints)

    async def db_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs short database work for a request. On SQLite the work is serialized by the database anyway and
        takes well under a millisecond, so it runs right here: a hop to the thread pool costs more than the
        work. On PostgreSQL, where transactions of different keys run in parallel and may wait on row locks,
        it runs in the thread pool so the event loop never waits."""
        if self.db.dialect.name == "sqlite":
            return fn(*args, **kwargs)
        return await run_in_threadpool(fn, *args, **kwargs)

    async def write_checkpoints(self) -> None:
        """The heartbeat and the delivered tokens of every stream that moved since the last write."""
        batch = self.checkpoints.due()
        if not await self.db_call(beat, self.db, self.gateway, batch):
            log.warning(
                "gateway %s had no heartbeat row; its rows may have been settled as lost", self.gateway
            )
        self.checkpoints.done(batch)

    async def keep_ledger(self) -> None:
        """Runs while the gateway serves: checkpoints every `checkpoint_seconds`, settles dead gateways' rows
        every `recovery_seconds`. A database error is logged and tried again next period."""
        settings = self.settings
        next_recovery = time.monotonic() + settings.recovery_seconds
        while True:
            await asyncio.sleep(settings.checkpoint_seconds)
            try:
                await self.write_checkpoints()
                if time.monotonic() >= next_recovery:
                    next_recovery = time.monotonic() + settings.recovery_seconds
                    settled = await self.db_call(
                        settle_interrupted,
                        self.db,
                        settings.max_request_seconds,
                        heartbeat_stale=settings.gateway_stale_seconds,
                    )
                    if settled:
                        log.warning("settled %d requests of dead gateways as interrupted", settled)
            except Exception:
                log.exception("could not write the heartbeat or settle dead gateways' requests")

    def engine_for(self, model: str) -> EngineClient:
        engine = self.engines.get(model)
        if engine is None:
            raise ModelNotFound(f"the model {model!r} does not exist or is not served here")
        return engine


def build_state(settings: Settings, engines: dict[str, EngineClient]) -> ServiceState:
    """Opens (and migrates) the database, loads the secrets from the data directory, writes this gateway's
    first heartbeat, settles requests that dead gateways left in progress."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(settings.database_url)
    upgrade(db)
    sessions = session_factory(db)
    now = time.time()
    gateway = gateway_id(now)
    beat(db, gateway, {})
    settle_interrupted(db, settings.max_request_seconds, heartbeat_stale=settings.gateway_stale_seconds)
    labeler = Labeler(load_or_create_signing_key(settings.data_dir), settings.provider, settings.service_name)
    return ServiceState(
        settings=settings,
        db=db,
        sessions=sessions,
        hasher=KeyHasher(load_or_create_secret(settings.data_dir)),
        labeler=labeler,
        engines=dict(engines),
        gateway=gateway,
        started_at=now,
    )


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """The app's lifespan: keeps the ledger while serving; on the way out a last checkpoint, and the heartbeat
    row goes unless requests of this gateway are still in progress (then peers settle them once it is stale)."""
    state: ServiceState = app.state.service
    keeper = asyncio.create_task(state.keep_ledger())
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        try:
            await state.write_checkpoints()
            await state.db_call(leave, state.db, state.gateway)
        except Exception:
            log.exception("could not write the last checkpoint of gateway %s", state.gateway)
