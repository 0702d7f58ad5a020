"""`LLM`: the synchronous, batch-at-once face of the engine, for scripts, the CLI and benchmarks.

The engine hands out deltas (`RequestOutput`); `LLM` adds them up into one `Completion` per prompt, with the
wall-clock times a caller wants to report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cumulo.contracts import RequestOutput, SamplingParams, TokenLogprob
from cumulo.engine.llm_engine import EngineConfig, LLMEngine


@dataclass(slots=True)
class Completion:
    """One prompt's whole answer, added up from the engine's deltas (times in perf_counter seconds)."""

    request_id: str
    prompt_token_ids: list[int]
    arrival_time: float
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    finished_time: float | None = None

    def add(self, out: RequestOutput, now: float) -> None:
        if out.new_token_ids and self.first_token_time is None:
            self.first_token_time = now
        self.token_ids += out.new_token_ids
        self.text += out.new_text
        self.logprobs += out.new_logprobs
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason
            self.finished_time = now

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


class LLM:
    def __init__(self, model: str | LLMEngine, **engine_options: object) -> None:
        if isinstance(model, LLMEngine):
            self.engine = model
        else:
            from cumulo.engine.factory import create_engine

            self.engine = create_engine(model, EngineConfig(**engine_options))  # type: ignore[arg-type]
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[Completion]:
        """Runs every prompt to completion; returns each one's `Completion`, in prompt order. `on_output` sees
        every delta as it comes (for streaming to a terminal)."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        done: dict[str, Completion] = {}
        order: list[str] = []
        for prompt, p in zip(prompts, params_list, strict=True):
            tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            arrival = time.perf_counter()
            rid = self.engine.add_request(tokens, p)
            done[rid] = Completion(rid, tokens, arrival)
            order.append(rid)
        pending = len(order)
        while pending:
            outputs = self.engine.step()
            now = time.perf_counter()
            for out in outputs:
                if on_output is not None:
                    on_output(out)
                done[out.request_id].add(out, now)
                pending -= out.finished
        return [done[i] for i in order]
