"""Where the paged KV cache is sized: `plan_kv_cache` decides its block size, block count and dtype, and so
the longest sequence the engine can promise. `LLMEngine` allocates exactly what the plan says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cumulo.errors import InvalidRequest
from cumulo.models.config import ModelConfig
from cumulo.platform import Platform, kv_cache_budget_bytes

if TYPE_CHECKING:
    from cumulo.engine.llm_engine import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVPlan:
    block_size: int  # tokens per block
    num_blocks: int
    dtype: torch.dtype  # of the cached keys and values
    max_model_len: int  # the longest sequence (prompt + completion) the engine accepts

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def plan_kv_cache(
    model: ModelConfig,
    dtype: torch.dtype,
    config: EngineConfig,
    platform: Platform,
    num_layers: int | None = None,
) -> KVPlan:
    """The cache for `model` computing in `dtype` under `config`'s settings on `platform`; with `num_layers`,
    for that many of its layers (a pipeline stage; every stage gets the same block count, sized for the
    stage with the most layers).

    - bytes: `config.kv_cache_blocks` whole blocks when set, else `config.kv_cache_gib`, else
      `config.kv_cache_fraction` of free memory, else the platform's default (see `cumulo.platform.budget`).
    - the rest is `size_kv_cache` on those bytes (dtype, blocks, max_model_len).
    """
    if config.block_size < 1:
        raise InvalidRequest(f"block_size must be at least 1 token, not {config.block_size}")
    if config.kv_cache_blocks:  # a count decided elsewhere (placement, for every stage of a split)
        per_block = kv_elements_per_token(model, num_layers) * config.block_size * cache_dtype(dtype).itemsize
        budget = config.kv_cache_blocks * per_block
    else:
        budget = kv_cache_budget_bytes(platform, config.kv_cache_gib, config.kv_cache_fraction)
    return size_kv_cache(budget, model, dtype, config.block_size, config.max_model_len, num_layers)


def size_kv_cache(
    budget_bytes: int,
    model: ModelConfig,
    dtype: torch.dtype,
    block_size: int = 16,
    max_model_len: int | None = None,
    num_layers: int | None = None,
) -> KVPlan:
    """The cache an engine allocates in `budget_bytes` for `model` computing in `dtype`: plain numbers, no
    platform, so placement (`cumulo.cluster.placement`) sizes a replica exactly as its engine will.

    - dtype: the activations' own (the cache stores keys and values as the layers compute them); a model
      whose weights are not a float of 16 bits or more computes, and caches, in fp32.
    - blocks: as many whole blocks as the bytes hold, at least one. A block holds `block_size` tokens of K and
      V for every layer, laid out as `KVCache` lays them out: [kv_heads, blocks, block_size, head_dim].
    - max_model_len: the model's context, or `max_model_len` when given (never longer than the model's), cut
      to what the cache holds when it holds less.
    - num_layers: a pipeline stage's cache holds only its own layers (default: all of them).
    """
    return size_kv_cache_for(
        budget_bytes,
        kv_elements_per_token(model, num_layers),
        model.max_position_embeddings,
        dtype,
        block_size,
        max_model_len,
    )


def kv_elements_per_token(model: ModelConfig, num_layers: int | None = None) -> int:
    """Cached elements per token over all layers (or `num_layers` of them): K and V, every KV head, head_dim
    each; for multi-head latent attention (kv_lora_rank > 0) one latent plus one shared rotary key per layer."""
    layers = model.num_hidden_layers if num_layers is None else num_layers
    if model.kv_lora_rank:
        return layers * (model.kv_lora_rank + model.qk_rope_head_dim)
    return 2 * layers * model.num_key_value_heads * model.head_dim


def cache_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the cache holds for a model whose weights are `dtype`: its own if a float of 16+ bits."""
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32


def size_kv_cache_for(
    budget_bytes: int,
    elements_per_token: int,
    model_context: int | None,
    dtype: torch.dtype,
    block_size: int = 16,
    max_model_len: int | None = None,
) -> KVPlan:
    """`size_kv_cache` for a model known only by its cached elements per token and its context (a
    performance-model preset has no `ModelConfig`); a context of None: what the cache holds."""
    dtype = cache_dtype(dtype)
    if block_size < 1:
        raise InvalidRequest(f"block_size must be at least 1 token, not {block_size}")
    bytes_per_block = elements_per_token * block_size * dtype.itemsize
    num_blocks = max(1, budget_bytes // bytes_per_block)

    capacity = num_blocks * block_size
    limit = capacity if model_context is None else model_context
    if max_model_len:
        if model_context is not None and max_model_len > model_context:
            raise InvalidRequest(f"max_model_len {max_model_len} exceeds the model's context {model_context}")
        limit = max_model_len
    if capacity < limit:
        log.warning("KV cache holds %d tokens; limiting max_model_len from %d", capacity, limit)
        limit = capacity
    return KVPlan(block_size, num_blocks, dtype, limit)
