"""The grouped expert kernel (cumulo/platform/kernels/moe.cpp via cumulo.formats.kernels.moe) against the
per-expert path of `Experts`, in the same dtype on both sides: every supported weight format, both instruction
paths, rows that share experts, experts no row selected never read, and a bad expert id refused."""

from __future__ import annotations

import pytest
import torch

from cumulo.formats.kernels import cpu
from cumulo.formats.kernels.moe import MAX_ROWS, library
from cumulo.formats.linear import PackedLinear
from cumulo.models.moe import Experts, softmax_topk

pytestmark = pytest.mark.skipif(library() is None, reason="no C++ compiler or AVX2 on this machine")

# H spans two 128-column blocks; I (96) ends inside a 64-code chunk, so the down projection's tail is masked.
E, H, INTER, K = 8, 256, 96, 3
CASES = [
    (None, torch.float32), (None, torch.bfloat16), ("ue8m0-fp8", torch.bfloat16), ("ue8m0-fp8", torch.float32),
    ("fp8-block", torch.bfloat16), ("fp8", torch.bfloat16), ("fp8-tensor", torch.float32), ("mxfp8", torch.bfloat16),
]  # fmt: skip


def _experts(fmt: str | None, dtype: torch.dtype, seed: int = 0, h: int = H, inter: int = INTER) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(E, h, inter)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    experts = experts.to(dtype).eval().requires_grad_(False)
    if fmt is not None:
        for e in range(E):
            mlp = experts[e]
            mlp.gate_up_proj = PackedLinear.from_linear(mlp.gate_up_proj, fmt)
            mlp.down_proj = PackedLinear.from_linear(mlp.down_proj, fmt)
    return experts


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16: the two round at the same points, but a dot product summed in another order may land one bf16 step
    (2^-8 relative) away and carry through the SiLU, the down projection and the sum: allow four steps of the
    largest output (two seen). On AVX512-BF16 the two paths run the same instructions and agree exactly."""
    if want.dtype == torch.bfloat16:
        step = 2**-8 * want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=4 * step)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wide", [True, False], ids=["avx512", "avx2"])
@pytest.mark.parametrize(("fmt", "dtype"), CASES, ids=[f"{f}-{str(d)[6:]}" for f, d in CASES])
def test_grouped_kernel_matches_the_per_expert_path(fmt, dtype, wide, monkeypatch):
    monkeypatch.setattr(cpu, "USE_AVX512", wide)
    experts = _experts(fmt, dtype)
    assert experts.grouped_kernel() is not None
    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 5, 16):  # 16 x 3 slots over 8 experts: every expert serves several rows
        x = torch.randn(tokens, H, generator=gen).to(dtype)
        weights, ids = softmax_topk(torch.randn(tokens, E, generator=gen), K, norm_topk_prob=True)
        got = experts(x, weights, ids)
        assert got.dtype == dtype and got.shape == x.shape
        _close(got, experts.per_expert(x, weights, ids))


@pytest.mark.parametrize(("fmt", "dtype"), [("ue8m0-fp8", torch.bfloat16), (None, torch.float32)])
def test_rows_sharing_experts_each_get_their_own_weighted_sum(fmt, dtype):
    experts = _experts(fmt, dtype)
    x = torch.randn(4, H).to(dtype)
    ids = torch.tensor([[0, 1, 2], [2, 1, 0], [0, 5, 1], [5, 0, 2]])
    weights = torch.rand(4, K)
    _close(experts(x, weights, ids), experts.per_expert(x, weights, ids))
    # the same row twice with the same experts gives the same output, whatever the slot order
    twice = experts(x[[0, 0]], weights[[0, 0]], ids[[0, 0]])
    assert torch.equal(twice[0], twice[1])


@pytest.mark.parametrize("fmt", [None, "ue8m0-fp8"])
def test_an_expert_no_row_selects_is_never_read(fmt):
    experts = _experts(fmt, torch.bfloat16)
    poisoned = experts[4]
    for name in ("gate_up_proj", "down_proj"):  # NaN block scales or values: any row that reads them is NaN
        linear = getattr(poisoned, name)
        (linear.scales if fmt else linear.weight).fill_(float("nan"))
    x = torch.randn(6, H).bfloat16()
    ids = torch.tensor([[0, 1, 2], [1, 2, 3], [0, 2, 5], [5, 0, 7], [1, 5, 6], [7, 6, 0]])
    weights = torch.rand(6, K)
    out = experts(x, weights, ids)
    assert torch.isfinite(out).all()
    _close(out, experts.per_expert(x, weights, ids))
    ids[3, 1] = 4  # now row 3 reads it, and only row 3 turns NaN
    out = experts(x, weights, ids)
    assert torch.isnan(out[3]).all()
    assert torch.isfinite(out[[0, 1, 2, 4, 5]]).all()


@pytest.mark.parametrize(("fmt", "dtype"), [("ue8m0-fp8", torch.bfloat16), (None, torch.float32)])
@pytest.mark.parametrize("norm", [True, False])
def test_routing_in_the_kernel_matches_softmax_topk_then_the_experts(fmt, dtype, norm):
    experts = _experts(fmt, dtype)
    gen = torch.Generator().manual_seed(3)
    for tokens in (1, 9):
        x = torch.randn(tokens, H, generator=gen).to(dtype)
        logits = (3 * torch.randn(tokens, E, generator=gen)).to(dtype)
        got = experts.softmax_routed(x, logits, K, norm)
        _close(got, experts.per_expert(x, *softmax_topk(logits, K, norm)))
    experts.grouped = False  # the per-expert path routes with torch: same answer
    _close(got, experts.softmax_routed(x, logits, K, norm))


def test_an_expert_id_out_of_range_is_refused():
    experts = _experts(None, torch.float32)
    with pytest.raises(IndexError, match="expert id out of range"):
        experts(torch.randn(2, H), torch.rand(2, K), torch.tensor([[0, 1, 2], [3, E, 1]]))


def test_prefill_rows_take_the_per_expert_path_and_agree():
    experts = _experts("ue8m0-fp8", torch.bfloat16)
    x = torch.randn(MAX_ROWS + 1, H).bfloat16()
    weights, ids = softmax_topk(torch.randn(MAX_ROWS + 1, E), K, norm_topk_prob=True)
    assert experts.grouped_kernel()(x, weights, ids) is None
    assert torch.equal(experts(x, weights, ids), experts.per_expert(x, weights, ids))


@pytest.mark.parametrize(("h", "inter"), [(256, 96), (254, 97)])
def test_one_decoding_row_equals_the_same_row_inside_a_batch(h, inter):
    """A lone row (decode) takes each gate row and its up row in one pass over it (`dot_table_rows`); inside a batch
    whose rows share its experts the same row goes through the batched dots. Both form each dot product in the same
    order, so they agree bit for bit, also for ragged H and I (masked tails)."""
    experts = _experts("ue8m0-fp8", torch.bfloat16, seed=3, h=h, inter=inter)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, h, generator=gen).to(torch.bfloat16)
    weights, ids = softmax_topk(torch.randn(1, E, generator=gen).expand(3, E), K, norm_topk_prob=True)
    alone = experts(x[:1], weights[:1], ids[:1])
    batched = experts(x, weights, ids)  # every expert in use serves all three rows
    assert torch.equal(alone[0], batched[0])
