"""The pool: only ready members get traffic, drain cuts nothing, and a lost replica's requests continue
elsewhere as if nothing happened (greedy tokens and text equal to an undisturbed run, no delta twice or lost)."""

from __future__ import annotations

import asyncio

import pytest

from cumulo.cluster.pool import Member, Pool
from cumulo.cluster.sim_engine import SimulatedEngine
from cumulo.contracts import RequestOutput, SamplingParams
from cumulo.errors import EngineUnavailable, InvalidRequest
from tests.support.pool_engines import DyingClient, make_pool, tiny_member
from tests.support.tiny import CharTokenizer


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]


async def collect(client, ids: list[int], params: SamplingParams) -> list[RequestOutput]:
    return [out async for out in client.generate(ids, params)]


def tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def text(outputs: list[RequestOutput]) -> str:
    return "".join(o.new_text for o in outputs)


PROMPT = CharTokenizer().encode("The pool keeps streaming")


@pytest.fixture(scope="module")
def reference() -> list[RequestOutput]:
    """An undisturbed greedy run of 16 tokens on one tiny engine (every tiny engine has the same weights)."""
    pool = make_pool(tiny_member("solo"))
    try:
        return asyncio.run(collect(pool, PROMPT, greedy(16)))
    finally:
        pool.shutdown()


def failing_pool(die_after: int, lost: list[str]) -> tuple[Pool, DyingClient, DyingClient]:
    """Round-robin sends the first request to "a", which dies after `die_after` deltas; "b" takes over."""
    a, b = tiny_member("a", die_after), tiny_member("b", node="node-b")
    return make_pool(a, b, policy="round-robin", lost=lost), a.client, b.client  # type: ignore[return-value]


def sim_member(name: str, state: str = "ready") -> Member:
    return Member(name, "node", SimulatedEngine(time_scale=0.0), state)


def sim_pool(*members: Member, **kw: object) -> Pool:
    first = members[0].client
    pool = Pool(first.info, first.tokenizer, **kw)  # type: ignore[arg-type]
    for m in members:
        pool.add(m)
    return pool


@pytest.mark.parametrize("die_after", [0, 1, 4, 9])
def test_a_lost_replica_s_request_continues_with_the_tokens_of_an_undisturbed_run(
    die_after: int, reference: list[RequestOutput]
) -> None:
    lost: list[str] = []
    pool, a, b = failing_pool(die_after, lost)
    try:
        outputs = asyncio.run(collect(pool, PROMPT, greedy(16)))
        assert tokens(outputs) == tokens(reference) and text(outputs) == text(reference)
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
        assert outputs[-1].finish_reason == "length"
        assert len(a.started) == 1 and len(b.started) == 1  # each replica asked once
        assert lost == ["a"]
        states = {s["name"]: s for s in pool.status()}
        assert states["a"]["state"] == "unhealthy" and states["a"]["failures"] == 1
        assert states["b"]["state"] == "ready" and states["b"]["served"] == 1
        health = asyncio.run(pool.health())
        assert health.ok and "a" in health.detail
    finally:
        pool.shutdown()


def _boundary(reference: list[RequestOutput]) -> tuple[int, str]:
    """A hand-over point k (tokens sent before the death) where the text has at least two characters and the
    last character before k plus the first after it occur nowhere earlier: a stop string across it."""
    tok = CharTokenizer()
    ids = tokens(reference)
    full = tok.decode(ids)
    for k in range(3, len(ids) - 2):
        before, after = tok.decode(ids[:k]), tok.decode(ids[k : k + 1])
        if len(before) >= 2 and after and full.find(before[-1] + after) == len(before) - 1:
            return k, before
    raise AssertionError("no usable hand-over point in the reference run")


def test_a_stop_string_spanning_the_hand_over_is_still_found(reference: list[RequestOutput]) -> None:
    k, before = _boundary(reference)
    stop = before[-1] + CharTokenizer().decode(tokens(reference)[k : k + 1])
    undisturbed = make_pool(tiny_member("solo"))
    pool, _, _ = failing_pool(k, [])
    try:
        expected = asyncio.run(collect(undisturbed, PROMPT, greedy(16, stop=[stop])))
        outputs = asyncio.run(collect(pool, PROMPT, greedy(16, stop=[stop])))
        assert expected[-1].finish_reason == "stop" and outputs[-1].finish_reason == "stop"
        assert text(outputs) == text(expected) == before[:-1]
        assert tokens(outputs) == tokens(expected)
    finally:
        undisturbed.shutdown()
        pool.shutdown()


def test_text_held_back_for_a_possible_stop_is_not_lost_on_migration(reference: list[RequestOutput]) -> None:
    k, before = _boundary(reference)
    full = text(reference)
    unused = next(c for c in "~`|{}^" if c not in full)
    stop = before[-2:] + unused  # its first two characters arrive just before the death, then never the third
    pool, _, _ = failing_pool(k, [])
    try:
        outputs = asyncio.run(collect(pool, PROMPT, greedy(16, stop=[stop])))
        assert text(outputs) == full and tokens(outputs) == tokens(reference)
        assert outputs[-1].finish_reason == "length"
    finally:
        pool.shutdown()


def test_concurrent_streams_on_a_dying_replica_lose_and_repeat_no_delta(
    reference: list[RequestOutput],
) -> None:
    lost: list[str] = []
    pool, a, _ = failing_pool(5, lost)

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(pool, PROMPT, greedy(16)) for _ in range(6)))

    try:
        runs = asyncio.run(main())
        assert len(a.started) == 3  # round-robin gave "a" half of them before it died
        for outputs in runs:
            assert tokens(outputs) == tokens(reference) and text(outputs) == text(reference)
            assert sum(o.finished for o in outputs) == 1 and outputs[-1].finished
        assert lost == ["a"]
    finally:
        pool.shutdown()


def test_a_request_that_kills_every_replica_it_touches_ends_after_max_attempts() -> None:
    lost: list[str] = []
    members = [tiny_member(f"m{i}", die_after=2) for i in range(3)]
    pool = make_pool(*members, policy="round-robin", max_attempts=2, lost=lost)
    try:
        seen: list[RequestOutput] = []

        async def main() -> None:
            async for out in pool.generate(PROMPT, greedy(16)):
                seen.append(out)

        with pytest.raises(EngineUnavailable):
            asyncio.run(main())
        assert len(lost) == 2 and sum(len(m.client.started) for m in members) == 2  # type: ignore[attr-defined]
        assert len(tokens(seen)) == 4 and not any(o.finished for o in seen)
    finally:
        pool.shutdown()


def test_with_no_ready_member_a_request_fails_at_once() -> None:
    pool = sim_pool(sim_member("s", "starting"), sim_member("d", "draining"), sim_member("u", "unhealthy"))
    with pytest.raises(EngineUnavailable):
        asyncio.run(collect(pool, [3, 4, 5], greedy(2)))
    health = asyncio.run(pool.health())
    assert not health.ok and "u" in health.detail


def test_bad_input_is_refused_by_one_member_and_never_retried() -> None:
    lost: list[str] = []
    pool, a, b = failing_pool(99, lost)
    try:
        with pytest.raises(InvalidRequest):
            asyncio.run(collect(pool, [], greedy(2)))
        assert len(a.started) + len(b.started) == 1 and lost == []
        assert all(s["state"] == "ready" for s in pool.status())
    finally:
        pool.shutdown()


def test_only_ready_members_get_requests() -> None:
    members = [sim_member("ready"), sim_member("starting", "starting"), sim_member("draining", "draining")]
    pool = sim_pool(*members, policy="round-robin")

    async def main() -> None:
        await asyncio.gather(*(collect(pool, [3 + i, 4, 5], greedy(2)) for i in range(6)))

    asyncio.run(main())
    served = {s["name"]: s["served"] for s in pool.status()}
    assert served == {"ready": 6, "starting": 0, "draining": 0}
    pool.set_state("starting", "ready")
    asyncio.run(main())
    served = {s["name"]: s["served"] for s in pool.status()}
    assert served["starting"] > 0 and served["draining"] == 0


def test_drain_returns_once_in_flight_requests_end_and_cuts_none() -> None:
    pool = sim_pool(sim_member("a"), sim_member("b"), policy="round-robin")

    async def main() -> tuple[list[RequestOutput], bool, dict]:
        stream = pool.generate([3, 4, 5], greedy(30))  # round-robin: goes to "a"
        outputs = [await anext(stream)]
        drain = asyncio.create_task(pool.drain("a"))
        for _ in range(20):
            await asyncio.sleep(0)
        drained_early = drain.done()
        await collect(pool, [6, 7, 8], greedy(2))  # new work goes to "b" only
        outputs += [o async for o in stream]
        await drain
        return outputs, drained_early, {s["name"]: s for s in pool.status()}

    outputs, drained_early, status = asyncio.run(main())
    assert not drained_early
    assert len(tokens(outputs)) == 30 and outputs[-1].finish_reason == "length"
    assert status["a"]["state"] == "draining" and status["a"]["in_flight"] == 0 and status["a"]["served"] == 1
    assert status["b"]["served"] == 1


def test_removing_a_member_and_shutdown_reach_every_client() -> None:
    members = [sim_member("a"), sim_member("b")]
    pool = sim_pool(*members)
    assert pool.remove("a") is members[0]
    assert [s["name"] for s in pool.status()] == ["b"]
    pool.shutdown()
    assert not asyncio.run(members[1].client.health()).ok
    assert asyncio.run(members[0].client.health()).ok  # removed: no longer the pool's to stop
    with pytest.raises(InvalidRequest):
        pool.set_state("b", "sleepy")


def test_the_prefix_aware_pool_sends_a_shared_prefix_to_the_member_that_holds_it() -> None:
    pool = sim_pool(sim_member("a"), sim_member("b"), sim_member("c"))
    system = [3 + (i * 7) % 30 for i in range(64)]  # four 16-token blocks

    async def main() -> list[int]:
        for i in range(6):
            await collect(pool, system + [3 + i, 4, 5], greedy(2))
        return [s["served"] for s in pool.status()]

    served = asyncio.run(main())
    assert sorted(served) == [0, 0, 6]
    assert max(s["prefix_hit_rate"] for s in pool.status()) > 0.8
    cached = [o.num_cached_tokens for o in asyncio.run(collect(pool, system + [9], greedy(2)))]
    assert cached[0] == 64 and len(set(cached)) == 1


def test_closing_a_migrated_stream_early_frees_the_request_on_the_member_that_has_it() -> None:
    a, b = sim_member("a"), sim_member("b")
    pool = sim_pool(a, b, policy="round-robin")
    prompt = [3 + i % 20 for i in range(40)]
    whole = tokens(asyncio.run(collect(SimulatedEngine(time_scale=0.0), prompt, greedy(20))))

    async def main() -> list[RequestOutput]:
        seen: list[RequestOutput] = []
        stream = pool.generate(prompt, greedy(20))
        async for out in stream:
            seen.append(out)
            if len(seen) == 3:
                a.client.die()  # type: ignore[attr-defined]
            if len(seen) == 8:
                break
        await stream.aclose()
        return seen

    seen = asyncio.run(main())
    assert tokens(seen) == whole[:8]  # the simulated engine's greedy tokens follow the context alone
    health = asyncio.run(b.client.health())
    assert health.ok and health.num_running == 0 and health.num_waiting == 0
    assert [s["state"] for s in pool.status()] == ["unhealthy", "ready"]


def test_health_marks_a_member_that_says_it_is_down_as_lost() -> None:
    lost: list[str] = []
    a, b = sim_member("a"), sim_member("b")
    pool = sim_pool(a, b, on_member_lost=lost.append)
    assert asyncio.run(pool.health()).ok and lost == []
    b.client.die()  # type: ignore[attr-defined]
    health = asyncio.run(pool.health())
    assert health.ok and "b" in health.detail and lost == ["b"]
    a.client.die()  # type: ignore[attr-defined]
    assert not asyncio.run(pool.health()).ok and lost == ["b", "a"]
    with pytest.raises(EngineUnavailable):
        asyncio.run(collect(pool, [3, 4], greedy(2)))
