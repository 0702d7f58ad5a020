"""What the engine process adds to the conformance suite: it fails cleanly when it cannot load, and when it
dies every open stream ends with an error instead of hanging, and health says so."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from cumulo.cluster.engine_process import EngineProcess
from cumulo.contracts import SamplingParams
from cumulo.errors import CumuloError, EngineUnavailable, InvalidModel
from tests.support.engines import crash_while_building, refuse_to_build, tiny_engine_whose_third_step_fails
from tests.support.tiny import make_tiny_engine


def test_a_model_that_cannot_load_raises_its_own_error(tmp_path) -> None:
    with pytest.raises(CumuloError) as raised:
        EngineProcess(str(tmp_path / "no-such-model"))
    assert "no-such-model" in str(raised.value)


def test_an_error_while_building_comes_back_as_it_was_raised() -> None:
    with pytest.raises(InvalidModel, match=r"cannot build with \['threads'\]"):
        EngineProcess("tiny", factory=refuse_to_build, threads=1)
    with pytest.raises(EngineUnavailable, match="ZeroDivisionError: a bug in the loader"):
        EngineProcess("tiny", factory=crash_while_building)


def test_when_the_engine_process_dies_open_streams_fail_and_health_says_so() -> None:
    engine = EngineProcess("tiny", factory=make_tiny_engine)
    params = SamplingParams(max_tokens=100_000 // 256, temperature=0.0, ignore_eos=True)

    async def main() -> tuple[int, BaseException | None]:
        seen, error = 0, None
        try:
            async for _ in engine.generate([5, 6, 7], params):
                seen += 1
                if seen == 2:
                    os.kill(engine.pid, signal.SIGKILL)
        except EngineUnavailable as exc:
            error = exc
        return seen, error

    try:
        seen, error = asyncio.run(main())
        assert seen >= 2 and error is not None and "exited" in str(error)
        health = asyncio.run(engine.health())
        assert not health.ok and "exited" in health.detail
        with pytest.raises(EngineUnavailable):
            asyncio.run(_first(engine))
    finally:
        engine.shutdown()


async def _first(engine: EngineProcess) -> None:
    async for _ in engine.generate([5, 6], SamplingParams(max_tokens=2)):
        return


def test_a_failed_step_fails_its_requests_and_the_engine_serves_the_next() -> None:
    engine = EngineProcess("tiny", factory=tiny_engine_whose_third_step_fails)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    async def tokens() -> int:
        return sum([len(out.new_token_ids) async for out in engine.generate([5, 6, 7], params)])

    try:
        with pytest.raises(EngineUnavailable, match="the engine failed: RuntimeError: device lost"):
            asyncio.run(tokens())
        assert asyncio.run(tokens()) == 20
        health = asyncio.run(engine.health())
        assert health.ok and health.num_running == 0
    finally:
        engine.shutdown()
