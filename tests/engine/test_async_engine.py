"""The asyncio face of the engine: concurrent streams each get complete, ordered output, and a consumer that
walks away aborts its request and frees its KV blocks."""

from __future__ import annotations

import asyncio

from cumulo.contracts import SamplingParams
from cumulo.engine.async_engine import AsyncEngine


def test_concurrent_streams_each_receive_all_their_tokens(make_engine) -> None:
    engine = AsyncEngine(make_engine())

    async def one(i: int) -> tuple[list[int], list[int], str | None]:
        streamed: list[int] = []
        last = None
        params = SamplingParams(max_tokens=5 + i, temperature=0.0, ignore_eos=True)
        async for out in engine.generate([3 + i, 4, 5, 6], params):
            streamed.extend(out.new_token_ids)
            last = out
        assert last is not None
        return streamed, last.finish_reason

    async def main():
        return await asyncio.gather(*(one(i) for i in range(8)))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for i, (streamed, reason) in enumerate(results):
        assert len(streamed) == 5 + i and reason == "length"


def test_leaving_the_stream_early_aborts_and_frees_blocks(make_engine) -> None:
    llm = make_engine()
    free = llm.block_manager.num_free_blocks
    engine = AsyncEngine(llm)

    async def main() -> int:
        seen = 0
        stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        for _ in range(200):  # the engine thread processes the abort at its next step
            if not llm.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return seen

    try:
        assert asyncio.run(main()) == 3
    finally:
        engine.shutdown()
    assert not llm.has_unfinished_requests()
    assert llm.block_manager.num_free_blocks == free
