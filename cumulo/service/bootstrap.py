"""First start: create the admin key once per database and write it to a file only its owner can read.

The key is never printed or logged; callers print the path. Gateways starting together on one database take a
transaction-scoped lock first, so exactly one of them creates the key.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from cumulo.service import crud
from cumulo.service.security import write_private
from cumulo.service.state import ServiceState

ADMIN_KEY_FILE = "admin_key"
_LOCK_ID = 0x43554D56


def ensure_admin_key(state: ServiceState) -> Path | None:
    """Returns the file holding the new admin key, or None when the database already has one."""
    path = state.settings.data_dir / ADMIN_KEY_FILE
    with state.sessions() as session, session.begin():
        if state.db.dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        if crud.has_admin_key(session):
            return None
        _, secret = crud.create_key(
            session, state.hasher, org_name=crud.ADMIN_ORG, plan_name="default", name="admin", is_admin=True
        )
        write_private(path, (secret + "\n").encode())
    return path
