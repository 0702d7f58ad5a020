"""BlockManager bookkeeping: block tables grow with tokens, frees return blocks, and the prefix cache shares full
blocks safely (token-verified, never the last prompt token, least recently freed evicted first)."""

from __future__ import annotations

import pytest

from cumulo.contracts import SamplingParams
from cumulo.engine.block_manager import BlockManager
from cumulo.engine.sequence import Sequence


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams())


def compute(bm: BlockManager, s: Sequence, n: int | None = None) -> None:
    """What the engine does for a step: allocate, mark the tokens computed, register full blocks."""
    n = s.num_tokens - s.num_computed_tokens if n is None else n
    bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.commit(s)


def test_a_cache_without_blocks_is_refused() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 4)


@pytest.mark.parametrize(("tokens", "blocks"), [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3), (12, 3), (13, 4)])
def test_allocation_gives_exactly_the_blocks_the_tokens_need(tokens: int, blocks: int) -> None:
    bm = BlockManager(10, 4)
    s = seq(list(range(tokens)))
    assert bm.blocks_needed(s, tokens) == blocks
    bm.allocate(s, tokens)
    assert len(s.block_table) == blocks
    assert len(set(s.block_table)) == blocks
    assert bm.num_free_blocks == 10 - blocks
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)


def test_decoding_adds_a_block_only_when_the_last_one_is_full() -> None:
    bm = BlockManager(10, 4)
    s = seq([1, 2, 3])
    compute(bm, s)
    sizes = []
    for token in range(4, 11):  # decode one token at a time up to 10 tokens
        s.token_ids.append(token)
        compute(bm, s, 1)
        sizes.append(len(s.block_table))
    # tokens 4..10: blocks hold 4 tokens, so a third block appears at token 9
    assert sizes == [1, 2, 2, 2, 2, 3, 3]


def test_allocating_again_for_tokens_that_already_have_slots_takes_nothing() -> None:
    bm = BlockManager(10, 4)
    s = seq([1, 2, 3, 4, 5, 6])
    bm.allocate(s, 6)
    table = list(s.block_table)
    bm.allocate(s, 2)  # still within the 8 slots of two blocks
    assert s.block_table == table and bm.num_free_blocks == 8


def test_can_allocate_compares_what_is_needed_with_free_blocks() -> None:
    bm = BlockManager(3, 4)
    s = seq(list(range(20)))
    assert bm.can_allocate(s, 12)
    assert not bm.can_allocate(s, 13)
    bm.allocate(s, 8)
    s.num_computed_tokens = 8
    assert bm.can_allocate(s, 4) and not bm.can_allocate(s, 5)  # one block left: slots for 4 more tokens


def test_free_returns_every_block_and_resets_the_sequence() -> None:
    bm = BlockManager(6, 4)
    s = seq(list(range(10)))
    compute(bm, s)
    bm.free_sequence(s)
    assert bm.num_free_blocks == 6
    assert s.block_table == [] and s.num_computed_tokens == 0
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_a_new_prompt_reuses_the_full_blocks_of_a_finished_one() -> None:
    bm = BlockManager(8, 4)
    first = seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "a")
    compute(bm, first)
    shared = first.block_table[:2]
    bm.free_sequence(first)
    second = seq([1, 2, 3, 4, 5, 6, 7, 8, 99, 98, 97], "b")
    assert bm.match_prefix(second) == 8
    assert second.block_table == shared and second.num_computed_tokens == 8
    assert bm.num_free_blocks == 6  # the two shared blocks left the free list
    assert [bm.blocks[b].ref_count for b in shared] == [1, 1]


def test_running_sequences_share_prefix_blocks_with_reference_counts() -> None:
    bm = BlockManager(8, 4)
    first = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    compute(bm, first)
    second = seq([1, 2, 3, 4, 5, 6, 7, 8, 50], "b")
    assert bm.match_prefix(second) == 8
    shared = list(second.block_table)
    assert shared == first.block_table[:2]
    assert [bm.blocks[b].ref_count for b in shared] == [2, 2]
    compute(bm, second)
    bm.free_sequence(first)
    assert [bm.blocks[b].ref_count for b in shared] == [1, 1]
    assert not set(shared) & set(bm.free)  # still in use by the second sequence
    bm.free_sequence(second)
    assert bm.num_free_blocks == 8


def test_the_prefix_match_always_leaves_the_last_prompt_token_to_compute() -> None:
    bm = BlockManager(8, 4)
    compute(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    exact = seq([1, 2, 3, 4, 5, 6, 7, 8], "b")  # two full cached blocks, but its last token must run
    assert bm.match_prefix(exact) == 4
    one_more = seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "c")
    assert bm.match_prefix(one_more) == 8
    single_block = seq([1, 2, 3, 4], "d")
    assert bm.match_prefix(single_block) == 0 and single_block.block_table == []


def test_a_partly_filled_block_is_never_shared() -> None:
    bm = BlockManager(8, 4)
    compute(bm, seq([1, 2, 3, 4, 5, 6], "a"))  # block 2 holds only 5, 6
    other = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "b")
    assert bm.match_prefix(other) == 4


def test_the_same_block_after_a_different_prefix_does_not_match() -> None:
    bm = BlockManager(8, 4)
    compute(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    other = seq([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")  # second block equal, first differs
    assert bm.match_prefix(other) == 0


def test_a_hash_hit_with_different_tokens_is_not_a_match() -> None:
    bm = BlockManager(8, 4)
    bm._chain = lambda prev, tokens: 7  # type: ignore[method-assign]  # every block collides
    compute(bm, seq([1, 2, 3, 4, 5], "a"))
    other = seq([9, 9, 9, 9, 5], "b")
    assert bm.match_prefix(other) == 0 and other.block_table == []
    same = seq([1, 2, 3, 4, 5], "c")
    assert bm.match_prefix(same) == 4


def test_eviction_takes_the_least_recently_freed_block_and_a_sequence_tail_before_its_head() -> None:
    bm = BlockManager(4, 2)
    a = seq([1, 2, 3, 4, 0], "a")
    b = seq([5, 6, 7, 8, 0], "b")
    bm.allocate(a, 4)
    a.num_computed_tokens = 4
    bm.commit(a)
    bm.allocate(b, 4)
    b.num_computed_tokens = 4
    bm.commit(b)
    assert bm.num_free_blocks == 0
    a_head, a_tail = a.block_table
    bm.free_sequence(a)  # freed first: a's blocks are the oldest free ones, its tail oldest of all
    bm.free_sequence(b)
    fresh = seq([42, 43], "x")
    bm.allocate(fresh, 2)
    assert fresh.block_table == [a_tail]
    assert bm.match_prefix(seq([1, 2, 3, 4, 0], "a2")) == 2  # a's head survives, its tail was evicted
    assert bm.match_prefix(seq([5, 6, 7, 8, 0], "b2")) == 4  # b untouched


def test_an_evicted_block_leaves_the_prefix_cache() -> None:
    bm = BlockManager(1, 2)
    a = seq([1, 2, 3], "a")
    bm.allocate(a, 2)
    a.num_computed_tokens = 2
    bm.commit(a)
    bm.free_sequence(a)
    other = seq([8, 9], "b")
    compute(bm, other)  # reuses the only block, with other tokens
    bm.free_sequence(other)
    assert bm.match_prefix(seq([1, 2, 3], "c")) == 0
    assert bm.cached == {bm.blocks[0].hash: 0}


def test_prefix_caching_off_shares_nothing() -> None:
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    first = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    compute(bm, first)
    bm.free_sequence(first)
    assert bm.cached == {}
    assert bm.match_prefix(seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "b")) == 0
