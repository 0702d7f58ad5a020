"""`SimulatedEngine`: an `EngineClient` whose step times follow the chips performance model.

For benchmarks of routing and scaling on a host that cannot run several real engines: it batches continuously
as an engine does (a step admits waiting prompts and prefills them, else every running request gains one
token), and each step takes the time `cumulo.chips.predict` gives that step on the chosen chip: a prefill
costs the prompt tokens its LRU prefix cache does not hold (by default as many blocks as the chips model says
fit beside the weights), a decode step the predicted TPOT for the batch.
Tokens come from a tiny character vocabulary, chosen deterministically from the context and the seed.
`time_scale` multiplies every sleep (0.1 runs ten times faster than the chip would); `die()` makes every
stream and later request fail with `EngineUnavailable`, as a lost replica does.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cumulo.chips.catalog import get_chip
from cumulo.chips.predict import predict
from cumulo.chips.presets import resolve_model
from cumulo.contracts import EngineHealth, ModelInfo, RequestOutput, SamplingParams, TokenLogprob
from cumulo.engine.block_manager import block_hashes
from cumulo.engine.stop import StopChecker
from cumulo.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?"
SPECIAL = 2  # id 0 is BOS, id 1 is EOS (never generated: requests end by length, stop strings or stop ids)


class SimTokenizer:
    """One token per character of ALPHABET (anything else reads as a space)."""

    vocab_size = SPECIAL + len(ALPHABET)
    bos_token_id: int | None = 0
    eos_token_ids = {1}
    chat_template: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        space = ALPHABET.index(" ")
        return [SPECIAL + (ALPHABET.index(c) if c in ALPHABET else space) for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(ALPHABET[t - SPECIAL] if t >= SPECIAL else "" for t in token_ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return " ".join(str(m["content"]) for m in messages)


@dataclass(eq=False)
class _Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue[RequestOutput | BaseException]
    rng: random.Random
    stops: StopChecker
    tokens: list[int] = field(default_factory=list)
    cached: int = 0
    aborted: bool = False


class SimulatedEngine:
    def __init__(
        self,
        model: str = "llama-3.1-8b",
        chip: str = "h100-sxm",
        format: str = "bf16",
        *,
        name: str | None = None,
        max_batch: int = 32,
        max_model_len: int = 8192,
        kv_block_size: int = 16,
        cache_blocks: int | None = None,
        time_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.shape, self.chip, self.format = resolve_model(model), get_chip(chip), format
        self.tokenizer = SimTokenizer()
        seal = hashlib.sha256(f"{self.shape.name}/{format}".encode()).hexdigest()
        self.info = ModelInfo(
            name or self.shape.name,
            f"sha256:{seal}",
            max_model_len,
            None,
            f"sim:{self.chip.id}",
            kv_block_size,
        )
        self.max_batch, self.time_scale, self.seed = max_batch, time_scale, seed
        if cache_blocks is None:  # the KV cache that fits beside the weights, as the chips model counts it
            fit = predict(self.shape, format, self.chip, batch=1, context=max_model_len).max_sequences
            cache_blocks = max(1, fit * max_model_len // kv_block_size)
        self.cache_blocks = cache_blocks
        self.steps = 0
        self.busy_s = 0.0  # simulated seconds spent in steps
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._cache: OrderedDict[bytes, None] = OrderedDict()  # the prefix cache: chained block hashes, LRU
        self._times: dict[tuple[str, int, int], float] = {}
        self._counter = 0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._down: str | None = None

    # -- the EngineClient interface -----------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self._down is not None:
            raise EngineUnavailable(self._down)
        params.validate()
        self._check_prompt(prompt_token_ids)
        self._counter += 1
        rid = request_id or f"sim-{self._counter}"
        if rid in self._requests:
            raise InvalidRequest(f"request id {rid} is already in use")
        seed = params.seed if params.seed is not None else self.seed * 1_000_003 + self._counter
        request = _Request(
            rid,
            list(prompt_token_ids),
            params,
            asyncio.Queue(),
            random.Random(seed),
            StopChecker(params.stop, params.include_stop_str_in_output),
        )
        self._requests[rid] = request
        self._waiting.append(request)
        self._ensure_stepper().set()
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._drop(request)

    async def abort(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is not None:
            request.aborted = True
            if self._wake is not None:
                self._wake.set()

    async def health(self) -> EngineHealth:
        if self._down is not None:
            return EngineHealth(ok=False, detail=self._down)
        return EngineHealth(ok=True, num_running=len(self._running), num_waiting=len(self._waiting))

    def shutdown(self) -> None:
        self.die(f"the simulated engine of {self.info.name!r} has shut down")

    def die(self, why: str = "the simulated replica died") -> None:
        """Every open stream and every later request fails with EngineUnavailable."""
        if self._down is None:
            self._down = why
        for request in list(self._requests.values()):
            request.queue.put_nowait(EngineUnavailable(why))
        self._waiting.clear()
        self._running.clear()
        if self._wake is not None:
            self._wake.set()

    # -- the simulated engine ----------------------------------------------------------------------
    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.tokenizer.vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {self.tokenizer.vocab_size})")
        if len(ids) >= self.info.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {len(ids)} tokens; the context is {self.info.max_model_len} tokens"
            )

    def _ensure_stepper(self) -> asyncio.Event:
        """One stepping task per event loop (a test may run several loops one after another)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._step_forever())
        assert self._wake is not None
        return self._wake

    async def _step_forever(self) -> None:
        assert self._wake is not None
        while self._down is None:
            for request in [r for r in (*self._running, *self._waiting) if r.aborted]:
                self._finish(request, "abort")
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._waiting and len(self._running) < self.max_batch:
                admitted = [self._waiting.popleft() for _ in range(self.max_batch - len(self._running))
                            if self._waiting]  # fmt: skip
                await self._sleep(self._prefill_s(len(admitted), sum(self._admit(r) for r in admitted)))
                stepped = [r for r in admitted if self._requests.get(r.rid) is r]  # not closed meanwhile
                self._running += stepped
            else:
                stepped = list(self._running)
                context = sum(len(r.prompt) + len(r.tokens) for r in stepped) // len(stepped)
                await self._sleep(self._decode_s(len(stepped), context))
            for request in stepped:  # each gains a token (the prefill's first one, or a decode step's)
                if self._down is None and request in self._running:
                    self._emit(request)

    async def _sleep(self, seconds: float) -> None:
        self.steps += 1
        self.busy_s += seconds
        await asyncio.sleep(seconds * self.time_scale)

    def _admit(self, request: _Request) -> int:
        """Looks the prompt up in the prefix cache, caches its blocks; returns the tokens to compute."""
        hashes = block_hashes(request.prompt, self.info.kv_block_size)
        hit = 0
        for h in hashes:
            if h not in self._cache:
                break
            hit += 1
        for h in hashes:
            self._cache[h] = None
            self._cache.move_to_end(h)
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        # As an engine, the last prompt token is always computed (its logits give the first token).
        request.cached = min(hit * self.info.kv_block_size, len(request.prompt) - 1)
        return len(request.prompt) - request.cached

    def _prefill_s(self, prompts: int, tokens: int) -> float:
        """One prefill step over `prompts` prompts of `tokens` uncached tokens in all."""
        return self._predicted("prefill", prompts, -(-tokens // (16 * prompts)) * 16)

    def _decode_s(self, batch: int, context: int) -> float:
        return self._predicted("decode", batch, -(-context // 64) * 64)

    def _predicted(self, kind: str, batch: int, context: int) -> float:
        key = (kind, batch, context)
        if key not in self._times:
            p = predict(self.shape, self.format, self.chip, batch=batch, context=context)
            self._times[key] = p.ttft_s if kind == "prefill" else p.tpot_s
        return self._times[key]

    def _next_token(self, request: _Request) -> int:
        span = self.tokenizer.vocab_size - SPECIAL
        if request.params.greedy:  # a function of the context alone: a continuation repeats it exactly
            tail = (request.prompt + request.tokens)[-3:]
            value = self.seed + sum((i + 1) * 7919 * t for i, t in enumerate(tail)) + len(tail)
            return SPECIAL + value % span
        return SPECIAL + request.rng.randrange(span)

    def _emit(self, request: _Request) -> None:
        params = request.params
        token = self._next_token(request)
        request.tokens.append(token)
        reason = None
        if token in params.stop_token_ids:
            text, reason = request.stops.flush(), "stop"
        else:
            text, hit = request.stops.feed(self.tokenizer.decode([token]))
            if hit is not None:
                reason = "stop"
            elif len(request.tokens) >= params.max_tokens or (
                len(request.prompt) + len(request.tokens) >= self.info.max_model_len
            ):
                text, reason = text + request.stops.flush(), "length"
        logprobs = []
        if params.logprobs is not None:
            top = [(token, -0.1)] + [
                (SPECIAL + (token + k) % 20, -3.0 - k) for k in range(1, params.logprobs)
            ]
            logprobs = [TokenLogprob(token, -0.1, top[: params.logprobs])]
        out = RequestOutput(request.rid, [token], text, reason is not None, reason, request.cached, logprobs)
        request.queue.put_nowait(out)
        if reason is not None:
            self._remove(request)

    def _finish(self, request: _Request, reason: str) -> None:
        request.queue.put_nowait(RequestOutput(request.rid, [], "", True, reason, request.cached))
        self._remove(request)

    def _remove(self, request: _Request) -> None:
        if request in self._running:
            self._running.remove(request)
        if request in self._waiting:
            self._waiting.remove(request)

    def _drop(self, request: _Request) -> None:
        """The stream ended or was closed: the request is gone from the engine."""
        self._remove(request)
        if self._requests.get(request.rid) is request:
            del self._requests[request.rid]
