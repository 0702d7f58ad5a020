"""The schema: migrations build exactly the tables the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from cumulo.service.db import Base, open_database
from cumulo.service.migrate import upgrade


def test_migrations_match_the_models_and_can_run_twice(database_url):
    database = open_database(database_url)
    upgrade(database)
    upgrade(database)  # every start runs it: the second time is a no-op
    with database.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    database.dispose()
