"""Fixtures of the service tests: every database test runs on SQLite and on the real PostgreSQL server.

PostgreSQL: one database per test session (dropped at the end); each test gets its own schema in it through
the connection's search_path, so tests never see each other's rows.
"""

from __future__ import annotations

import itertools
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

# Test modules import `tests.service.*` helpers; make that work however pytest was started.
if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cumulo.service.app import create_app  # noqa: E402
from cumulo.service.settings import Settings  # noqa: E402
from tests.service.fakes import FakeEngine  # noqa: E402
from tests.service.support import Service  # noqa: E402

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
_schemas = itertools.count()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    name = f"cumulo_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"{PG_SERVER}/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def fresh_pg_schema(database: str) -> str:
    schema = f"t{next(_schemas)}_{uuid.uuid4().hex[:6]}"
    engine = create_engine(database, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return f"{database}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cumulo.db'}"
    return fresh_pg_schema(request.getfixturevalue("pg_database"))


@pytest.fixture
def make_service(database_url: str, tmp_path: Path) -> Iterator:
    services: list[Service] = []

    def make(engines: dict | None = None, **settings: object) -> Service:
        engines = engines if engines is not None else {"fake-model": FakeEngine()}
        config = Settings(data_dir=tmp_path / "data", database_url=database_url, **settings)  # type: ignore[arg-type]
        app = create_app(config, engines)
        client = TestClient(app)
        client.__enter__()
        service = Service(client, app.state.service)
        services.append(service)
        return service

    yield make
    for service in services:
        service.client.__exit__(None, None, None)
        service.state.db.dispose()
