"""The conformance suite every `EngineClient` must pass: what the service relies on, whichever engine it has.

Each test runs against every implementation in `CLIENTS`: the service tests' fake, the in-process engine, the
engine process, a pool of two engines, and a Ray replica on a node of a real local Ray pool. Tests ask only the seam's own
vocabulary: `generate`, `abort`, `health`, `shutdown`, `info`, `tokenizer`, and deltas.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator

import pytest

from cumulo.cluster.engine_process import EngineProcess
from cumulo.contracts import EngineClient, ModelInfo, RequestOutput, SamplingParams
from cumulo.engine.async_engine import AsyncEngine
from cumulo.errors import EngineUnavailable, InvalidRequest
from tests.service.fakes import FakeEngine
from tests.support.pool_engines import make_pool
from tests.support.ray_pool import make_ray_replica
from tests.support.tiny import make_tiny_engine

CLIENTS: dict[str, Callable[[], EngineClient]] = {
    "fake": FakeEngine,
    "in-process": lambda: AsyncEngine(make_tiny_engine()),
    "engine-process": lambda: EngineProcess("tiny-llama", factory=make_tiny_engine),
    "pool": make_pool,  # two in-process tiny engines behind a Pool
    "ray-replica": make_ray_replica,  # a tiny engine in a Ray actor on a node of a local Ray pool
}


@pytest.fixture(scope="module", params=list(CLIENTS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def client(kind: str) -> Iterator[EngineClient]:
    """One engine per implementation for the whole module (an engine process takes seconds to start); each
    test leaves it idle, as it found it."""
    engine = CLIENTS[kind]()
    yield engine
    engine.shutdown()


@pytest.fixture
def fresh_client(kind: str) -> Iterator[EngineClient]:
    """An engine of its own, for a test that shuts it down."""
    engine = CLIENTS[kind]()
    yield engine
    engine.shutdown()


def prompt(client: EngineClient, text: str = "Hello there") -> list[int]:
    return client.tokenizer.encode(text)


async def collect(client: EngineClient, ids: list[int], params: SamplingParams) -> list[RequestOutput]:
    return [out async for out in client.generate(ids, params)]


def text_of(outputs: list[RequestOutput]) -> str:
    return "".join(o.new_text for o in outputs)


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def test_it_is_an_engine_client_with_model_info(client: EngineClient) -> None:
    assert isinstance(client.info, ModelInfo)
    assert client.info.name and client.info.seal.startswith("sha256:") and client.info.max_model_len > 8
    for method in ("generate", "abort", "health", "shutdown"):
        assert callable(getattr(client, method))
    assert inspect.iscoroutinefunction(client.abort) and inspect.iscoroutinefunction(client.health)
    assert client.tokenizer.decode(client.tokenizer.encode("abc", add_special_tokens=False)) == "abc"


def test_outputs_are_deltas_ending_with_one_finished(client: EngineClient) -> None:
    outputs = asyncio.run(collect(client, prompt(client), greedy(7)))
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert outputs[-1].finish_reason == "length"
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert sum(len(o.new_token_ids) for o in outputs) == 7
    assert len({o.request_id for o in outputs}) == 1
    # Deltas, not snapshots: the decoded tokens are the concatenated text deltas.
    ids = [t for o in outputs for t in o.new_token_ids]
    assert text_of(outputs) == client.tokenizer.decode(ids)


def test_concurrent_requests_each_get_their_own_stream(client: EngineClient) -> None:
    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(
            *(collect(client, prompt(client, f"q{i}"), greedy(3 + i)) for i in range(4))
        )

    for i, outputs in enumerate(asyncio.run(main())):
        assert sum(len(o.new_token_ids) for o in outputs) == 3 + i and outputs[-1].finished


def test_greedy_is_repeatable_and_a_seed_repeats_a_sample(client: EngineClient) -> None:
    ids = prompt(client)
    assert text_of(asyncio.run(collect(client, ids, greedy(8)))) == text_of(
        asyncio.run(collect(client, ids, greedy(8)))
    )
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
    first = [t for o in asyncio.run(collect(client, ids, seeded)) for t in o.new_token_ids]
    second = [t for o in asyncio.run(collect(client, ids, seeded)) for t in o.new_token_ids]
    assert first == second


def test_a_stop_string_ends_the_request_and_never_reaches_the_client(client: EngineClient) -> None:
    ids = prompt(client)
    full = text_of(asyncio.run(collect(client, ids, greedy(12))))
    stop = full[3:5]
    outputs = asyncio.run(collect(client, ids, greedy(12, stop=[stop])))
    assert outputs[-1].finish_reason == "stop"
    assert text_of(outputs) == full[: full.index(stop)]


def test_logprobs_come_with_every_token(client: EngineClient) -> None:
    outputs = asyncio.run(collect(client, prompt(client), greedy(5, logprobs=2)))
    for o in outputs:
        assert len(o.new_logprobs) == len(o.new_token_ids)
        for lp, token in zip(o.new_logprobs, o.new_token_ids, strict=True):
            assert lp.token_id == token and lp.logprob <= 0.0 and len(lp.top) == 2
    assert sum(len(o.new_logprobs) for o in outputs) == 5


def test_closing_the_stream_early_aborts_the_request(client: EngineClient) -> None:
    async def main() -> int:
        stream = client.generate(prompt(client), greedy(400))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.aclose()
        for _ in range(200):  # the engine drops the request at its next step
            if (await client.health()).num_running == 0:
                break
            await asyncio.sleep(0.01)
        return seen

    assert asyncio.run(main()) == 2
    health = asyncio.run(client.health())
    assert health.ok and health.num_running == 0 and health.num_waiting == 0
    # It still serves the next request in full.
    assert sum(len(o.new_token_ids) for o in asyncio.run(collect(client, prompt(client), greedy(4)))) == 4


def test_abort_by_id_ends_the_stream(client: EngineClient) -> None:
    async def main() -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        async for out in client.generate(prompt(client), greedy(400), request_id="to-abort"):
            outputs.append(out)
            if len(outputs) == 2:
                await client.abort("to-abort")
            if len(outputs) > 300:
                break
        await client.abort("no-such-request")  # unknown ids are ignored
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort" and len(outputs) < 300


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=0),
        SamplingParams(temperature=-1.0),
        SamplingParams(top_p=0.0),
        SamplingParams(logprobs=99),
    ],
    ids=["max_tokens=0", "temperature<0", "top_p=0", "logprobs>20"],
)
def test_bad_parameters_are_refused_before_any_output(client: EngineClient, params: SamplingParams) -> None:
    with pytest.raises(InvalidRequest):
        asyncio.run(collect(client, prompt(client), params))
    assert asyncio.run(client.health()).ok


def test_an_empty_or_too_long_prompt_is_refused(client: EngineClient) -> None:
    with pytest.raises(InvalidRequest):
        asyncio.run(collect(client, [], greedy(2)))
    too_long = prompt(client, "x") * client.info.max_model_len
    with pytest.raises(InvalidRequest):
        asyncio.run(collect(client, too_long, greedy(2)))


def test_after_shutdown_health_says_so_and_requests_fail_cleanly(fresh_client: EngineClient) -> None:
    client = fresh_client
    assert asyncio.run(client.health()).ok
    client.shutdown()
    health = asyncio.run(client.health())
    assert not health.ok and health.detail
    with pytest.raises(EngineUnavailable):
        asyncio.run(collect(client, prompt(client), greedy(2)))
    client.shutdown()  # a second shutdown is harmless
