"""Multi-head latent attention (DeepSeek-V2/V3): the paged cache holds, per token, one compressed latent
(kv_lora_rank wide, after kv_a_layernorm) and one rotary key shared by all heads (qk_rope_head_dim), not
per-head keys and values: 576 numbers per token and layer for DeepSeek-V3 instead of 128 heads x 2 x 128.

kv_b_proj expands a latent into each head's non-rotary key and value. Prefill expands the cached latents of
its sequence and attends as ordinary multi-head attention (the product is compute-bound there, and expansion
is the cheaper form for many queries). Decode uses the absorbed form instead: the key half of kv_b_proj is
folded into the query (q_nope W_UK, per head, into latent space), scores are taken against the cached
latents directly (+ q_pe . k_pe), the probabilities weight the latents, and only that one weighted latent per
head goes through the value half W_UV. Decode never expands the cache, so it reads 576 numbers per cached token.
"""

from __future__ import annotations

import torch
from torch import nn

from cumulo.models.attention import AttentionContext, _prefill_mask
from cumulo.models.config import ModelConfig
from cumulo.models.layers import RMSNorm, RotaryEmbedding, yarn_softmax_scale

LORA_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm use the default eps, not rms_norm_eps (as DeepSeek)


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of a plain, platform-kernel or packed linear, as a dense `dtype` tensor."""
    packed = getattr(linear, "packed", None)
    if packed is not None:
        return packed.dequantize(dtype)
    weight: torch.Tensor = linear.weight
    return weight.to(dtype)


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        qk_dim = self.nope + self.rope
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_lora_rank = config.q_lora_rank
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, heads * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=bias)
        self.rotary = rotary
        self.scale = qk_dim**-0.5 * yarn_softmax_scale(config.rope_scaling)
        # (kv_b_proj, dtype, W_UK [heads, nope, rank], W_UV [heads, v_dim, rank]), made on the first decode
        self._absorbed: tuple[nn.Module, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        T = x.shape[0]
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(T, self.num_heads, -1).split([self.nope, self.rope], dim=-1)
        q_pe = self.rotary(positions, q_pe)  # [T, heads, rope]
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        k_pe = self.rotary(positions, k_pe[:, None, :])[:, 0]  # [T, rope], one rotary key for all heads
        cached = torch.cat([self.kv_a_layernorm(latent), k_pe], dim=-1)  # [T, rank + rope]
        if ctx.kv_cache is None:  # one causal sequence, nothing cached
            out = self._expanded(q_nope, q_pe, cached, _prefill_mask(T, T, 1, None, x.device)[0, 0])
            return self.o_proj(out.reshape(T, -1))
        cache = ctx.kv_cache.latent[self.layer_idx]  # [num_blocks, block_size, rank + rope]
        assert ctx.slot_mapping is not None
        cache.view(-1, cache.shape[-1])[ctx.slot_mapping] = cached.to(cache.dtype)
        out = q_nope.new_empty(T, self.num_heads, self.v_dim)
        nd = ctx.num_decode
        if nd:
            out[:nd] = self._decode(q_nope[:nd], q_pe[:nd], cache, ctx)
        for i, chunk in enumerate(ctx.prefills):
            rows = cache[chunk.block_table].flatten(0, 1)[: chunk.context_len]  # [keys, rank + rope]
            key = ("mla-prefill", i, None)
            mask = ctx.masks.get(key)
            if mask is None:
                mask = ctx.masks[key] = _prefill_mask(chunk.num_tokens, chunk.context_len, 1, None, x.device)[
                    0, 0
                ]
            sl = slice(chunk.start, chunk.start + chunk.num_tokens)
            out[sl] = self._expanded(q_nope[sl], q_pe[sl], rows.to(x.dtype), mask)
        return self.o_proj(out.reshape(T, -1))

    def _expanded(
        self,
        q_nope: torch.Tensor,  # [n, heads, nope]
        q_pe: torch.Tensor,  # [n, heads, rope]
        rows: torch.Tensor,  # [keys, rank + rope]: cached latents and rotary keys
        mask: torch.Tensor,  # [n, keys], True = may attend
    ) -> torch.Tensor:
        """Attention with the latents expanded into per-head keys and values by kv_b_proj: [n, heads, v_dim]."""
        keys = rows.shape[0]
        latent, k_pe = rows.split([self.rank, self.rope], dim=-1)
        kv = self.kv_b_proj(latent).view(keys, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        # q.k = q_nope.k_nope + q_pe.k_pe: two matmuls, so the shared k_pe is never copied per head
        scores = torch.matmul(q_nope.transpose(0, 1), k_nope.permute(1, 2, 0))  # [heads, n, keys]
        scores += torch.matmul(q_pe.transpose(0, 1), k_pe.t())  # [heads, n, rope] @ [rope, keys]
        scores.mul_(self.scale).masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(probs, v.transpose(0, 1)).transpose(0, 1)  # [n, heads, v_dim]

    def _absorb(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK and W_UV split out of kv_b_proj, dense in `dtype`: made once (a packed kv_b_proj is dequantized
        here, not per step) and again only if kv_b_proj or the dtype changes."""
        if self._absorbed is None or self._absorbed[0] is not self.kv_b_proj or self._absorbed[1] != dtype:
            w = dense_weight(self.kv_b_proj, dtype).view(self.num_heads, self.nope + self.v_dim, self.rank)
            w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)
            self._absorbed = (self.kv_b_proj, dtype, w_uk.contiguous(), w_uv.contiguous())
        return self._absorbed[2], self._absorbed[3]

    def _decode(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """The absorbed form, one query per sequence: [batch, heads, v_dim] without expanding the cache."""
        tables, lens = ctx.decode_block_tables, ctx.decode_context_lens
        assert tables is not None and lens is not None
        w_uk, w_uv = self._absorb(q_nope.dtype)
        q_latent = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)  # [batch, heads, rank]
        q_full = torch.cat([q_latent, q_pe], dim=-1)  # [batch, heads, rank + rope]
        rows = cache[tables].flatten(1, 2).to(q_full.dtype)  # [batch, keys, rank + rope]
        scores = torch.bmm(q_full, rows.transpose(1, 2)).mul_(self.scale)  # [batch, heads, keys]
        mask = ctx.masks.get(("mla-decode", 0, None))
        if mask is None:
            idx = torch.arange(rows.shape[1], device=rows.device)
            mask = ctx.masks[("mla-decode", 0, None)] = (idx[None, :] < lens[:, None])[:, None, :]
        scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(rows.dtype)
        o_latent = torch.bmm(probs, rows[..., : self.rank])  # [batch, heads, rank]
        return torch.einsum("bhr,hvr->bhv", o_latent, w_uv)  # [batch, heads, v_dim]
