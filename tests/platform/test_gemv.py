"""The skinny bf16 CPU matmul (decode rows) against a float64 reference, on both of its paths, and its use by
the engine through `DenseLinear`: same answers as F.linear, tied weights still tied, prefill left to torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cumulo.formats.linear import DenseLinear, use_dense_kernel
from cumulo.models.layers import RMSNorm
from cumulo.platform.kernels import gemv

pytestmark = pytest.mark.skipif(not gemv.available(), reason="no C++ compiler or no AVX2 here")

PATHS = [False, True]  # avx2_only: the best path this CPU has, then the AVX2 fallback


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (8 significant bits)."""
    _, e = torch.frexp(x.abs().clamp(min=2.0**-120))
    return torch.ldexp(torch.ones_like(x), e - 8)


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    # fp32 accumulation in another order than the reference, then one bf16 rounding: within one bf16 step,
    # and exactly the rounded reference for the large majority of outputs.
    err = (y.double() - ref).abs()
    assert bool((err <= bf16_ulp(ref) + 1e-5 * ref.abs().amax()).all())
    assert (y == ref.to(torch.bfloat16)).double().mean() > 0.9


@pytest.mark.parametrize("avx2_only", PATHS)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 11, gemv.MAX_ROWS])
@pytest.mark.parametrize("n,k", [(64, 576), (7, 45), (33, 100), (130, 1536), (16, 32)])
def test_matches_float64_reference(avx2_only, m, n, k):
    gen = torch.Generator().manual_seed(n * 1000 + k + m)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    check(gemv.bf16_linear(x, w, avx2_only=avx2_only), x, w, None)


@pytest.mark.parametrize("avx2_only", PATHS)
@pytest.mark.parametrize("m", [3, 12])  # 12: the AVX-512 path's tiles of 4 weight rows
def test_bias_and_strided_rows(avx2_only, m):
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(m, 200, generator=gen).bfloat16()
    x = wide[:, 10:110]  # rows 200 apart: read in place
    w = torch.randn(42, 130, generator=gen).bfloat16()[:, 20:120]  # weight rows 130 apart, 42 = 10 tiles + 2
    b = torch.randn(42, generator=gen).bfloat16()
    check(gemv.bf16_linear(x, w, b, avx2_only=avx2_only), x, w, b)


def test_both_paths_agree_with_torch_on_special_values():
    x = torch.tensor([[1.0, -2.0, 0.0, float("inf")]]).bfloat16()
    w = torch.tensor([[1.0, 1.0, 5.0, 0.0], [0.5, 0.25, 1.0, 1.0]]).bfloat16()
    for avx2_only in PATHS:
        y = gemv.bf16_linear(x, w, avx2_only=avx2_only)
        assert torch.isnan(y[0, 0])  # inf * 0 is NaN, and NaN survives the bf16 rounding
        assert y[0, 1] == float("inf")


@pytest.mark.parametrize("avx2_only", PATHS)
def test_fp32_outputs_are_the_unrounded_sums(avx2_only):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 300, generator=gen).bfloat16()
    w = torch.randn(50, 300, generator=gen).bfloat16()
    y = gemv.bf16_linear(x, w, out_dtype=torch.float32, avx2_only=avx2_only)
    ref = F.linear(x.double(), w.double())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)  # fp32 accumulation, no bf16 step
    assert torch.equal(
        gemv.bf16_linear(x, w, avx2_only=avx2_only), y.bfloat16()
    )  # rounding is the only change


def test_output_head_logits_come_from_the_fp32_kernel():
    from cumulo.models.layers import lm_logits

    torch.manual_seed(3)
    head = nn.Linear(64, 500, bias=False).to(torch.bfloat16)
    hidden = torch.randn(3, 64).bfloat16()
    refined = lm_logits(head, hidden)  # torch: 16-bit logits with the leaders recomputed in fp32
    fast = lm_logits(DenseLinear(head, gemv.bf16_linear), hidden)
    assert fast.dtype == torch.float32
    assert torch.equal(fast.argmax(-1), refined.argmax(-1))
    # the leaders the refine recomputed in fp32 agree exactly; the rest differ by the refine's bf16 rounding only
    top = head(hidden).float().topk(8).indices  # the candidates the refine recomputed
    torch.testing.assert_close(fast.gather(1, top), refined.gather(1, top), rtol=1e-5, atol=1e-4)
    assert bool(((fast - refined).abs() <= fast.abs() * 2.0**-8 + 1e-6).all())


@pytest.mark.parametrize("avx2_only", PATHS)
@pytest.mark.parametrize("m", [1, 3, 8, gemv.MAX_ROWS])
@pytest.mark.parametrize("n,k", [(64, 576), (7, 45), (130, 1536)])
def test_fp32_kernel_matches_float64_reference(avx2_only, m, n, k):
    gen = torch.Generator().manual_seed(n + k + m)
    x, w, b = (torch.randn(*s, generator=gen) for s in ((m, k), (n, k), (n,)))
    for bias in (None, b):
        y = gemv.f32_linear(x, w, bias, avx2_only=avx2_only)
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert y is not None and y.dtype == torch.float32
        # fp32 sums in another order than the reference: a few fp32 roundings of the magnitudes involved
        assert bool(((y.double() - ref).abs() <= 1e-5 * (x.abs().double() @ w.abs().double().t() + 1)).all())


def test_declines_what_it_does_not_take():
    w = torch.randn(8, 32).bfloat16()
    assert gemv.bf16_linear(torch.randn(gemv.MAX_ROWS + 1, 32).bfloat16(), w) is None  # prefill: torch
    assert gemv.bf16_linear(torch.randn(1, 32), w.float()) is None  # fp32
    assert gemv.bf16_linear(torch.randn(1, 32).bfloat16(), w.t().contiguous().t()) is None  # column-major W
    with pytest.raises(ValueError, match="do not multiply"):
        gemv.bf16_linear(torch.randn(1, 31).bfloat16(), w)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.proj = nn.Linear(32, 48, bias=True)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.embed(ids))[..., :32])


def test_dense_linear_swap_keeps_ties_and_answers():
    torch.manual_seed(0)
    model = Tied().to(torch.bfloat16)
    ids = torch.tensor([[3, 7, 11]])
    before = [model(ids[:, :1]), model(torch.randint(0, 50, (2, 12)))]
    use_dense_kernel(model, gemv.bf16_linear)
    assert isinstance(model.head, DenseLinear) and isinstance(model.proj, DenseLinear)
    assert model.head.weight is model.embed.weight  # still tied, no copy
    decode = model(ids[:, :1])  # one row: the kernel
    torch.testing.assert_close(decode, before[0], atol=0.05, rtol=0.02)
    seen = []
    model.proj.kernel = lambda x, w, b: seen.append(x.shape[0]) or gemv.bf16_linear(x, w, b)
    model(torch.randint(0, 50, (2, 12)))  # 24 rows: the kernel declines, F.linear answers
    assert seen == [24]


def test_engine_uses_the_kernel_of_its_dtype(tmp_path, write_tiny_llama):
    from cumulo.engine.factory import create_engine
    from cumulo.engine.llm_engine import EngineConfig
    from cumulo.models.attention import AttentionContext

    path = write_tiny_llama(tmp_path / "m", vocab=64, hidden=64, intermediate=128)
    for dtype in ("bfloat16", "float32"):
        model = create_engine(str(path), EngineConfig(dtype=dtype, kv_cache_gib=0.01)).runner.model
        dense = [m for m in model.modules() if isinstance(m, DenseLinear)]
        want = gemv.bf16_linear if dtype == "bfloat16" else gemv.f32_linear
        assert dense and all(m.kernel is want for m in dense)
        norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
        assert norms and all(m.kernel is not None for m in norms)  # both dtypes: the one-call RMSNorm
    # One token through the whole model: the kernel's logits match torch's bf16 path.
    ids, pos = torch.tensor([5]), torch.tensor([0])
    with torch.inference_mode():
        model = create_engine(str(path), EngineConfig(dtype="bfloat16", kv_cache_gib=0.01)).runner.model
        fast = model.compute_logits(model(ids, pos, AttentionContext(kv_cache=None)))
        for m in model.modules():
            if isinstance(m, DenseLinear):
                m.kernel = lambda x, w, b: None
        slow = model.compute_logits(model(ids, pos, AttentionContext(kv_cache=None)))
    torch.testing.assert_close(fast, slow, atol=0.05, rtol=0.02)
