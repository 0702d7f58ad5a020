"""A request as the engine tracks it: its tokens, how many have K/V in the cache, and its block table.

Plain Python, no device code, so scheduling logic is testable anywhere.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

from cumulo.contracts import SamplingParams


@dataclass(slots=True)
class RequestMetrics:
    """When a request arrived, was first scheduled, got its first token and finished (perf_counter seconds)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (for usage)
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())
        self.num_preemptions = 0
        # Set by the engine: sampling state, detokenizer, stop checker. Opaque to the scheduler.
        self.sampling_state: Any = None
        self.detokenizer: Any = None
        self.stop_checker: Any = None
        # Set by the engine for a request with a LoRA adapter: its loaded weights (opaque here) and the salt its
        # prefix-cache hashes start from, so blocks computed under one adapter are never reused under another.
        self.adapter: Any = None
        self.cache_salt: bytes | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={len(self.block_table)}, {self.status.value})"
        )
