"""`LLM`: the synchronous, batch-at-once face of the engine, for scripts, the CLI and benchmarks."""

from __future__ import annotations

from collections.abc import Callable

from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.engine.params import RequestOutput, SamplingParams


class LLM:
    def __init__(self, model: str, **engine_options: object) -> None:
        self.engine: LLMEngine = create_engine(model, EngineConfig(**engine_options))  # type: ignore[arg-type]
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; returns the final output of each, in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids: list[str] = []
        for prompt, p in zip(prompts, params_list, strict=True):
            tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            ids.append(self.engine.add_request(tokens, p))
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.engine.step():
                if on_output is not None:
                    on_output(out)
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]
