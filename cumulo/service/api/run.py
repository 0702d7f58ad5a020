"""Fans one request out to the engine (prompts × n sequences) and merges their outputs into one ordered stream
of events; `stop()` closes every sequence still running, which aborts it in the engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cumulo.contracts import EngineClient, RequestOutput, SamplingParams, TokenLogprob


@dataclass(slots=True)
class Choice:
    index: int
    prompt_index: int
    request_id: str
    text: str = ""
    num_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    label: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Run:
    def __init__(
        self, engine: EngineClient, prompts: list[list[int]], n: int, params: SamplingParams, request_id: str
    ) -> None:
        self.engine = engine
        self.prompts = prompts
        self.params = params
        self.choices = [
            Choice(p * n + j, p, f"{request_id}-{p * n + j}") for p in range(len(prompts)) for j in range(n)
        ]
        self.first_token_time: float | None = None
        self._queue: asyncio.Queue[tuple[Choice, RequestOutput | BaseException]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._peeked: list[tuple[Choice, RequestOutput | BaseException]] = []

    def start(self) -> None:
        for choice in self.choices:
            params = self.params
            if params.seed is not None and choice.index:
                # n samples with one seed would all be identical; offset it so each choice is reproducible.
                params = dataclasses.replace(params, seed=params.seed + choice.index)
            self._tasks.append(asyncio.create_task(self._pump(choice, params)))

    async def _pump(self, choice: Choice, params: SamplingParams) -> None:
        stream = self.engine.generate(self.prompts[choice.prompt_index], params, choice.request_id)
        try:
            async for output in stream:
                await self._queue.put((choice, output))
        except Exception as exc:  # surfaced to the consumer, which decides the HTTP outcome
            await self._queue.put((choice, exc))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def first(self) -> None:
        """Waits for the engine's first output and raises if it is an error, so a request the engine refuses
        at once gets a proper HTTP error instead of a stream that starts and then fails."""
        entry = await self._queue.get()
        if isinstance(entry[1], BaseException):
            raise entry[1]
        self._peeked.append(entry)

    async def events(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Yields (choice, output) as outputs arrive; raises the first engine error."""
        remaining = len(self.choices)
        while remaining:
            choice, item = self._peeked.pop() if self._peeked else await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.new_token_ids and self.first_token_time is None:
                self.first_token_time = time.monotonic()
            choice.text += item.new_text
            choice.num_tokens += len(item.new_token_ids)
            if item.new_logprobs:
                choice.logprobs.extend(item.new_logprobs)
            if item.num_cached_tokens:
                choice.cached_tokens = item.num_cached_tokens
            if item.finished:
                choice.finish_reason = item.finish_reason or "stop"
                remaining -= 1
            yield choice, item

    async def stop(self) -> None:
        unfinished = [c for c in self.choices if not c.finished]
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for choice in unfinished:
            with contextlib.suppress(Exception):
                await self.engine.abort(choice.request_id)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        seen: dict[int, int] = {}
        for c in self.choices:
            seen[c.prompt_index] = max(seen.get(c.prompt_index, 0), c.cached_tokens)
        return sum(seen.values())
