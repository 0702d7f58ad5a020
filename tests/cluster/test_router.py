"""Routing policies: the prefix holder wins, the load gate overrides it, round-robin spreads, a lost member's
prefixes are forgotten."""

from __future__ import annotations

import pytest

from cumulo.cluster.router import PrefixAware, RoundRobin, make_router
from cumulo.errors import InvalidRequest

BLOCK = 4
SYSTEM = list(range(10, 26))  # four full blocks


def idle(*names: str) -> dict[str, int]:
    return dict.fromkeys(names, 0)


def test_a_prompt_goes_to_the_member_holding_its_longest_prefix() -> None:
    router = PrefixAware(BLOCK)
    first = router.route(SYSTEM + [1, 2], idle("a", "b", "c"))
    # A shorter match elsewhere loses to the longest one.
    other = next(n for n in "abc" if n != first)
    router.route(SYSTEM[:4], idle(other))  # one block of it
    for i in range(5):
        assert router.route(SYSTEM + [3 + i], idle("a", "b", "c")) == first
    assert router.hit_rate(first) > 0.6 and router.hit_rate() > 0.5


def test_the_load_gate_sends_work_to_the_least_loaded_member() -> None:
    router = PrefixAware(BLOCK, gate=2)
    holder = router.route(SYSTEM, idle("a", "b"))
    other = "b" if holder == "a" else "a"
    assert router.route(SYSTEM, {holder: 2, other: 0}) == holder  # exactly `gate` more: affinity holds
    assert router.route(SYSTEM, {holder: 3, other: 0}) == other  # more than `gate`: the least-loaded wins


def test_without_a_cached_prefix_the_least_loaded_member_wins() -> None:
    router = PrefixAware(BLOCK)
    assert router.route([5, 6, 7, 8, 9], {"a": 3, "b": 1, "c": 2}) == "b"


def test_round_robin_spreads_requests_evenly_whatever_they_share() -> None:
    router = RoundRobin(BLOCK)
    picks = [router.route(SYSTEM, idle("a", "b", "c", "d")) for _ in range(8)]
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert router.hit_rate() < 0.6  # it counts prefix hits too, for comparison


def test_a_forgotten_member_matches_nothing_and_a_full_memory_drops_the_oldest_prefix() -> None:
    router = PrefixAware(BLOCK)
    holder = router.route(SYSTEM, idle("a"))
    router.forget(holder)
    router.route(SYSTEM, idle("a"))
    assert router.stats[holder].blocks_matched == 0
    small = PrefixAware(BLOCK, max_blocks=4)
    small.route(SYSTEM, idle("a"))
    small.route(list(range(50, 66)), idle("a"))  # four new blocks push the first four out
    small.route(SYSTEM, idle("a"))
    assert small.stats["a"].blocks_matched == 0


def test_an_unknown_policy_is_refused() -> None:
    assert isinstance(make_router("round-robin", BLOCK), RoundRobin)
    with pytest.raises(InvalidRequest):
        make_router("random", BLOCK)
