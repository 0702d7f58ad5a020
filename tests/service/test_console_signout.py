"""Signing out of the console ends the session in the database, and revoking a key drops it from the gateway's
principal cache at once; on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from cumulo.errors import AuthenticationError, NotFound
from cumulo.service import auth, crud
from cumulo.service.console import sessions
from cumulo.service.db import ConsoleSignout, open_database, session_factory
from cumulo.service.migrate import upgrade
from cumulo.service.security import KeyHasher

HASHER = KeyHasher(b"s" * 32)


@pytest.fixture
def db(database_url):
    database = open_database(database_url)
    upgrade(database)
    factory = session_factory(database)
    with factory() as session, session.begin():
        crud.create_plan(session, "signout-plan")
        keys = {}
        for org in ("org-a", "org-b"):
            row, secret = crud.create_key(session, HASHER, org_name=org, plan_name="signout-plan")
            keys[org] = (row.id, row.org_id, secret)
    yield factory, keys
    database.dispose()


def principal(factory, key_id, token):
    with factory() as session:
        return auth.authenticate_key_id(session, key_id, sessions.nonce_of(token))


def test_a_signed_out_session_is_refused_and_others_of_the_key_are_not(db):
    factory, keys = db
    key_id = keys["org-a"][0]
    gone, kept = sessions.issue(HASHER, key_id, None), sessions.issue(HASHER, key_id, None)
    assert principal(factory, key_id, gone).key_id == key_id
    assert sessions.end(HASHER, factory, gone) is True
    assert sessions.end(HASHER, factory, gone) is True  # a second sign-out (another tab) is harmless
    with pytest.raises(AuthenticationError, match="signed out"):
        principal(factory, key_id, gone)
    assert principal(factory, key_id, kept).key_id == key_id  # another browser's session of the same key


def test_a_forged_or_expired_token_stores_nothing_and_old_rows_are_pruned(db):
    factory, keys = db
    key_id = keys["org-a"][0]
    assert sessions.end(HASHER, factory, "1.9999999999.x.00") is False
    old = sessions.issue(HASHER, key_id, None, now=1000.0)
    assert sessions.end(HASHER, factory, old, now=1000.0) is True
    count = select(func.count()).select_from(ConsoleSignout)
    with factory() as session:
        assert session.scalar(count) == 1
    later = 1000.0 + sessions.LIFETIME + 1  # the first session has expired by itself
    assert sessions.end(HASHER, factory, old, now=later) is False
    fresh = sessions.issue(HASHER, key_id, None, now=later)
    assert sessions.end(HASHER, factory, fresh, now=later) is True
    with factory() as session:
        assert session.scalars(select(ConsoleSignout.nonce)).all() == [sessions.nonce_of(fresh)]


def test_revoking_drops_the_key_from_the_principal_cache(db):
    factory, keys = db
    key_id, org_id, secret = keys["org-a"]
    cache = auth.PrincipalCache(ttl=3600.0)
    key_hash = HASHER.hash(secret)
    with factory() as session:
        cache.put(key_hash, auth.authenticate(session, HASHER, secret))
    other_id, _, other_secret = keys["org-b"]
    with pytest.raises(NotFound, match=f"no key with id {other_id}"):  # another organisation's key
        auth.revoke_key(factory, cache, other_id, org_id)
    assert cache.get(key_hash) is not None
    answer = auth.revoke_key(factory, cache, key_id, org_id)
    assert answer["id"] == key_id and answer["revoked_at"] is not None
    assert cache.get(key_hash) is None
    with factory() as session, pytest.raises(AuthenticationError, match="revoked"):
        auth.authenticate(session, HASHER, secret)
    with factory() as session:
        assert auth.authenticate(session, HASHER, other_secret).key_id == other_id
