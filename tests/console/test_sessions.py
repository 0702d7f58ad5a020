"""Console session tokens: signed, expiring, bound to one key, and a CSRF token that only the server can make."""

from __future__ import annotations

import pytest

from cumulo.errors import AuthenticationError, PermissionDenied
from cumulo.service.console import sessions
from cumulo.service.security import KeyHasher

HASHER = KeyHasher(b"s" * 32)


def test_a_token_names_its_key_until_it_expires():
    token = sessions.issue(HASHER, 42, None, now=1000.0)
    assert sessions.key_id_of(HASHER, token, now=1000.0 + sessions.LIFETIME - 1) == 42
    with pytest.raises(AuthenticationError, match="expired"):
        sessions.key_id_of(HASHER, token, now=1000.0 + sessions.LIFETIME)


def test_a_session_ends_no_later_than_its_key():
    token = sessions.issue(HASHER, 7, key_expires_at=1500.0, now=1000.0)
    assert sessions.expires_of(token) == 1500
    with pytest.raises(AuthenticationError):
        sessions.key_id_of(HASHER, token, now=1500.0)


@pytest.mark.parametrize("change", ["key", "expiry", "signature", "secret"])
def test_a_changed_token_is_refused(change):
    key_id, expires, nonce, signature = sessions.issue(HASHER, 5, None, now=1000.0).split(".")
    hasher = HASHER
    if change == "key":
        key_id = "6"
    elif change == "expiry":
        expires = str(int(expires) + 3600)
    elif change == "signature":
        signature = ("0" if signature[0] != "0" else "1") + signature[1:]
    else:
        hasher = KeyHasher(b"t" * 32)  # another deployment's secret
    with pytest.raises(AuthenticationError, match="not valid"):
        sessions.key_id_of(hasher, f"{key_id}.{expires}.{nonce}.{signature}", now=1000.0)


def test_csrf_is_checked_on_writes_only():
    token = sessions.issue(HASHER, 1, None)
    other = sessions.issue(HASHER, 1, None)
    sessions.check_csrf(HASHER, token, "GET", None)
    sessions.check_csrf(HASHER, token, "POST", sessions.csrf_of(HASHER, token))
    for header in (None, "", sessions.csrf_of(HASHER, other)):  # another session's token does not do
        with pytest.raises(PermissionDenied):
            sessions.check_csrf(HASHER, token, "DELETE", header)
