"""Continuous batching with chunked prefill and preemption by recompute.

Every step the scheduler hands out a token budget: running sequences first (a decode costs one token, an
unfinished prefill continues with the next chunk), then waiting sequences in arrival order, each taking at most
what budget is left, so a long prompt is cut into chunks and never stalls the decodes. When the KV cache runs out
of blocks, the most recently admitted running sequence is preempted: its blocks are freed and it goes back to the
front of the queue to be recomputed later, keeping the tokens it has generated. Plain Python, no device code.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from cumulo.engine.block_manager import BlockManager
from cumulo.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """Sequences for one step, decodes (one new token each) first, then prefill chunks."""

    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]  # (sequence, tokens to compute this step)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        decodes: list[Sequence] = []
        prefills: list[tuple[Sequence, int]] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            while not bm.can_allocate(seq, n):
                victim = self.running[-1]  # never an already scheduled one: those sit before index i
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: everything after it is gone too
            bm.allocate(seq, n)
            # Only a sequence with exactly one token left is a decode: a one-token chunk in the middle of a
            # prompt must not be sampled from.
            (decodes.append(seq) if remaining == 1 else prefills.append((seq, n)))
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0 and not seq.block_table:
                matched = bm.match_prefix(seq)
                if seq.num_preemptions == 0:  # after a preemption the match covers its own output: not billed
                    seq.num_cached_tokens = max(seq.num_cached_tokens, min(matched, seq.num_prompt_tokens))
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            if not bm.can_allocate(seq, n):
                # Wait for running sequences to finish. Alone it always fits: the engine sizes the cache
                # for at least one sequence of max_model_len tokens. Let go of any prefix blocks meanwhile.
                bm.free_sequence(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            bm.allocate(seq, n)
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.perf_counter()
            (decodes.append(seq) if remaining == 1 else prefills.append((seq, n)))
            budget -= n
        return ScheduledBatch(decodes, prefills)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free_sequence(seq)
