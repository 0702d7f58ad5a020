"""Stored deployments: which models the pool serves and how (replicas, number format, chip, SLOs).

Each function takes a Session; writes must run inside a transaction (`with session.begin()`). The service checks
a deployment's shape only: whether a chip id or a format name exists is known to layers it may not import
(`chips`, `formats`), so a caller may pass a `SpecCheck` that refuses unknown names and returns canonical ones
(`cumulo.cli.deploy.check_spec`; the admin API takes it from `app.state.deployment_check`).

Undeploying marks the row 'deleted' rather than removing it, and every change takes the next value of one
table-wide `generation`: a controller polls `current_generation` and rereads with `changed_since`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from cumulo.errors import InvalidRequest, NotFound
from cumulo.service.db import Deployment

ACTIVE, DELETED = "active", "deleted"
MAX_REPLICAS = 1024  # a typo (10000 for 100) should be refused, not placed
MAX_NAME, MAX_SOURCE = 256, 1024


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """What an operator asks for. `replicas` is the count to start with; the autoscaler keeps the count between
    `min_replicas` and `max_replicas` (all three equal for a fixed count)."""

    model: str
    source: str
    replicas: int
    min_replicas: int
    max_replicas: int
    format: str | None = None
    chip: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None


SpecCheck = Callable[[DeploymentSpec], DeploymentSpec]
"""Raises a CumuloError for an unknown chip or format; returns the spec with their canonical names."""


def spec(
    model: str,
    source: str | None = None,
    *,
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    format: str | None = None,
    chip: str | None = None,
    ttft_slo_ms: float | None = None,
    tpot_slo_ms: float | None = None,
) -> DeploymentSpec:
    """A checked spec. `source` defaults to `model`; with no replica count given, one replica."""
    source = model if source is None else source
    _check_name("model", model, MAX_NAME)
    _check_name("source", source, MAX_SOURCE)
    for label, value in (("format", format), ("chip", chip)):
        if value is not None:
            _check_name(label, value, 64 if label == "format" else 128)
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise InvalidRequest("give either replicas or min_replicas and max_replicas, not both")
    if (min_replicas is None) != (max_replicas is None):
        raise InvalidRequest("min_replicas and max_replicas go together: give both or neither")
    if min_replicas is not None and max_replicas is not None:
        if not 1 <= min_replicas <= max_replicas <= MAX_REPLICAS:
            raise InvalidRequest(
                f"replicas must satisfy 1 <= min_replicas <= max_replicas <= {MAX_REPLICAS}; "
                f"got min_replicas {min_replicas}, max_replicas {max_replicas}"
            )
        replicas = min_replicas
    else:
        replicas = 1 if replicas is None else replicas
        if not 1 <= replicas <= MAX_REPLICAS:
            raise InvalidRequest(f"replicas must be between 1 and {MAX_REPLICAS}; got {replicas}")
        min_replicas = max_replicas = replicas
    for label, slo in (("ttft_slo_ms", ttft_slo_ms), ("tpot_slo_ms", tpot_slo_ms)):
        if slo is not None and not (math.isfinite(slo) and slo > 0):
            raise InvalidRequest(f"{label} must be a positive number of milliseconds; got {slo}")
    return DeploymentSpec(
        model, source, replicas, min_replicas, max_replicas, format, chip, ttft_slo_ms, tpot_slo_ms
    )


def _check_name(label: str, value: str, max_length: int) -> None:
    if not value or len(value) > max_length:
        raise InvalidRequest(f"{label} must be 1 to {max_length} characters")
    if any(c < " " or c == "\x7f" for c in value):
        raise InvalidRequest(f"{label} must not contain control characters")


def create_or_update(
    session: Session, wanted: DeploymentSpec, check: SpecCheck | None = None
) -> tuple[Deployment, bool]:
    """Stores `wanted` as the whole deployment of its model (fields not given take their defaults).

    Returns the row and whether it was created (an undeployed model deployed again counts as created). A spec
    equal to the stored one changes nothing, not even the generation."""
    if check is not None:
        wanted = check(wanted)
    _lock(session)
    row = session.scalar(select(Deployment).where(Deployment.model == wanted.model))
    created = row is None or row.state == DELETED
    if row is not None and not created and spec_of(row) == wanted:
        return row, False
    generation, now = _next_generation(session), time.time()  # before the new row is added: no autoflush
    if row is None:
        row = Deployment(model=wanted.model)
        session.add(row)
    if created:
        row.created_at = now
    for f in fields(DeploymentSpec):
        setattr(row, f.name, getattr(wanted, f.name))
    row.state = ACTIVE
    row.updated_at = now
    row.generation = generation
    session.flush()
    return row, created


def delete(session: Session, model: str) -> Deployment:
    """Marks the deployment deleted (the row stays, so pollers see it go)."""
    _lock(session)
    row = get(session, model)
    row.state = DELETED
    row.updated_at = time.time()
    row.generation = _next_generation(session)
    session.flush()
    return row


def get(session: Session, model: str) -> Deployment:
    row = session.scalar(select(Deployment).where(Deployment.model == model, Deployment.state == ACTIVE))
    if row is None:
        raise NotFound(f"no deployment named {model!r}")
    return row


def list_deployments(session: Session, *, include_deleted: bool = False) -> list[Deployment]:
    query = select(Deployment).order_by(Deployment.model)
    if not include_deleted:
        query = query.where(Deployment.state == ACTIVE)
    return list(session.scalars(query))


def current_generation(session: Session) -> int:
    """The generation of the newest change; 0 for a table never written."""
    return int(session.scalar(select(func.coalesce(func.max(Deployment.generation), 0))) or 0)


def changed_since(session: Session, generation: int) -> list[Deployment]:
    """Rows changed after `generation`, deleted ones included, oldest change first."""
    query = select(Deployment).where(Deployment.generation > generation).order_by(Deployment.generation)
    return list(session.scalars(query))


def as_dict(row: Deployment) -> dict[str, Any]:
    """The JSON view of a row, as the admin API and `cumulo deployments --json` show it."""
    return {
        "model": row.model,
        "source": row.source,
        "replicas": row.replicas,
        "min_replicas": row.min_replicas,
        "max_replicas": row.max_replicas,
        "format": row.format,
        "chip": row.chip,
        "ttft_slo_ms": row.ttft_slo_ms,
        "tpot_slo_ms": row.tpot_slo_ms,
        "state": row.state,
        "generation": row.generation,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def spec_of(row: Deployment) -> DeploymentSpec:
    return DeploymentSpec(**{f.name: getattr(row, f.name) for f in fields(DeploymentSpec)})


def _next_generation(session: Session) -> int:
    return current_generation(session) + 1


def _lock(session: Session) -> None:
    """Writers take turns, so two never take the same generation. SQLite's BEGIN IMMEDIATE already holds the
    database; on PostgreSQL this lock lets plain reads through and waits for the other writer's commit."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("LOCK TABLE deployments IN EXCLUSIVE MODE"))
