"""`EngineClient`: the one interface between the service and every engine.

An engine in its own process (`cumulo.cluster.engine_process.EngineProcess`, what `cumulo serve` runs), one on
a thread of this process (`cumulo.engine.async_engine.AsyncEngine`), a Ray-hosted replica
(`cumulo.cluster.replica.RayReplica`) and a pool of them (`cumulo.cluster.pool.Pool`) implement it; the service
keeps one per model name and never knows which it has. Every implementation must pass the conformance suite in
`tests/contracts/`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from cumulo.contracts.model_info import ModelInfo
from cumulo.contracts.params import RequestOutput, SamplingParams
from cumulo.contracts.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class EngineHealth:
    ok: bool  # False: the engine cannot take requests (its worker died, its device failed, it shut down)
    detail: str = ""  # why not, in words
    num_running: int = 0  # requests generating now
    num_waiting: int = 0  # requests queued for a first step


class EngineClient(Protocol):
    info: ModelInfo
    tokenizer: Tokenizer

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yields what each step adds to the request; the last output has `finished=True`. Bad input raises
        `cumulo.errors.InvalidRequest` (or a subclass) before the first output. Closing the iterator early
        aborts the request: its generation stops and its KV blocks are freed."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stops a request by id; unknown or finished ids are ignored."""
        ...

    async def health(self) -> EngineHealth:
        """Whether the engine can take requests now, and how loaded it is."""
        ...

    def shutdown(self) -> None:
        """Stops the engine and frees what it holds; requests still running end with an error."""
        ...
