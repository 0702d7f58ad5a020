"""`EngineProcess`: an engine core in its own process, reached through `EngineClient`.

As vLLM's V1 engine core does, the engine steps in a process of its own, so the gateway's event loop and the
engine's Python never wait for each other's GIL: the gateway parses, tokenizes, meters and writes SSE while the
engine schedules, samples and detokenizes. The two talk over a pipe in small pickled messages; outputs are the
seam's deltas, batched one message per engine step.

    gateway process (commands via a writer thread) engine process (`_core_main`)
    generate() --("add", rid, ids, params)-->      add_request, then step until idle
    abort()    --("abort", rid)-->                 abort
    health()   --("health", n)-->                  ("health", n, EngineHealth)
    reader thread <--("out", [RequestOutput])--    one message per step
                  <--("refused", rid, error)--     add_request raised (bad prompt, bad params)

If the engine process dies, every open stream ends with `EngineUnavailable` and `health()` says so; nothing
hangs. A Ray replica (`cluster/replica.py`) has the same shape: a worker that owns an engine and streams deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import queue
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cumulo.contracts import EngineHealth, ModelInfo, RequestOutput, SamplingParams, Tokenizer
from cumulo.errors import CumuloError, EngineUnavailable

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading and converting a large model on a slow CPU takes minutes
HEALTH_TIMEOUT_S = 30.0  # one engine step at most, normally; a step this long is a sick engine


class EngineProcess:
    """Starts the engine for `model` in a child process (spawned, so no state is shared by fork) and waits
    until it has loaded. `options` are `EngineConfig` fields (device, dtype, format, threads, ...); a `factory`
    (a picklable module-level function) builds the `LLMEngine` from them instead of `create_engine(model)`."""

    def __init__(self, model: str, *, factory: Callable[..., Any] | None = None, **options: Any) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self._conn: Connection = parent
        self._process = ctx.Process(
            target=_core_main,
            args=(child, model, factory, options),
            name=f"cumulo-engine:{Path(model).name}",
            daemon=True,
        )
        self._process.start()
        child.close()
        message = self._wait_ready(model)
        _, self.info, self.tokenizer = message
        self.info: ModelInfo
        self.tokenizer: Tokenizer
        # Commands go out through a writer thread: a pipe write blocks while the pipe is full (a long prompt
        # during a long step), and the event loop must never wait for the engine.
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name=f"cumulo-engine-writer:{model}", daemon=True)
        self._writer.start()
        # request id -> (its event loop, its queue); the reader thread hands outputs over with call_soon_threadsafe
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._health_waiters: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[EngineHealth]]] = {}
        self._health_ids = itertools.count()
        self._down: str | None = None  # why the engine can no longer serve, once it cannot
        self._reader = threading.Thread(target=self._read, name=f"cumulo-engine-reader:{model}", daemon=True)
        self._reader.start()

    def _wait_ready(self, model: str) -> tuple:
        """The engine process's ("ready", info, tokenizer); on any failure the process is reaped, the pipe
        closed, and the error raised (the engine's own error where it sent one)."""
        error: BaseException
        try:
            if not self._conn.poll(START_TIMEOUT_S):
                self._process.kill()
                error = EngineUnavailable(
                    f"the engine for {model!r} did not start within {START_TIMEOUT_S:.0f} s"
                )
            else:
                message = self._conn.recv()
                if message[0] != "failed":
                    return message
                error = message[1]
        except (EOFError, OSError):
            error = EngineUnavailable(f"the engine process for {model!r} exited while loading")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()
        raise error

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # -- the EngineClient interface -------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self._down is not None:
            raise EngineUnavailable(self._down)
        params.validate()  # refuse bad parameters here, without a round trip
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self._send(("add", request_id, list(prompt_token_ids), params))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # refused or failed: the engine holds nothing for it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._down is None:
                with contextlib.suppress(EngineUnavailable):
                    self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        if self._down is None:
            with contextlib.suppress(EngineUnavailable):
                self._send(("abort", request_id))

    async def health(self) -> EngineHealth:
        if self._down is not None:
            return EngineHealth(ok=False, detail=self._down)
        token = next(self._health_ids)
        future: asyncio.Future[EngineHealth] = asyncio.get_running_loop().create_future()
        self._health_waiters[token] = (asyncio.get_running_loop(), future)
        try:
            self._send(("health", token))
            return await asyncio.wait_for(future, HEALTH_TIMEOUT_S)
        except EngineUnavailable as exc:
            return EngineHealth(ok=False, detail=str(exc))
        except TimeoutError:
            return EngineHealth(ok=False, detail=f"the engine did not answer within {HEALTH_TIMEOUT_S:.0f} s")
        finally:
            self._health_waiters.pop(token, None)

    def shutdown(self) -> None:
        if self._down is None:
            with contextlib.suppress(EngineUnavailable):
                self._send(("shutdown",))
            self._fail_all(f"the engine of {self.info.name!r} has shut down")
        self._outbox.put(None)  # the writer sends what is queued, then stops
        self._writer.join(10)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    # -- plumbing ---------------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        if self._down is not None:
            raise EngineUnavailable(self._down)
        self._outbox.put(message)

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError) as exc:  # a closed pipe: the engine process is gone
                self._fail_all(f"the engine process of {self.info.name!r} is gone ({exc})")
                return

    def _read(self) -> None:
        try:
            self._read_messages()
        except (EOFError, OSError):
            code = self._process.exitcode
            self._fail_all(
                f"the engine process of {self.info.name!r} exited"
                + (f" (exit code {code})" if code is not None else "")
            )
        except Exception as exc:  # a message that cannot be read or handed over: fail loudly, never hang
            log.exception("reading from the engine process failed")
            self._fail_all(f"reading from the engine process of {self.info.name!r} failed: {exc}")

    def _read_messages(self) -> None:
        while True:
            message = self._conn.recv()
            kind = message[0]
            if kind == "out":
                self._deliver_step(message[1])
            elif kind == "refused":
                self._deliver(message[1], message[2])
            elif kind == "health":
                waiter = self._health_waiters.get(message[1])
                if waiter is not None:
                    waiter[0].call_soon_threadsafe(_resolve, waiter[1], message[2])
            elif kind == "fatal":  # a step failed: the requests it held failed with it (and were aborted)
                error = EngineUnavailable(f"the engine failed: {message[1]}")
                for rid in message[2]:
                    self._deliver(rid, error)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs, handed to each event loop in one call (not one wake-up per stream)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], RequestOutput]]] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            with contextlib.suppress(RuntimeError):  # the request's loop has closed: nobody is listening
                entry[0].call_soon_threadsafe(entry[1].put_nowait, item)

    def _fail_all(self, why: str) -> None:
        if self._down is None:
            self._down = why
        for rid in list(self._streams):
            self._deliver(rid, EngineUnavailable(why))
        for loop, future in list(self._health_waiters.values()):
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future, EngineHealth(ok=False, detail=why))


def _put_all(items: list[tuple[asyncio.Queue[Any], RequestOutput]]) -> None:
    for stream, out in items:
        stream.put_nowait(out)


def _resolve(future: asyncio.Future[EngineHealth], value: EngineHealth) -> None:
    if not future.done():
        future.set_result(value)


# -- the engine process ---------------------------------------------------------------------------------
def _core_main(
    conn: Connection, model: str, factory: Callable[..., Any] | None, options: dict[str, Any]
) -> None:
    """Loads the engine, reports ready, then alternates: take every pending command, run one step, send
    that step's outputs in one message. Waits on the pipe only while nothing is running."""
    # Ctrl-C and a SIGTERM to the whole process group reach the gateway too, which drains its streams and then
    # shuts this process down (or it sees the pipe close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if factory is None:
            from cumulo.engine.factory import create_engine
            from cumulo.engine.llm_engine import EngineConfig

            engine = create_engine(model, EngineConfig(**options))
        else:
            engine = factory(**options)
        conn.send(("ready", engine.model_info(), engine.tokenizer))
    except Exception as exc:
        error = exc if isinstance(exc, CumuloError) else EngineUnavailable(f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(OSError):
            conn.send(("failed", error))
        return
    with contextlib.suppress(EOFError, OSError):  # the gateway is gone: nothing left to serve
        _serve(engine, conn)


def _serve(engine: Any, conn: Connection) -> None:
    running: set[str] = set()  # request ids the engine holds
    while True:
        if not running or conn.poll(0):
            while True:
                message = conn.recv()  # blocks only while nothing runs
                if message[0] == "shutdown":
                    return
                _handle(engine, conn, message, running)
                if running and not conn.poll(0):
                    break
        try:
            outputs = engine.step()
        except Exception as exc:  # a broken step fails its requests, not the process
            log.exception("engine step failed")
            for rid in running:
                engine.abort(rid)
            conn.send(("fatal", f"{type(exc).__name__}: {exc}", sorted(running)))
            running.clear()
            continue
        for out in outputs:
            if out.finished:
                running.discard(out.request_id)
        if outputs:
            conn.send(("out", outputs))


def _handle(engine: Any, conn: Connection, message: tuple, running: set[str]) -> None:
    kind = message[0]
    if kind == "add":
        _, rid, prompt, params = message
        try:
            engine.add_request(prompt, params, rid)
            running.add(rid)
        except CumuloError as exc:
            conn.send(("refused", rid, exc))
        except Exception as exc:
            conn.send(("refused", rid, EngineUnavailable(f"the engine could not take the request: {exc}")))
    elif kind == "abort":
        engine.abort(message[1])
    elif kind == "health":
        running_now, waiting = engine.load()
        conn.send(("health", message[1], EngineHealth(ok=True, num_running=running_now, num_waiting=waiting)))
