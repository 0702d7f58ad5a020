"""A fake engine and tokenizer implementing `EngineClient`: deterministic text, configurable speed, records of
what was aborted. Lets the service be tested in milliseconds without a model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from cumulo.contracts import EngineHealth, ModelInfo, RequestOutput, SamplingParams, TokenLogprob
from cumulo.engine.stop import StopChecker
from cumulo.errors import EngineUnavailable, InvalidRequest

BOS, EOS, OFFSET = 1, 2, 3
PHRASE = "The quick brown fox jumps over the lazy dog. "


class FakeTokenizer:
    """One token per character: id = code point + 3. Ids 1 and 2 are BOS and EOS."""

    vocab_size = 0x110000 + OFFSET
    bos_token_id: int | None = BOS
    eos_token_ids = {EOS}
    chat_template: str | None = "fake"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) + OFFSET for c in text]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for t in token_ids:
            if t >= OFFSET:
                out.append(chr(t - OFFSET))
            elif not skip_special_tokens:
                out.append({BOS: "<s>", EOS: "</s>"}.get(t, "<?>"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


class FakeEngine:
    """Generates PHRASE over and over (starting at `seed` mod its length), one character per step.

    `delay` seconds pass before each token; `eos_after` ends a sequence with EOS after that many tokens unless
    `ignore_eos`; stop strings are honoured by the engine's own `StopChecker` (held back while they may still match, trimmed,
    finish_reason "stop").
    """

    def __init__(
        self,
        name: str = "fake-model",
        *,
        max_model_len: int = 256,
        delay: float = 0.0,
        eos_after: int | None = None,
        seal: str = "sha256:" + "ab" * 32,
        device: str = "cpu",
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.info = ModelInfo(name, seal, max_model_len, self.tokenizer.chat_template, device)
        self.delay = delay
        self.eos_after = eos_after
        self.aborted: set[str] = set()
        self.started: list[str] = []
        self.active = 0
        self.peak_active = 0
        self.stopped = False
        self._running: set[str] = set()
        self._abort_asked: set[str] = set()

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self.stopped:
            raise EngineUnavailable(f"the engine of {self.info.name!r} has shut down")
        params.validate()
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty")
        if len(prompt_token_ids) >= self.info.max_model_len:
            raise InvalidRequest("the prompt does not fit the context")
        rid = request_id or f"fake-{len(self.started)}"
        self.started.append(rid)
        self._running.add(rid)
        start = (params.seed or 0) % len(PHRASE)
        tokens: list[int] = []
        stops = StopChecker(params.stop, params.include_stop_str_in_output)
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        finished = False
        try:
            while True:
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                if rid in self._abort_asked:  # as the real engine: the stream ends with finish_reason "abort"
                    self._abort_asked.discard(rid)
                    finished = True
                    yield RequestOutput(
                        request_id=rid, new_token_ids=[], new_text="", finished=True, finish_reason="abort"
                    )
                    return
                if self.eos_after is not None and len(tokens) >= self.eos_after and not params.ignore_eos:
                    new_ids, new_text, reason = [EOS], "", "stop"
                else:
                    char = PHRASE[(start + len(tokens)) % len(PHRASE)]
                    new_ids, new_text, reason = [ord(char) + OFFSET], char, None
                tokens += new_ids
                new_text, hit = stops.feed(new_text)
                if hit is not None:
                    reason = "stop"
                if reason is None and len(tokens) >= params.max_tokens:
                    reason = "length"
                if reason is not None:
                    new_text += stops.flush()
                logprobs = []
                if params.logprobs is not None:
                    top = [
                        (t, -0.1 * (i + 1))
                        for i, t in enumerate(range(OFFSET + 97, OFFSET + 97 + params.logprobs))
                    ]
                    logprobs = [TokenLogprob(token_id=new_ids[0], logprob=-0.05, top=top)]
                finished = reason is not None
                yield RequestOutput(
                    request_id=rid,
                    new_token_ids=new_ids,
                    new_text=new_text,
                    finished=finished,
                    finish_reason=reason,
                    num_cached_tokens=0,
                    new_logprobs=logprobs,
                )
                if finished:
                    return
        finally:
            self._running.discard(rid)
            self.active -= 1
            if not finished:
                self.aborted.add(rid)

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)
        if request_id in self._running:
            self._abort_asked.add(request_id)

    async def health(self) -> EngineHealth:
        if self.stopped:
            return EngineHealth(ok=False, detail="shut down")
        return EngineHealth(ok=True, num_running=self.active)

    def shutdown(self) -> None:
        self.stopped = True
