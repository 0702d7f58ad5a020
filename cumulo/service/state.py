"""Everything a request handler needs, built once per process: settings, database, key hasher, labeler,
metrics and the served engines."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from cumulo.contracts import EngineClient
from cumulo.errors import ModelNotFound
from cumulo.service.auth import PrincipalCache
from cumulo.service.db import Database, open_database, session_factory
from cumulo.service.labels import Labeler, load_or_create_signing_key
from cumulo.service.metering import gateway_id, settle_interrupted
from cumulo.service.metrics import Metrics
from cumulo.service.migrate import upgrade
from cumulo.service.security import KeyHasher, load_or_create_secret
from cumulo.service.settings import Settings

T = TypeVar("T")


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

    async def db_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs short database work for a request. On SQLite the work is serialized by the database anyway and
        takes well under a millisecond, so it runs right here: a hop to the thread pool costs more than the
        work. On PostgreSQL, where transactions of different keys run in parallel and may wait on row locks,
        it runs in the thread pool so the event loop never waits."""
        if self.db.dialect.name == "sqlite":
            return fn(*args, **kwargs)
        return await run_in_threadpool(fn, *args, **kwargs)

    def engine_for(self, model: str) -> EngineClient:
        engine = self.engines.get(model)
        if engine is None:
            raise ModelNotFound(f"the model {model!r} does not exist or is not served here")
        return engine


def build_state(settings: Settings, engines: dict[str, EngineClient]) -> ServiceState:
    """Opens (and migrates) the database, loads the secrets from the data directory, settles requests that a
    dead gateway left in progress."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(settings.database_url)
    upgrade(db)
    sessions = session_factory(db)
    settle_interrupted(db, settings.max_request_seconds)
    now = time.time()
    labeler = Labeler(load_or_create_signing_key(settings.data_dir), settings.provider, settings.service_name)
    return ServiceState(
        settings=settings,
        db=db,
        sessions=sessions,
        hasher=KeyHasher(load_or_create_secret(settings.data_dir)),
        labeler=labeler,
        engines=dict(engines),
        gateway=gateway_id(now),
        started_at=now,
    )
