"""Autoscaling: the decision (up when a new request's predicted TTFT would miss the SLO or the queue is deep, to
the fewest replicas that fix it; down by one after a sustained calm with margin; never outside min and max; a
cooldown between changes), and the controller acting on it: new replicas placed, a scaled-down one drained
without cutting its request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from cumulo.cluster.autoscale import Policy, ReplicaLoad, ScaleState, decide
from cumulo.cluster.controller import Wanted
from cumulo.contracts import SamplingParams
from cumulo.errors import InvalidRequest
from tests.support.controller_fakes import Rig, node

POLICY = Policy(queue_depth=4, margin=0.25, down_after_s=60, cooldown_s=30)
FIRST = ScaleState()


def scale(loads: list[tuple[int, int]], current: int, low: int = 1, high: int = 4, *, state=FIRST, now=0.0,
          slo: float | None = None, ttft: float | None = 100.0, batch: int = 8):  # fmt: skip
    return decide(
        [ReplicaLoad(r, w) for r, w in loads], current, low, high, max_sequences=batch,
        predicted_ttft_ms=ttft, ttft_slo_ms=slo, now=now, state=state, policy=POLICY,
    )  # fmt: skip


def test_a_queue_that_would_miss_the_ttft_slo_adds_the_replicas_that_bring_it_back() -> None:
    # 8 running + 24 waiting on one replica of batch 8: a new request waits 3 batches, (3 + 1) * 100 ms
    d = scale([(32, 24)], 1, slo=250.0)
    assert d.predicted_ttft_ms == pytest.approx(400.0)
    assert d.wanted == 2  # 32 over 2 replicas leaves 8 queued on each: (8 / 8 + 1) * 100 = 200 ms <= 250
    assert d.reason == "up to 2: predicted TTFT 400 ms over the SLO 250 ms (24 queued)"
    assert scale([(32, 24)], 1, slo=150.0).wanted == 3  # 32 / 3 - 8 = 2.7 queued: 133 ms
    assert scale([(32, 24)], 1, high=2, slo=150.0).wanted == 2  # no more than the maximum
    assert scale([(12, 4)], 1, slo=250.0).wanted == 1  # (4 / 8 + 1) * 100 = 150 ms meets it


def test_no_replica_is_added_when_nothing_is_queued_even_if_a_full_batch_misses_the_slo() -> None:
    d = scale([(8, 0)], 1, slo=50.0)  # another replica would not shorten a running batch
    assert d.wanted == 1 and d.reason.startswith("steady")


def test_without_an_slo_the_queue_per_replica_decides() -> None:
    d = scale([(8, 10)], 1, ttft=None)
    assert d.wanted == 2 and d.reason == "up to 2: 10.0 queued per replica, over 4"
    assert scale([(8, 3)], 1, ttft=None).wanted == 1


def test_never_below_the_minimum_or_above_the_maximum() -> None:
    assert scale([], 0, low=2).wanted == 2
    assert scale([(0, 0)] * 5, 5, high=4).wanted == 4
    full = scale([(8, 40)], 4, high=4, ttft=None)
    assert full.wanted == 4 and full.reason.endswith("at the maximum of 4")
    assert scale([(0, 0)], 2, low=2, state=ScaleState(calm_since=-1000.0), now=1000.0).wanted == 2
    with pytest.raises(InvalidRequest):
        scale([], 1, low=3, high=2)


def test_a_fixed_count_is_kept_whatever_the_load() -> None:
    d = scale([(8, 100)], 2, low=2, high=2)
    assert (d.wanted, d.reason) == (2, "fixed at 2 replicas")


def test_down_by_one_only_after_the_load_fits_one_fewer_for_the_whole_period() -> None:
    # 3 replicas of batch 8; 2 open requests fit 2 replicas' 16 with 25% to spare
    d = scale([(1, 0), (1, 0), (0, 0)], 3, now=100.0)
    assert d.wanted == 3 and d.reason.endswith("for 0 s of 60 s")
    d = scale([(1, 0), (1, 0), (0, 0)], 3, state=d.state, now=159.0)
    assert d.wanted == 3
    d = scale([(1, 0), (1, 0), (0, 0)], 3, state=d.state, now=160.0)
    assert d.wanted == 2 and d.reason.startswith("down to 2: 2 open requests would fit 2 replicas")
    assert d.state.last_change == 160.0 and d.state.calm_since is None


def test_a_busy_moment_restarts_the_calm_period() -> None:
    d = scale([(1, 0), (1, 0), (0, 0)], 3, now=100.0)
    busy = scale([(8, 0), (8, 0), (0, 0)], 3, state=d.state, now=130.0)  # 16 > 12: no room in two
    assert busy.wanted == 3 and busy.state.calm_since is None
    d = scale([(1, 0), (1, 0), (0, 0)], 3, state=busy.state, now=140.0)
    assert scale([(1, 0), (1, 0), (0, 0)], 3, state=d.state, now=190.0).wanted == 3  # 50 s of calm
    assert scale([(1, 0), (1, 0), (0, 0)], 3, state=d.state, now=200.0).wanted == 2


def test_no_change_within_the_cooldown_of_the_last() -> None:
    up = scale([(8, 10)], 1, ttft=None, now=0.0)
    assert up.wanted == 2
    again = scale([(8, 40), (0, 0)], 2, ttft=None, state=up.state, now=10.0)
    assert again.wanted == 2 and again.reason.endswith("cooling down after the last change")
    assert scale([(8, 40), (0, 0)], 2, ttft=None, state=up.state, now=30.0).wanted > 2


# -- the controller acting on it ---------------------------------------------------------------------
MODEL = "smollm2-135m"


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig([Wanted(MODEL, MODEL, 1, min_replicas=1, max_replicas=3)], [node("a"), node("b"), node("c")],
            MODEL, autoscale=POLICY, policy="round-robin")  # fmt: skip
    yield r
    r.launcher.stop_all()


def test_a_deep_queue_adds_a_replica_and_a_calm_drains_one_away_without_cutting_its_request(rig: Rig) -> None:
    rig.reconcile()
    assert len(rig.rows("ready")) == 1
    first = rig.launcher.running[f"{MODEL}#0"]
    batch = first.options["max_num_seqs"]
    first.load = (batch, 12)  # a full batch and 12 more waiting
    rig.reconcile()
    (decision,) = rig.controller.decisions()
    assert (decision["replicas"], decision["min_replicas"], decision["max_replicas"]) == (2, 1, 3)
    assert decision["reason"] == "up to 2: 12.0 queued per replica, over 4"
    assert sorted(r["node"] for r in rig.rows("ready")) == ["a", "b"]
    assert len(rig.engines[MODEL].status()) == 2
    first.load = None  # the queue is gone: the engines report their own load from now on

    pool = rig.engines[MODEL]
    prompt = pool.tokenizer.encode("calm")
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def scenario() -> tuple[list[list[int]], list[str | None], list[dict]]:
        streams = [pool.generate(prompt, params) for _ in range(2)]
        got = [list((await anext(s)).new_token_ids) for s in streams]
        assert [m["in_flight"] for m in pool.status()] == [1, 1]  # one open request on each replica
        for step in (31.0, 60.0):  # past the cooldown, calm starts; a whole calm period later, down
            rig.clock.advance(step)
            await asyncio.to_thread(rig.reconcile)
        during = rig.rows()
        assert not rig.launcher.running[f"{MODEL}#1"].stopped  # kept while its request streams
        reasons = []
        for i, s in enumerate(streams):
            async for out in s:
                got[i] += out.new_token_ids
                reasons.append(out.finish_reason)
        return got, reasons, during

    got, reasons, during = asyncio.run(scenario())
    assert {r["replica"]: r["state"] for r in during} == {f"{MODEL}#0": "ready", f"{MODEL}#1": "draining"}
    assert rig.controller.decisions()[0]["reason"].startswith(
        "down to 1: 2 open requests would fit 1 replica"
    )
    assert [len(g) for g in got] == [40, 40] and [r for r in reasons if r] == ["length", "length"]
    rig.reconcile()
    assert rig.launcher.running[f"{MODEL}#1"].stopped
    assert [m["name"] for m in pool.status()] == [f"{MODEL}#0"]


def test_a_replica_wanted_again_while_it_drains_serves_again(rig: Rig) -> None:
    rig.reconcile()
    rig.launcher.running[f"{MODEL}#0"].load = (rig.launcher.running[f"{MODEL}#0"].options["max_num_seqs"], 12)
    rig.reconcile()
    rig.launcher.running[f"{MODEL}#0"].load = None
    pool = rig.engines[MODEL]

    async def scenario() -> list[str]:
        prompt = pool.tokenizer.encode("again")
        streams = [pool.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0)) for _ in range(2)]
        for s in streams:
            await anext(s)
        for step in (31.0, 60.0):
            rig.clock.advance(step)
            await asyncio.to_thread(rig.reconcile)
        states = [m["state"] for m in pool.status()]
        rig.wanted = [
            Wanted(MODEL, MODEL, 1, min_replicas=2, max_replicas=3)
        ]  # the operator raises the floor
        await asyncio.to_thread(rig.reconcile)
        for s in streams:
            async for _ in s:
                pass
        return states

    assert asyncio.run(scenario()) == ["ready", "draining"]
    assert [m["state"] for m in pool.status()] == ["ready", "ready"]
    assert [r.name for r in rig.launcher.started] == [f"{MODEL}#0", f"{MODEL}#1"]  # no third start
    assert not any(r.stopped for r in rig.launcher.started)
