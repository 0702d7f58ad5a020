"""Scheduler policy, driven step by step with a stand-in for the engine: token budget, max_num_seqs, decodes
before waiting prefills, chunked prompts, preemption of the newest sequence, and a lone sequence always fitting."""

from __future__ import annotations

from cumulo.contracts import SamplingParams
from cumulo.engine.block_manager import BlockManager
from cumulo.engine.scheduler import ScheduledBatch, Scheduler
from cumulo.engine.sequence import Sequence, SequenceStatus

NEXT_TOKEN = 7  # what the stand-in "model" always samples


def seq(rid: str, num_prompt_tokens: int, first: int = 100) -> Sequence:
    return Sequence(rid, list(range(first, first + num_prompt_tokens)), SamplingParams())


def make(
    num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 64, prefix: bool = True
) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, prefix), max_num_seqs, budget)


def run(s: Scheduler, batch: ScheduledBatch) -> None:
    """The engine's bookkeeping after a forward: mark tokens computed, sample where the known tokens end."""
    for q in batch.decodes:
        q.num_computed_tokens += 1
        q.token_ids.append(NEXT_TOKEN)
    for q, n in batch.prefills:
        q.num_computed_tokens += n
        if q.num_computed_tokens == q.num_tokens:
            q.token_ids.append(NEXT_TOKEN)
    for q in batch.decodes + [q for q, _ in batch.prefills]:
        s.block_manager.commit(q)


def step(s: Scheduler) -> ScheduledBatch:
    batch = s.schedule()
    run(s, batch)
    return batch


def assert_blocks_consistent(s: Scheduler) -> None:
    """Every running sequence has exactly the blocks its computed tokens need; no block is lost or doubled."""
    bm = s.block_manager
    refs: dict[int, int] = {}
    for q in s.running:
        assert len(q.block_table) >= -(-q.num_computed_tokens // bm.block_size)
        for b in q.block_table:
            refs[b] = refs.get(b, 0) + 1
    for q in s.waiting:
        assert q.block_table == [] and q.num_computed_tokens == 0
    for block in bm.blocks:
        assert block.ref_count == refs.get(block.block_id, 0)
        assert (block.block_id in bm.free) == (block.ref_count == 0)


def test_an_empty_scheduler_schedules_nothing() -> None:
    s = make()
    assert not s.schedule() and not s.has_unfinished()


def test_the_token_budget_caps_each_step_and_cuts_the_prompt_that_overflows_it() -> None:
    s = make(budget=10)
    a, b, c = seq("a", 6), seq("b", 6), seq("c", 6)
    for q in (a, b, c):
        s.add(q)
    batch = s.schedule()
    assert batch.num_tokens == 10
    assert batch.prefills == [(a, 6), (b, 4)]
    assert list(s.waiting) == [c] and s.running == [a, b]
    assert a.status is SequenceStatus.RUNNING and c.status is SequenceStatus.WAITING


def test_max_num_seqs_caps_the_running_set_and_the_rest_wait_their_turn() -> None:
    s = make(max_num_seqs=2)
    queue = [seq(str(i), 3) for i in range(5)]
    for q in queue:
        s.add(q)
    step(s)
    assert s.running == queue[:2] and list(s.waiting) == queue[2:]
    for _ in range(3):
        assert len(step(s).decodes) == 2  # still only the first two, decoding
    s.finish(queue[0], "stop")
    batch = s.schedule()
    assert s.running == [queue[1], queue[2]]
    assert batch.decodes == [queue[1]] and batch.prefills == [(queue[2], 3)]


def test_running_decodes_are_scheduled_before_waiting_prefills() -> None:
    s = make(budget=4)
    a = seq("a", 3)
    s.add(a)
    step(s)
    b, c = seq("b", 10), seq("c", 10)
    s.add(b)
    s.add(c)
    batch = s.schedule()
    assert batch.decodes == [a]
    assert batch.prefills == [(b, 3)]  # only what the decode left of the budget
    assert list(s.waiting) == [c]


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks_while_others_keep_decoding() -> None:
    s = make(budget=8)
    short = seq("short", 2)
    s.add(short)
    step(s)
    long = seq("long", 30)
    s.add(long)
    chunks = []
    while long.num_computed_tokens < 30:
        batch = step(s)
        assert short in batch.decodes  # the decode runs every step, the prompt never stalls it
        chunks.extend(n for q, n in batch.prefills if q is long)
    assert chunks == [7, 7, 7, 7, 2]
    assert long.token_ids[-1] == NEXT_TOKEN  # sampled once, when the last chunk completed the prompt


def test_a_one_token_chunk_in_the_middle_of_a_prompt_is_not_scheduled_as_a_decode() -> None:
    # The engine samples a token for every sequence in `decodes`; a 1-token chunk that leaves prompt tokens
    # still to compute must therefore be a prefill, or a token would be sampled in the middle of the prompt.
    s = make(budget=5)
    a, b = seq("a", 4), seq("b", 10)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    for q in batch.decodes:
        assert q.num_computed_tokens + 1 == q.num_tokens, (
            f"{q.request_id} is mid-prompt but scheduled as a decode"
        )
    assert (b, 1) in batch.prefills


def test_when_blocks_run_out_the_newest_running_sequence_is_preempted_and_requeued_first() -> None:
    s = make(num_blocks=4, block_size=2)
    older, newer, waiting = seq("older", 3), seq("newer", 3, first=200), seq("waiting", 3, first=300)
    s.add(older)
    s.add(newer)
    step(s)  # both prompts computed: 2 blocks each, the cache is full; each sampled its first token
    s.add(waiting)
    batch = step(s)  # the 4th token of each fits in its second block
    assert batch.decodes == [older, newer]
    batch = s.schedule()  # the 5th token needs a third block: there is none
    assert batch.decodes == [older]
    assert s.running == [older]
    assert list(s.waiting) == [newer, waiting]
    assert newer.status is SequenceStatus.WAITING and newer.num_preemptions == 1 and s.num_preemptions == 1
    assert newer.block_table == [] and newer.num_computed_tokens == 0
    assert newer.token_ids == [200, 201, 202, NEXT_TOKEN, NEXT_TOKEN]  # generated tokens are kept
    assert_blocks_consistent(s)


def test_the_newest_sequence_preempts_itself_and_spares_those_already_scheduled() -> None:
    s = make(num_blocks=4, block_size=2)
    older, newer = seq("older", 3), seq("newer", 4, first=200)
    s.add(older)
    s.add(newer)
    step(s)  # prompts computed, 2 blocks each: the cache is full
    # older's 4th token fits its second block; newer's 5th needs a third block, and only newer can give one up
    batch = s.schedule()
    assert batch.decodes == [older] and not batch.prefills
    assert s.running == [older] and list(s.waiting) == [newer]
    assert newer.num_preemptions == 1 and older.num_preemptions == 0
    assert_blocks_consistent(s)


def test_a_preempted_sequence_is_recomputed_with_its_generated_tokens_once_room_returns() -> None:
    s = make(num_blocks=4, block_size=2, prefix=False)
    older, newer = seq("older", 3), seq("newer", 3, first=200)
    s.add(older)
    s.add(newer)
    step(s)
    step(s)
    step(s)  # newer preempted here
    assert list(s.waiting) == [newer]
    s.finish(older, "stop")
    assert s.block_manager.num_free_blocks == 4
    batch = s.schedule()
    assert batch.prefills == [(newer, 5)]  # prompt and both generated tokens, recomputed
    assert s.running == [newer]


def test_a_sequence_alone_grows_to_the_whole_cache_without_being_preempted() -> None:
    s = make(num_blocks=4, block_size=2, budget=3)
    alone = seq("alone", 5)
    s.add(alone)
    while alone.num_tokens < 8:  # 8 tokens = every slot of the cache
        step(s)
        assert s.running == [alone]
    assert s.num_preemptions == 0 and alone.num_computed_tokens == 7 and len(alone.block_table) == 4


def test_a_prompt_that_fits_only_alone_waits_until_the_cache_is_free() -> None:
    s = make(num_blocks=4, block_size=2)
    small, big = seq("small", 3), seq("big", 7, first=200)
    s.add(small)
    step(s)
    s.add(big)
    for _ in range(2):
        batch = step(s)
        assert batch.decodes == [small] and not batch.prefills
        assert list(s.waiting) == [big]
        assert_blocks_consistent(s)
    s.finish(small, "stop")
    batch = s.schedule()
    assert batch.prefills == [(big, 7)] and s.running == [big]


def test_a_waiting_prompt_picks_up_the_cached_prefix_and_computes_only_the_rest() -> None:
    s = make(block_size=4)
    first = seq("first", 10)
    s.add(first)
    step(s)
    s.finish(first, "stop")
    second = seq("second", 12)  # same first 10 tokens (100..109) plus two more
    s.add(second)
    batch = s.schedule()
    assert batch.prefills == [(second, 4)]
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8


def test_cached_tokens_never_exceed_the_prompt_after_a_preemption() -> None:
    # num_cached_tokens feeds usage records ("cached prompt tokens"); a recompute after preemption matches
    # blocks that hold generated tokens too, which must not count as cached prompt.
    s = make(num_blocks=6, block_size=2)
    older, newer = seq("older", 3), seq("newer", 3, first=200)
    s.add(older)
    s.add(newer)
    while newer.num_preemptions == 0:
        step(s)
    s.finish(older, "stop")
    step(s)
    assert newer.num_cached_tokens <= newer.num_prompt_tokens


def test_finish_frees_the_blocks_of_running_and_waiting_sequences() -> None:
    s = make(num_blocks=8, block_size=4, budget=4)
    a, b = seq("a", 4), seq("b", 6)
    s.add(a)
    s.add(b)
    step(s)
    s.finish(a, "stop")
    s.finish(b, "abort")
    assert a.is_finished and b.finish_reason == "abort"
    assert not s.has_unfinished()
    assert s.block_manager.num_free_blocks == 8
