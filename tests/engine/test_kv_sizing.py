"""`plan_kv_cache`: the one place the KV cache's block size, block count, dtype and the context the engine
promises are decided; the engine allocates exactly that."""

from __future__ import annotations

import pytest
import torch

from cumulo.engine.kv_sizing import plan_kv_cache, size_kv_cache
from cumulo.engine.llm_engine import EngineConfig
from cumulo.errors import InvalidRequest
from cumulo.platform.budget import GIB
from cumulo.platform.cpu import CpuPlatform
from tests.support.tiny import make_tiny_engine, tiny_config

CFG = tiny_config()  # 2 layers, 2 kv heads, head_dim 16, 512 positions
FP32_BLOCK = 2 * 2 * 2 * 16 * 16 * 4  # K and V, layers, kv heads, 16 tokens, head_dim, 4 bytes


class FixedMemoryCpu(CpuPlatform):
    def __init__(self, free: int) -> None:
        super().__init__()
        self.free = free

    def memory_info(self) -> tuple[int, int]:
        return self.free, 2 * self.free


def test_blocks_are_the_whole_blocks_the_budget_holds_in_the_activation_dtype() -> None:
    config = EngineConfig(kv_cache_gib=(100 * FP32_BLOCK + FP32_BLOCK // 2) / GIB)
    fp32 = plan_kv_cache(CFG, torch.float32, config, CpuPlatform())
    assert (fp32.block_size, fp32.num_blocks, fp32.dtype) == (16, 100, torch.float32)
    bf16 = plan_kv_cache(CFG, torch.bfloat16, config, CpuPlatform())
    assert (bf16.num_blocks, bf16.dtype) == (201, torch.bfloat16)  # half the bytes per block
    small = plan_kv_cache(
        CFG, torch.float32, EngineConfig(block_size=4, kv_cache_gib=config.kv_cache_gib), CpuPlatform()
    )
    assert (small.block_size, small.num_blocks) == (4, 402)


def test_weights_that_are_not_16_bit_floats_cache_in_fp32() -> None:
    config = EngineConfig(kv_cache_gib=10 * FP32_BLOCK / GIB)
    for dtype in (torch.int8, torch.float8_e4m3fn):
        plan = plan_kv_cache(CFG, dtype, config, CpuPlatform())
        assert (plan.dtype, plan.num_blocks) == (torch.float32, 10)


def test_without_a_size_the_cpu_cache_takes_a_quarter_of_free_memory_up_to_4_gib() -> None:
    plan = plan_kv_cache(CFG, torch.float32, EngineConfig(), FixedMemoryCpu(free=400 * FP32_BLOCK))
    assert plan.num_blocks == 100
    half = plan_kv_cache(
        CFG, torch.float32, EngineConfig(kv_cache_fraction=0.5), FixedMemoryCpu(400 * FP32_BLOCK)
    )
    assert half.num_blocks == 200


def test_max_model_len_is_the_models_context_or_less_and_never_more_than_the_cache_holds() -> None:
    roomy = EngineConfig(kv_cache_gib=64 * FP32_BLOCK / GIB)  # 1024 tokens
    assert plan_kv_cache(CFG, torch.float32, roomy, CpuPlatform()).max_model_len == 512
    asked = EngineConfig(kv_cache_gib=roomy.kv_cache_gib, max_model_len=100)
    assert plan_kv_cache(CFG, torch.float32, asked, CpuPlatform()).max_model_len == 100
    tight = EngineConfig(kv_cache_gib=20 * FP32_BLOCK / GIB)  # 320 tokens
    assert plan_kv_cache(CFG, torch.float32, tight, CpuPlatform()).max_model_len == 320
    with pytest.raises(InvalidRequest, match="exceeds the model's context 512"):
        plan_kv_cache(CFG, torch.float32, EngineConfig(max_model_len=513), CpuPlatform())
    with pytest.raises(InvalidRequest, match="block_size"):
        plan_kv_cache(CFG, torch.float32, EngineConfig(block_size=0), CpuPlatform())


def test_the_engine_allocates_what_the_plan_says() -> None:
    engine = make_tiny_engine(kv_tokens=20 * 16 + 5, block_size=16)
    assert engine.kv_cache.num_blocks == engine.block_manager.num_free_blocks == 20
    assert engine.kv_cache.block_size == 16 and engine.kv_cache.k[0].dtype == torch.float32
    assert engine.max_model_len == 320


def test_sizing_from_plain_numbers_is_the_plan_the_engine_gets() -> None:
    for dtype, kw in (
        (torch.float32, {}),
        (torch.bfloat16, {"block_size": 4}),
        (torch.int8, {"max_model_len": 99}),
    ):
        config = EngineConfig(kv_cache_gib=37 * FP32_BLOCK / GIB, **kw)
        plain = size_kv_cache(int(37 * FP32_BLOCK), CFG, dtype, config.block_size, config.max_model_len)
        assert plain == plan_kv_cache(CFG, dtype, config, CpuPlatform())
