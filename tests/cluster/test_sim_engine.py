"""The simulated engine: continuous batching, a prefix cache that saves prefill, deterministic tokens, and a
death that fails every stream."""

from __future__ import annotations

import asyncio

import pytest

from cumulo.cluster.sim_engine import SimulatedEngine
from cumulo.contracts import RequestOutput, SamplingParams
from cumulo.errors import EngineUnavailable, InvalidRequest


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)  # type: ignore[arg-type]


async def collect(engine: SimulatedEngine, ids: list[int], params: SamplingParams) -> list[RequestOutput]:
    return [out async for out in engine.generate(ids, params)]


def tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


PROMPT = [2 + (i * 11) % 31 for i in range(200)]


def test_running_requests_share_decode_steps() -> None:
    engine = SimulatedEngine(time_scale=0.0)

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(engine, PROMPT[: 20 + i], greedy(8)) for i in range(4)))

    runs = asyncio.run(main())
    assert all(len(tokens(r)) == 8 and r[-1].finish_reason == "length" for r in runs)
    assert engine.steps == 1 + 7  # one prefill of all four, then seven decode steps of the batch


def test_a_cached_prefix_is_not_prefilled_again() -> None:
    engine = SimulatedEngine(time_scale=0.0)
    asyncio.run(collect(engine, PROMPT, greedy(1)))
    cold = engine.busy_s
    again = asyncio.run(collect(engine, PROMPT[:192] + [5, 6, 7], greedy(1)))
    assert again[0].num_cached_tokens == 192
    assert engine.busy_s - cold < cold  # simulated seconds: 3 new tokens cost less than 200


def test_greedy_tokens_depend_only_on_the_context_so_a_continuation_repeats_them() -> None:
    engine = SimulatedEngine(time_scale=0.0)
    whole = tokens(asyncio.run(collect(engine, PROMPT[:30], greedy(12))))
    rest = tokens(asyncio.run(collect(SimulatedEngine(time_scale=0.0), PROMPT[:30] + whole[:5], greedy(7))))
    assert rest == whole[5:]
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=7)
    assert tokens(asyncio.run(collect(engine, PROMPT[:30], seeded))) == tokens(
        asyncio.run(collect(engine, PROMPT[:30], seeded))
    )


def test_stop_strings_are_trimmed_and_text_is_the_decoded_tokens() -> None:
    engine = SimulatedEngine(time_scale=0.0)
    full = asyncio.run(collect(engine, PROMPT[:30], greedy(12)))
    text = "".join(o.new_text for o in full)
    assert text == engine.tokenizer.decode(tokens(full))
    stop = text[4:6]
    cut = asyncio.run(collect(engine, PROMPT[:30], greedy(12, stop=[stop])))
    assert cut[-1].finish_reason == "stop" and "".join(o.new_text for o in cut) == text[: text.index(stop)]


def test_a_dead_engine_fails_open_streams_and_new_requests() -> None:
    engine = SimulatedEngine(time_scale=0.0)

    async def main() -> list[RequestOutput]:
        seen: list[RequestOutput] = []
        with pytest.raises(EngineUnavailable):
            async for out in engine.generate(PROMPT[:10], greedy(50)):
                seen.append(out)
                if len(seen) == 3:
                    engine.die()
        return seen

    assert len(asyncio.run(main())) == 3
    assert not asyncio.run(engine.health()).ok
    with pytest.raises(EngineUnavailable):
        asyncio.run(collect(engine, PROMPT[:10], greedy(2)))


def test_bad_prompts_are_refused() -> None:
    engine = SimulatedEngine(time_scale=0.0, max_model_len=64)
    for ids in ([], [999], PROMPT[:64]):
        with pytest.raises(InvalidRequest):
            asyncio.run(collect(engine, ids, greedy(2)))
