"""`AsyncEngine`: the engine behind an asyncio interface (`EngineClient`), stepping in a background thread.

Each request gets an asyncio queue; the stepping thread hands outputs to the event loop with
`call_soon_threadsafe`. Leaving the async iterator early (a client that disconnects) aborts the request, so its
generation stops and its KV blocks are freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator

from cumulo.contracts import EngineHealth, RequestOutput, SamplingParams
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.errors import EngineUnavailable

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.info = engine.model_info()
        self.tokenizer = engine.tokenizer
        self._queues: dict[
            str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput | BaseException]]
        ] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="cumulo-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped:
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a broken step must fail its requests, not hang them
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for out in outputs:
                entry = self._queues.get(out.request_id)
                if entry is not None:
                    entry[0].call_soon_threadsafe(entry[1].put_nowait, out)

    def _fail_all(self, exc: BaseException) -> None:
        for loop, queue in list(self._queues.values()):
            with contextlib.suppress(RuntimeError):  # that request's event loop has closed: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, exc)
        for rid in list(self._queues):
            self.engine.abort(rid)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self._stopped:
            raise EngineUnavailable(f"the engine of {self.info.name!r} has shut down")
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        added = False
        try:
            self.engine.add_request(prompt_token_ids, params, request_id)
            added = True
            self._wake.set()
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if added and not finished:
                self.engine.abort(request_id)
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    async def health(self) -> EngineHealth:
        if self._stopped or not self._thread.is_alive():
            return EngineHealth(ok=False, detail="the engine thread has stopped")
        running, waiting = await asyncio.to_thread(self.engine.load)  # waits for a step to end, off the loop
        return EngineHealth(ok=True, num_running=running, num_waiting=waiting)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        self._fail_all(EngineUnavailable(f"the engine of {self.info.name!r} has shut down"))


def build_engine(
    model: str, device: str = "auto", format: str | None = None, **options: object
) -> AsyncEngine:
    from cumulo.engine.factory import create_engine

    config = EngineConfig(device=device, format=format, **options)  # type: ignore[arg-type]
    return AsyncEngine(create_engine(model, config))
