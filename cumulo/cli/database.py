"""The service database as the command line opens it: found as `cumulo serve` finds it (`--database-url`, else
$CUMULO_DATABASE_URL, else SQLite in the data directory), migrated, and closed on the way out."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cumulo.errors import CumuloError, InvalidRequest


@contextmanager
def service_sessions(args: argparse.Namespace) -> Iterator[Any]:
    """A session factory on the migrated service database; database failures become one-line errors."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    from cumulo.service.db import open_database, session_factory
    from cumulo.service.migrate import upgrade
    from cumulo.service.settings import Settings

    settings = Settings.from_env(database_url=getattr(args, "database_url", None))
    try:
        database = open_database(settings.database_url)
    except ArgumentError as exc:
        raise InvalidRequest(f"--database-url: {exc}") from None
    try:
        upgrade(database)
        yield session_factory(database)
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise CumuloError(f"cannot use the service database {_shown(database.url)}: {reason}") from None
    finally:
        database.dispose()


def _shown(url: Any) -> str:
    return url.render_as_string(hide_password=True)
