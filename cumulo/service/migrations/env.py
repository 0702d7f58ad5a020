"""Alembic environment of the service: runs on the connection handed over by `cumulo.service.migrate`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from cumulo.service.db import Base
from cumulo.service.edge import tables as _edge_tables  # noqa: F401  (registers the fleet's tables on Base)

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # plain `alembic` command line: build our own from the configured URL
        database = create_engine(config.get_main_option("sqlalchemy.url"))
        with database.connect() as connection:
            _run(connection)
        return
    _run(connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
