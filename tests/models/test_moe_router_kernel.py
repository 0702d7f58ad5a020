"""DeepSeek-V3's router inside the grouped expert kernel (moe.cpp, router = 1) against the Python router
(`models.deepseek.DeepseekRouter.select`) on the same fp32 logits: the same experts in the same order, the same
weights, and the experts' output as the per-expert path gives it in the same dtype; with and without the group
limit, normalisation and scaling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cumulo.formats.kernels.moe import library
from cumulo.models.deepseek import DeepseekRouter
from cumulo.models.moe import Experts

pytestmark = pytest.mark.skipif(library() is None, reason="no C++ compiler or AVX2 on this machine")

E, H, INTER, K = 16, 128, 64, 4


def _router(n_group: int, topk_group: int, norm: bool, scale: float, seed: int = 0) -> DeepseekRouter:
    config = SimpleNamespace(
        num_experts_per_tok=K, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
        routed_scaling_factor=scale, num_experts=E, hidden_size=H,
    )  # fmt: skip
    router = DeepseekRouter(config)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=gen) * 0.2)
        router.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.3)
    return router


def _experts(dtype: torch.dtype) -> Experts:
    torch.manual_seed(0)
    experts = Experts(E, H, INTER)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return experts.to(dtype).eval().requires_grad_(False)


SETTINGS = [(1, 1, True, 1.0), (4, 2, True, 2.5), (4, 1, False, 1.0), (8, 3, True, 1.5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n_group", "topk_group", "norm", "scale"), SETTINGS)
def test_kernel_routing_equals_the_python_router(dtype, n_group, topk_group, norm, scale) -> None:
    router, experts = _router(n_group, topk_group, norm, scale), _experts(dtype)
    kernel = experts.grouped_kernel()
    assert kernel is not None
    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 7, 16):
        x = torch.randn(tokens, H, generator=gen).to(dtype)
        with torch.no_grad():
            logits = router.logits(x)
            want_weights, want_ids = router.select(logits)
        ids, weights = torch.empty(tokens, K, dtype=torch.int64), torch.empty(tokens, K)
        y = kernel.sigmoid_topk(
            x,
            logits,
            router.e_score_correction_bias.detach(),
            K,
            n_group,
            topk_group,
            norm,
            scale,
            (ids, weights),
        )
        assert y is not None and y.dtype == dtype
        assert torch.equal(ids, want_ids)  # the same experts, in the same order
        torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
        if (
            n_group > 1
        ):  # the group limit mattered somewhere: some expert outside the kept groups scored higher
            assert tokens == 1 or not torch.equal(want_ids, logits.sigmoid().add(router.e_score_correction_bias)
                                                  .topk(K).indices)  # fmt: skip
        # the experts' output: the kernel's own routing and the per-expert path over the Python routing agree
        with torch.no_grad():
            want = experts.per_expert(x, want_weights, want_ids)
        if dtype == torch.bfloat16:
            step = 2**-8 * want.float().abs().max().item()
            torch.testing.assert_close(y.float(), want.float(), rtol=2**-6, atol=4 * step)
        else:
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert torch.equal(
                experts.sigmoid_routed(x, router), y
            )  # the model's entry point takes this path


def test_exact_ties_go_to_the_lower_expert_id() -> None:
    """torch's topk leaves the order among equal values unspecified; the kernel picks the lower id (and group)."""
    experts = _experts(torch.float32)
    kernel = experts.grouped_kernel()
    assert kernel is not None
    logits = torch.zeros(1, E)
    ids, weights = torch.empty(1, K, dtype=torch.int64), torch.empty(1, K)
    assert (
        kernel.sigmoid_topk(torch.randn(1, H), logits, None, K, 4, 2, True, 1.0, (ids, weights)) is not None
    )
    assert ids.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(weights, torch.full((1, K), 1 / K))


def test_inputs_the_kernel_does_not_take_fall_back_to_the_python_router() -> None:
    router, experts = _router(3, 1, True, 1.0), _experts(torch.float32)  # 16 experts do not split in 3 groups
    kernel = experts.grouped_kernel()
    assert kernel is not None
    x = torch.randn(2, H)
    with torch.no_grad():
        logits = router.logits(x)
        assert kernel.sigmoid_topk(x, logits, None, K, 3, 1, True, 1.0) is None
        assert (
            kernel.sigmoid_topk(x, logits.bfloat16(), None, K, 1, 1, True, 1.0) is None
        )  # logits must be fp32
