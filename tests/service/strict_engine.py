"""A fake engine that fails where the real one fails on values it cannot hold, so the service tests see what a
request would do to a real model: its tokenizer raises TypeError on text that is not valid Unicode (as the
`tokenizers` backend does on a lone surrogate), and a seed outside 64 bits raises RuntimeError (as
`torch.Generator.manual_seed` does). The gateway must refuse both before they get here."""

from __future__ import annotations

from collections.abc import AsyncIterator

from cumulo.contracts import RequestOutput, SamplingParams
from tests.service.fakes import FakeEngine, FakeTokenizer


class StrictTokenizer(FakeTokenizer):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError("TextInputSequence must be str") from None
        return super().encode(text, add_special_tokens)


class StrictEngine(FakeEngine):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.tokenizer = StrictTokenizer()

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if params.seed is not None and not -(2**63) <= params.seed < 2**64:
            raise RuntimeError("Overflow when unpacking long")
        async for output in super().generate(prompt_token_ids, params, request_id):
            yield output
