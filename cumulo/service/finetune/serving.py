"""Calling a fine-tuned model: `ft:BASE:ORG:SUFFIX:ID` (or `...:ckpt-step-N`, or the name of an adapter imported
with `cumulo adapters import`) becomes the base model's engine plus the adapter's directory.

A fine-tuned model belongs to its organisation: another organisation gets the same 404 as for a model that does
not exist. The lookup is asked of the database per request, remembered for `TTL` seconds (hits and misses alike),
so a job that has just succeeded answers within about a second, without a restart, on every gateway. The engine
reads the adapter on first use and keeps it in its adapter cache (`cumulo.engine.lora`), which the service never
imports: it only names the adapter in `SamplingParams.adapter`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from cumulo.contracts import AdapterRef, EngineClient, EngineHealth, RequestOutput, SamplingParams
from cumulo.errors import ModelNotFound, PermissionDenied
from cumulo.service.auth import Principal
from cumulo.service.finetune.tables import FinetuneCheckpoint, FinetuneJob
from cumulo.service.state import ServiceState

TTL = (
    1.0  # seconds a lookup is remembered: the bound on how late a new model starts answering, beside the 2 s
)
_CKPT = re.compile(r"^(ft:.+):ckpt-step-(\d+)$")
IMPORTED = "adapters"  # <data dir>/adapters/NAME/: PEFT directories imported by `cumulo adapters import`


@dataclass(frozen=True)
class Tuned:
    base: str  # the served model it runs over
    path: str  # its PEFT directory


class AdapterEngine:
    """An `EngineClient` over the base model's engine that runs every request with one adapter."""

    def __init__(self, base: EngineClient, name: str, path: str) -> None:
        self.base = base
        self.ref = AdapterRef(name=name, path=path, base_seal=base.info.seal)
        self.info = dataclasses.replace(base.info, name=name)
        self.tokenizer = base.tokenizer

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        return self.base.generate(prompt_token_ids, dataclasses.replace(params, adapter=self.ref), request_id)

    async def abort(self, request_id: str) -> None:
        await self.base.abort(request_id)

    async def health(self) -> EngineHealth:
        return await self.base.health()

    def shutdown(self) -> None:  # the base engine is the service's to shut down
        pass


class TunedModels:
    """(organisation, model name) -> `Tuned` or None, read from the database and remembered for `TTL` s."""

    def __init__(self, ttl: float = TTL) -> None:
        self.ttl = ttl
        self._entries: dict[tuple[int, str], tuple[float, Tuned | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, state: ServiceState, org_id: int, model: str) -> Tuned | None:
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get((org_id, model))
        if hit is not None and hit[0] > now:
            return hit[1]
        found = _read(state, org_id, model)
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[(org_id, model)] = (now + self.ttl, found)
        return found


def _read(state: ServiceState, org_id: int, model: str) -> Tuned | None:
    if not model.startswith("ft:"):
        return _imported(state.settings.data_dir, model)
    ckpt = _CKPT.match(model)
    name = ckpt[1] if ckpt else model
    with state.sessions() as session:
        job = session.scalars(
            select(FinetuneJob).where(
                FinetuneJob.fine_tuned_model == name,
                FinetuneJob.org_id == org_id,
                FinetuneJob.status == "succeeded",
            )
        ).first()
        if job is None:
            return None
        if ckpt is None:
            return Tuned(job.model, job.adapter_dir) if job.adapter_dir else None
        row = session.scalars(
            select(FinetuneCheckpoint).where(
                FinetuneCheckpoint.job == job.id, FinetuneCheckpoint.step == int(ckpt[2])
            )
        ).first()
        return Tuned(job.model, row.path) if row is not None else None


def _imported(data_dir: Path, model: str) -> Tuned | None:
    """An adapter the operator imported: served to every organisation whose plan includes its base."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", model):
        return None
    directory = Path(data_dir) / IMPORTED / model
    try:
        base = json.loads((directory / "cumulo_adapter.json").read_text()).get("base_model")
    except (OSError, ValueError):
        return None
    return Tuned(base, str(directory)) if isinstance(base, str) and base else None


def imported_models(data_dir: Path) -> list[tuple[str, str, float]]:
    """(name, base model, import time) of every adapter the operator imported, in name order."""
    root = Path(data_dir) / IMPORTED
    found = []
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        tuned = _imported(Path(data_dir), directory.name)
        if tuned is not None:
            found.append((directory.name, tuned.base, (directory / "cumulo_adapter.json").stat().st_mtime))
    return found


_tuned = TunedModels()


async def resolve_tuned(state: ServiceState, principal: Principal, model: str) -> EngineClient:
    """The engine to call `model` on for this caller: an `AdapterEngine` over its base, or `ModelNotFound`."""
    found = await state.db_call(_tuned.lookup, state, principal.org_id, model)
    if found is None or found.base not in state.engines:
        raise ModelNotFound(f"the model {model!r} does not exist or is not served here")
    if not principal.plan.allows(found.base):
        raise PermissionDenied(f"plan {principal.plan.name!r} does not include the base model {found.base!r}")
    return AdapterEngine(state.engines[found.base], model, found.path)
