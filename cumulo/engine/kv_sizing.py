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


def plan_kv_cache(model: ModelConfig, dtype: torch.dtype, config: EngineConfig, platform: Platform) -> KVPlan:
    """The cache for `model` computing in `dtype` under `config`'s settings on `platform`.

    - dtype: the activations' own (the cache stores keys and values as the layers compute them); a model
      whose weights are not a float of 16 bits or more computes, and caches, in fp32.
    - bytes: `config.kv_cache_gib`, else `config.kv_cache_fraction` of free memory, else the platform's
      default (see `cumulo.platform.budget`).
    - blocks: as many whole blocks as the bytes hold, at least one. A block holds `block_size` tokens of K and
      V for every layer, laid out as `KVCache` lays them out: [kv_heads, blocks, block_size, head_dim].
    - max_model_len: the model's context, or `config.max_model_len` when given (never longer than the
      model's), cut to what the cache holds when it holds less.
    """
    if not dtype.is_floating_point or dtype.itemsize < 2:
        dtype = torch.float32
    block_size = config.block_size
    if block_size < 1:
        raise InvalidRequest(f"block_size must be at least 1 token, not {block_size}")

    budget = kv_cache_budget_bytes(platform, config.kv_cache_gib, config.kv_cache_fraction)
    bytes_per_block = (
        2  # K and V
        * model.num_hidden_layers
        * model.num_key_value_heads
        * block_size
        * model.head_dim
        * dtype.itemsize
    )
    num_blocks = max(1, budget // bytes_per_block)

    max_model_len = model.max_position_embeddings
    if config.max_model_len:
        if config.max_model_len > max_model_len:
            raise InvalidRequest(
                f"max_model_len {config.max_model_len} exceeds the model's context {max_model_len}"
            )
        max_model_len = config.max_model_len
    capacity = num_blocks * block_size
    if capacity < max_model_len:
        log.warning("KV cache holds %d tokens; limiting max_model_len from %d", capacity, max_model_len)
        max_model_len = capacity
    return KVPlan(block_size, num_blocks, dtype, max_model_len)
