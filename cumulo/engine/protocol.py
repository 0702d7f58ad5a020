"""The small interfaces that cross layer lines.

`EngineClient` is how the service talks to an engine: an in-process engine and a Ray-hosted replica both
implement it. `Tokenizer` is what every layer may ask of a model's tokenizer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from cumulo.engine.params import RequestOutput, SamplingParams


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: set[int]  # every id that ends a turn (eos, <|im_end|>, <end_of_turn>, ...)
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...


class EngineClient(Protocol):
    model_name: str
    seal: str  # "sha256:<hex>" of weights, config and tokenizer, taken at load
    max_model_len: int
    device: str  # e.g. "cpu", "cuda:0", "npu:0"
    tokenizer: Tokenizer

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yields incremental outputs; the last has finished=True. Closing the iterator early aborts the
        request (the generation stops and frees its KV blocks)."""
        ...

    async def abort(self, request_id: str) -> None: ...
