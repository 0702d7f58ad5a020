"""API keys: random, prefixed `sk-cumulo-`, shown once, stored only as an HMAC-SHA256 keyed hash.

The HMAC secret lives in the data directory (mode 0600), so a copy of the database alone cannot be used to
test guessed keys. Every gateway sharing a database must share this secret (same data dir, or copy the file).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_PREFIX = "sk-cumulo-"
_SECRET_FILE = "service_secret"


def write_private(path: Path, data: bytes) -> None:
    """Create `path` readable by its owner only, atomically (no window where it exists with wider rights)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_secret(directory: Path, name: str = _SECRET_FILE, size: int = 32) -> bytes:
    path = directory / name
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        write_private(tmp, secrets.token_bytes(size))
        try:
            # link() fails if the name exists: two gateways starting together end with one secret, not two.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes()


class KeyHasher:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def hash(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def display_prefix(key: str) -> str:
    """What listings show: enough to recognise a key, far too little to use it."""
    return key[: len(KEY_PREFIX) + 6]
