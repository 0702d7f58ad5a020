"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, and a prefix cache of full blocks.

A full block is identified by a chained hash of its tokens and of every token before it, so two prompts that
share a prefix share its blocks. The hash is cryptographic (BLAKE2b): in a multi-tenant service a crafted
collision of a weak hash would hand one tenant another's cached keys and values. Freed blocks keep their hash and stay findable until the block is reused
(least recently freed first), which is what makes a repeated system prompt cheap. Plain Python, no tensors.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from cumulo.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    tokens: tuple[int, ...] = ()


def chain_hash(prev: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """The hash of a full block: its tokens chained to the hash of the block before it."""
    h = hashlib.blake2b(prev or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """The chained hashes of a prompt's full blocks, as the block manager keys its prefix cache: what a
    router compares to guess which replica already holds a prompt's prefix."""
    out: list[bytes] = []
    prev: bytes | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = chain_hash(prev, tuple(token_ids[start : start + block_size]))
        out.append(prev)
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # chained hash -> block id
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evicted from the prefix cache
        block.hash, block.tokens, block.ref_count = None, (), 1
        return block_id

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table so the next `num_new_tokens` tokens have slots."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free_block())

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the longest cached prefix of a fresh sequence; returns tokens matched.

        At least one prompt token is always left to compute, since the step that computes it yields the
        logits for the first output token.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        matched: list[int] = []
        prev: bytes | None = seq.cache_salt  # None for the base model; an adapter's own chain otherwise
        for start in range(0, seq.num_tokens - 1 - (bs - 1), bs):  # full blocks, excluding the last token
            tokens = tuple(seq.token_ids[start : start + bs])
            h = chain_hash(prev, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            matched.append(block_id)
            prev = h
        for block_id in matched:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free.pop(block_id)
            block.ref_count += 1
        seq.block_table = matched
        seq.num_computed_tokens = len(matched) * bs
        return seq.num_computed_tokens

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly filled blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        prev: bytes | None = seq.cache_salt
        for i in range(seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                block.hash = chain_hash(prev, tokens)
                block.tokens = tokens
                self.cached.setdefault(block.hash, block.block_id)
            prev = block.hash

    def free_sequence(self, seq: Sequence) -> None:
        # Release in reverse so a sequence's tail blocks are evicted before its (more shareable) head.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
