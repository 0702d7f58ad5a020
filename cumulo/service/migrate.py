"""Brings a database to the newest schema with the Alembic migrations packaged in `cumulo.service.migrations`.

Called at every start-up; several gateways starting together on one PostgreSQL take an advisory lock so only
one of them migrates at a time (SQLite serializes on its BEGIN IMMEDIATE).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from cumulo.service.db import Database

_MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_ID = 0x43554D55  # "CUMU": any constant shared by every gateway


def upgrade(database: Database) -> None:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with database.connect() as connection:
        if database.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _LOCK_ID})
            connection.commit()
        try:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()
        finally:
            if database.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _LOCK_ID})
                connection.commit()
