"""Paged attention in plain PyTorch: the KV cache, the per-step `AttentionContext`, and the attention math.

Layout: one K and one V tensor per layer, shaped [num_kv_heads, num_blocks, block_size, head_dim]. Gathering a
sequence's blocks by its block table then yields [num_kv_heads, blocks, block_size, head_dim], which is already
contiguous per head, so grouped-query attention runs as one batched matmul with no repeated K/V and no copies
beyond the gather itself. Multi-head latent attention layers (DeepSeek-V3, `cumulo.models.mla`) cache one
tensor per layer instead, [num_blocks, block_size, latent_dim]: each token's compressed latent and its shared
rotary key, which every head reads. Decode tokens (one query each) are batched together; prefill chunks run one
sequence at a time. With `kv_cache=None` the context is a single causal sequence (used by perplexity and parity
checks, where no cache is wanted), or, with `segment_ids`, several packed examples that attend only within
themselves (fine-tuning packs short examples this way; positions restart at 0 in each).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _untouched_zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor on fresh anonymous pages of its own mapping.

    The kernel hands such pages out zeroed and makes them resident only when first written, so the part of a
    cache budget no sequence has reached costs no memory (torch.zeros would write, and so keep, every page;
    torch.empty may reuse freed, non-zero heap memory for sizes under the allocator's mmap threshold).
    The tensor keeps the mapping alive and unmaps it when freed.
    """
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # not a POSIX system: plain zeros
        return torch.zeros(numel, dtype=dtype)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    pages = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype, count=numel)


class KVCache:
    """Per layer either K and V (`k`, `v`: [num_kv_heads, num_blocks, block_size, head_dim]) or, with
    `latent_dim`, one latent tensor (`latent`: [num_blocks, block_size, latent_dim]; `k` and `v` empty)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        latent_dim: int = 0,
    ) -> None:
        if latent_dim:
            shape: tuple[int, ...] = (num_blocks, block_size, latent_dim)
            per_layer = num_blocks * block_size * latent_dim
        else:
            shape = (num_kv_heads, num_blocks, block_size, head_dim)
            per_layer = 2 * num_kv_heads * num_blocks * block_size * head_dim
        total = num_layers * per_layer
        if torch.device(device).type == "cpu":
            flat = _untouched_zeros(total, dtype)
        else:
            flat = torch.zeros(total, dtype=dtype, device=device)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.latent: list[torch.Tensor] = []
        if latent_dim:
            self.latent = list(flat.view(num_layers, *shape).unbind(0))
        else:
            views = flat.view(2 * num_layers, *shape)
            self.k = [views[2 * i] for i in range(num_layers)]
            self.v = [views[2 * i + 1] for i in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size


@dataclass(slots=True)
class PrefillChunk:
    start: int  # index of the chunk's first token in the flattened batch
    num_tokens: int
    context_len: int  # tokens with K/V after this step (cached + this chunk)
    block_table: torch.Tensor  # [num_blocks_of_seq] long


@dataclass(slots=True)
class AttentionContext:
    kv_cache: KVCache | None
    slot_mapping: torch.Tensor | None = None  # [T] flat cache slot of each token
    num_decode: int = 0  # the first num_decode tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks]
    decode_context_lens: torch.Tensor | None = None  # [num_decode]
    prefills: list[PrefillChunk] = field(default_factory=list)
    # A platform's fused paged decode kernel (see Platform.paged_decode_attention), else the PyTorch path.
    paged_decode_attention: Callable[..., torch.Tensor] | None = None
    # Masks depend only on the step (and a layer's window), not the layer: built once, reused by every layer.
    masks: dict[tuple[str, int, int | None], torch.Tensor] = field(default_factory=dict)
    # Only with kv_cache=None: [T] long, which packed example each token belongs to (training packs short
    # examples into one sequence); attention stays inside an example. None: the T tokens are one sequence.
    segment_ids: torch.Tensor | None = None


def _write_cache(k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, layer: int) -> None:
    cache = ctx.kv_cache
    assert cache is not None and ctx.slot_mapping is not None
    heads, _, _, dim = cache.k[layer].shape
    cache.k[layer].view(heads, -1, dim)[:, ctx.slot_mapping] = k.transpose(0, 1).to(cache.k[layer].dtype)
    cache.v[layer].view(heads, -1, dim)[:, ctx.slot_mapping] = v.transpose(0, 1).to(cache.v[layer].dtype)


def _attend(
    q: torch.Tensor,  # [kv_heads, batch, group * q_len, dim] (queries of one kv head grouped together)
    k: torch.Tensor,  # [kv_heads, batch, keys, dim]
    v: torch.Tensor,
    mask: torch.Tensor,  # broadcastable to [kv_heads, batch, group * q_len, keys], True = may attend
    scale: float,
) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    scores.masked_fill_(~mask, float("-inf"))
    # softmax in fp32 whatever the cache dtype: bf16 probabilities lose too much for long contexts
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


def _decode(
    q: torch.Tensor, ctx: AttentionContext, layer: int, scale: float, window: int | None
) -> torch.Tensor:
    cache = ctx.kv_cache
    assert cache is not None and ctx.decode_block_tables is not None and ctx.decode_context_lens is not None
    batch, heads, dim = q.shape
    kv_heads = cache.k[layer].shape[0]
    tables = ctx.decode_block_tables
    k = cache.k[layer][:, tables].flatten(2, 3)  # [kv_heads, batch, keys, dim]
    v = cache.v[layer][:, tables].flatten(2, 3)
    mask = ctx.masks.get(("decode", 0, window))
    if mask is None:
        lens = ctx.decode_context_lens
        idx = torch.arange(k.shape[2], device=q.device)
        mask = idx[None, :] < lens[:, None]
        if window is not None:
            mask &= idx[None, :] >= (lens[:, None] - window)
        mask = ctx.masks[("decode", 0, window)] = mask[None, :, None, :]
    qg = q.view(batch, kv_heads, heads // kv_heads, dim).transpose(0, 1)  # [kv_heads, batch, group, dim]
    out = _attend(qg, k, v, mask, scale)  # [kv_heads, batch, group, dim]
    return out.transpose(0, 1).reshape(batch, heads, dim)


def _prefill_mask(n: int, keys: int, group: int, window: int | None, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(keys - n, keys, device=device)
    k_pos = torch.arange(keys, device=device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > (q_pos[:, None] - window)
    return mask.repeat(group, 1)[None, None]


def _prefill(
    q: torch.Tensor,  # [n, heads, dim]
    k: torch.Tensor,  # [kv_heads, keys, dim]
    v: torch.Tensor,
    scale: float,
    window: int | None,
    masks: dict | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    n, heads, dim = q.shape
    kv_heads, keys, _ = k.shape
    group = heads // kv_heads
    mask = None if masks is None else masks.get(("prefill", chunk, window))
    if mask is None:
        mask = _prefill_mask(n, keys, group, window, q.device)
        if masks is not None:
            masks[("prefill", chunk, window)] = mask
    # queries ordered (kv_head, group, position) so each kv head serves its group with one matmul
    qg = q.view(n, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, 1, group * n, dim)
    out = _attend(qg, k[:, None], v[:, None], mask, scale)
    return out.view(kv_heads, group, n, dim).permute(2, 0, 1, 3).reshape(n, heads, dim)


def _packed(
    q: torch.Tensor,  # [n, heads, dim]
    k: torch.Tensor,  # [n, kv_heads, dim]
    v: torch.Tensor,
    ctx: AttentionContext,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Packed training examples: causal within each example, through torch's fused attention (it runs forward and
    backward without the [heads, n, n] score tensors that `_attend` keeps for autograd). One mask per step and
    window, [n, n], shared by every layer."""
    mask = ctx.masks.get(("packed", 0, window))
    if mask is None:
        assert ctx.segment_ids is not None
        n = q.shape[0]
        mask = _prefill_mask(n, n, 1, window, q.device)[0, 0]
        mask = mask & (ctx.segment_ids[:, None] == ctx.segment_ids[None, :])
        ctx.masks[("packed", 0, window)] = mask
    group = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1).repeat_interleave(group, 0)[None],
        v.transpose(0, 1).repeat_interleave(group, 0)[None],
        attn_mask=mask,
        scale=scale,
    )
    return out[0].transpose(0, 1)


def paged_attention(
    q: torch.Tensor,  # [T, heads, dim], rotary applied
    k: torch.Tensor | None,  # [T, kv_heads, dim]; None when the caller already wrote k and v to the cache
    v: torch.Tensor | None,
    ctx: AttentionContext,
    layer: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    if ctx.kv_cache is None:
        assert k is not None and v is not None
        if ctx.segment_ids is None:
            return _prefill(q, k.transpose(0, 1), v.transpose(0, 1), scale, window)
        return _packed(q, k, v, ctx, scale, window)
    if k is not None and v is not None:
        _write_cache(k, v, ctx, layer)
    nd = ctx.num_decode
    cache = ctx.kv_cache
    kernel = ctx.paged_decode_attention
    if nd == q.shape[0] and kernel is not None:  # all decodes: the kernel's output is the answer
        return kernel(
            q, cache.k[layer], cache.v[layer], ctx.decode_block_tables, ctx.decode_context_lens, scale, window
        )
    out = torch.empty_like(q)
    if nd and kernel is not None:
        out[:nd] = kernel(
            q[:nd],
            cache.k[layer],
            cache.v[layer],
            ctx.decode_block_tables,
            ctx.decode_context_lens,
            scale,
            window,
        )
    elif nd:
        out[:nd] = _decode(q[:nd], ctx, layer, scale, window)
    for i, chunk in enumerate(ctx.prefills):
        blocks_k = cache.k[layer][:, chunk.block_table].flatten(1, 2)[:, : chunk.context_len]
        blocks_v = cache.v[layer][:, chunk.block_table].flatten(1, 2)[:, : chunk.context_len]
        sl = slice(chunk.start, chunk.start + chunk.num_tokens)
        out[sl] = _prefill(q[sl], blocks_k, blocks_v, scale, window, ctx.masks, i)
    return out
