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
    # A request still 'in_progress' after this long no longer holds a concurrency slot; one whose gateway kept
    # no heartbeat (an older version) is then taken for lost and settled as 'interrupted'.
    max_request_seconds: float = 900.0
    # Gateways sharing a database: every `checkpoint_seconds` a gateway writes its heartbeat and the tokens
    # its streams delivered; one whose heartbeat is older than `gateway_stale_seconds` is dead, and every
    # `recovery_seconds` each gateway settles the rows of dead ones (billing what was delivered).
    checkpoint_seconds: float = 1.0
    gateway_stale_seconds: float = 30.0
    recovery_seconds: float = 5.0
    # The edge fleet (docs/edge.md): the MQTT broker the gateway bridges ("" = HTTP only), the topic root its
    # devices publish under, the bridge's persistent session, how often rollouts are checked and desired states
    # published, and how long an enrolment token lives.
    edge_mqtt_url: str = ""
    edge_topic_root: str = "cumulo/v1/devices"
    edge_mqtt_client_id: str = "cumulo-bridge"
    edge_session_expiry_seconds: int = 3600
    edge_check_seconds: float = 2.0
    edge_enroll_ttl_seconds: float = 86400.0
    # Fine-tuning (docs/finetune.md): local worker processes the gateway starts (`from_env` makes it 1 for
    # `cumulo serve`; tests start workers themselves), the largest upload, how often a worker beats while it
    # holds a job, when a silent one is taken for dead (its job requeued), how many starts a job gets, and which
    # base models may be tuned: {name clients give: what the worker loads}; served models are added by name.
    finetune_workers: int = 0
    finetune_max_file_bytes: int = 512 * 1024 * 1024
    finetune_heartbeat_seconds: float = 5.0
    finetune_stale_seconds: float = 60.0
    finetune_max_attempts: int = 3
    finetune_models: dict[str, str] = field(default_factory=dict)
    # Under `cumulo serve --cluster`: the workers train each job on a pool node (cluster/finetune_runner.py)
    # instead of in their own process, taking `finetune_pool_cpus` CPUs there.
    finetune_pool: bool = False
    finetune_pool_cpus: int = 1

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.database_url:
            self.database_url = default_database_url(self.data_dir)
        if not 0 < self.checkpoint_seconds < self.gateway_stale_seconds or self.recovery_seconds <= 0:
            raise InvalidRequest(
                "need 0 < checkpoint seconds < gateway stale seconds and recovery seconds > 0, got "
                f"{self.checkpoint_seconds}, {self.gateway_stale_seconds} and {self.recovery_seconds}"
            )
        if (
            self.finetune_workers < 0
            or self.finetune_max_attempts < 1
            or self.finetune_heartbeat_seconds <= 0
            or self.finetune_pool_cpus < 1
        ):
            raise InvalidRequest(
                "need finetune workers >= 0, max attempts >= 1, heartbeat seconds > 0 and pool CPUs >= 1, got "
                f"{self.finetune_workers}, {self.finetune_max_attempts}, {self.finetune_heartbeat_seconds} and "
                f"{self.finetune_pool_cpus}"
            )

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
        for name in ("edge_mqtt_url", "edge_topic_root", "edge_mqtt_client_id"):
            if env.get(f"CUMULO_{name.upper()}"):
                values[name] = env[f"CUMULO_{name.upper()}"]
        for name in ("checkpoint_seconds", "gateway_stale_seconds", "recovery_seconds"):
            variable = f"CUMULO_{name.upper()}"
            if env.get(variable):
                values[name] = _float(variable, env[variable])
        values["finetune_workers"] = _int(
            "CUMULO_FINETUNE_WORKERS", env.get("CUMULO_FINETUNE_WORKERS") or "1"
        )
        if env.get("CUMULO_FINETUNE_POOL"):
            flag = env["CUMULO_FINETUNE_POOL"].strip().lower()
            values["finetune_pool"] = flag in ("1", "true", "yes", "on")
        if env.get("CUMULO_FINETUNE_POOL_CPUS"):
            values["finetune_pool_cpus"] = _int("CUMULO_FINETUNE_POOL_CPUS", env["CUMULO_FINETUNE_POOL_CPUS"])
        if env.get("CUMULO_FINETUNE_MODELS"):
            values["finetune_models"] = _pairs("CUMULO_FINETUNE_MODELS", env["CUMULO_FINETUNE_MODELS"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be an integer, got {value!r}") from exc


def _pairs(name: str, value: str) -> dict[str, str]:
    """`a=/models/a,b=smollm2-135m` -> {"a": "/models/a", "b": "smollm2-135m"}."""
    pairs = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        model, sep, source = item.partition("=")
        if not sep or not model.strip() or not source.strip():
            raise InvalidRequest(f"{name} must be NAME=SOURCE pairs separated by commas, got {item!r}")
        pairs[model.strip()] = source.strip()
    return pairs


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be a number of seconds, got {value!r}") from exc
