"""The one-call rotary + KV-cache write against the torch path it replaces (RotaryEmbedding, then the cache
write of cumulo.models.attention), for fp32 and bf16, grouped-query heads and scattered slots."""

from __future__ import annotations

import pytest
import torch

from cumulo.models.attention import AttentionContext, KVCache, _write_cache
from cumulo.models.layers import RotaryEmbedding
from cumulo.platform.kernels import rope_cache as rc

pytestmark = pytest.mark.skipif(not rc.available(), reason="no C++ compiler here")

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 32, 4


def torch_path(qkv, positions, rotary, cache, slots):
    T = qkv.shape[0]
    q_size, kv_size = HEADS * DIM, KV_HEADS * DIM
    qk = qkv[:, : q_size + kv_size].view(T, HEADS + KV_HEADS, DIM)
    q, k = rotary(positions, qk).split([HEADS, KV_HEADS], dim=1)
    v = qkv[:, q_size + kv_size :].view(T, KV_HEADS, DIM)
    _write_cache(k, v, AttentionContext(kv_cache=cache, slot_mapping=slots), 0)
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [[0], [5, 6, 7, 8, 9], [100, 3, 57]])
def test_matches_the_torch_path(dtype, positions):
    gen = torch.Generator().manual_seed(len(positions))
    rotary = RotaryEmbedding(DIM, 128, 10000.0)
    pos = torch.tensor(positions)
    slots = torch.randperm(8 * BLOCK, generator=gen)[: len(positions)]
    qkv = torch.randn(len(positions), (HEADS + 2 * KV_HEADS) * DIM, generator=gen).to(dtype)
    ours, ref = (KVCache(1, 8, BLOCK, KV_HEADS, DIM, dtype, "cpu") for _ in range(2))
    q = rc.rope_and_cache(qkv, pos, rotary.cos, rotary.sin, ours.k[0], ours.v[0], slots, HEADS, KV_HEADS)
    q_ref = torch_path(qkv, pos, rotary, ref, slots)
    # fp32 math rounded once (the torch path rounds each bf16 product): equal in fp32, within bf16 steps in bf16
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(q.float(), q_ref.float(), **tol)
    torch.testing.assert_close(ours.k[0].float(), ref.k[0].float(), **tol)
    assert torch.equal(ours.v[0], ref.v[0])  # v is copied, not computed


def test_bad_positions_and_slots_are_errors():
    rotary = RotaryEmbedding(DIM, 16, 10000.0)
    cache = KVCache(1, 2, BLOCK, KV_HEADS, DIM, torch.float32, "cpu")
    qkv = torch.randn(1, (HEADS + 2 * KV_HEADS) * DIM)
    args = (rotary.cos, rotary.sin, cache.k[0], cache.v[0])
    with pytest.raises(ValueError, match="position"):
        rc.rope_and_cache(qkv, torch.tensor([16]), *args, torch.tensor([0]), HEADS, KV_HEADS)
    with pytest.raises(ValueError, match="slot"):
        rc.rope_and_cache(qkv, torch.tensor([1]), *args, torch.tensor([2 * BLOCK]), HEADS, KV_HEADS)


def test_declines_what_it_does_not_take():
    rotary = RotaryEmbedding(DIM, 16, 10000.0)
    cache = KVCache(1, 2, BLOCK, KV_HEADS, DIM, torch.float32, "cpu")
    ok = dict(positions=torch.tensor([1]), cos=rotary.cos, sin=rotary.sin, k_cache=cache.k[0], v_cache=cache.v[0],
              slot_mapping=torch.tensor([0]), heads=HEADS, kv_heads=KV_HEADS)  # fmt: skip
    qkv = torch.randn(1, (HEADS + 2 * KV_HEADS) * DIM)
    assert rc.rope_and_cache(qkv.bfloat16(), **ok) is None  # cache is fp32
    assert rc.rope_and_cache(qkv[:, :-DIM], **ok) is None  # width does not match the heads
    assert rc.rope_and_cache(qkv, **{**ok, "positions": torch.tensor([1], dtype=torch.int32)}) is None
    assert not cache.k[0].any()  # nothing was written by the declined calls
