"""Settings of the HTTP gateway: defaults for one machine, overridden by `CUMULO_*` environment variables.

Plain dataclass (no pydantic-settings dependency); `Settings.from_env()` reads the environment once at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cumulo.errors import InvalidRequest
from cumulo.paths import data_dir


def default_database_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'cumulo.db'}"


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=data_dir)
    database_url: str = ""  # "" = SQLite file in data_dir
    provider: str = "Cumulo"  # who the implicit label names as the provider
    service_name: str = "cumulo"  # the service the implicit label names
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 16
    # A request still 'in_progress' after this long belongs to a gateway that died; it no longer holds a
    # concurrency slot and is settled as 'interrupted' at the next start.
    max_request_seconds: float = 900.0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.database_url:
            self.database_url = default_database_url(self.data_dir)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Environment first, then explicit overrides (CLI flags) that are not None."""
        env = os.environ
        values: dict[str, object] = {}
        if env.get("CUMULO_HOST"):
            values["host"] = env["CUMULO_HOST"]
        if env.get("CUMULO_PORT"):
            values["port"] = _int("CUMULO_PORT", env["CUMULO_PORT"])
        if env.get("CUMULO_DATABASE_URL"):
            values["database_url"] = env["CUMULO_DATABASE_URL"]
        if env.get("CUMULO_PROVIDER"):
            values["provider"] = env["CUMULO_PROVIDER"]
        if env.get("CUMULO_SERVICE_NAME"):
            values["service_name"] = env["CUMULO_SERVICE_NAME"]
        if env.get("CUMULO_MAX_BODY_BYTES"):
            values["max_body_bytes"] = _int("CUMULO_MAX_BODY_BYTES", env["CUMULO_MAX_BODY_BYTES"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be an integer, got {value!r}") from exc
