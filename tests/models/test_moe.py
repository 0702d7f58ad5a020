"""Mixture-of-experts compute (cumulo/models/moe.py): the router's top-k and the grouped expert pass, checked
against a per-token reference, and that an expert no token selects is never run."""

from __future__ import annotations

import torch

from cumulo.models.moe import ROW_BUCKET, Experts, softmax_topk

E, H, INTER, K = 6, 16, 24, 2


def _experts(seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(E, H, INTER)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return experts.eval().requires_grad_(False)


def _per_token(experts: Experts, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The definition: each token's output is the weighted sum of its k experts applied to it alone."""
    rows = []
    for t in range(x.shape[0]):
        rows.append(sum(w[t, j] * experts[int(ids[t, j])](x[t : t + 1])[0] for j in range(ids.shape[1])))
    return torch.stack(rows)


def test_softmax_topk_picks_the_most_probable_experts_and_renormalises():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.0, 0.0]])
    weights, ids = softmax_topk(logits, 2, norm_topk_prob=False)
    probs = torch.softmax(logits, dim=-1)
    assert ids.tolist() == [[1, 3], [0, 2]]
    assert weights.dtype == torch.float32 and ids.dtype == torch.long
    torch.testing.assert_close(weights, probs.gather(1, ids))
    normed, same_ids = softmax_topk(logits.bfloat16(), 2, norm_topk_prob=True)
    assert normed.dtype == torch.float32 and same_ids.tolist() == ids.tolist()
    torch.testing.assert_close(normed.sum(-1), torch.ones(2))


def test_experts_match_the_per_token_definition_over_a_mixed_batch():
    experts = _experts()
    torch.manual_seed(1)
    x = torch.randn(11, H)
    weights, ids = softmax_topk(torch.randn(11, E), K, norm_topk_prob=True)
    torch.testing.assert_close(experts(x, weights, ids), _per_token(experts, x, weights, ids))


def test_an_expert_no_token_selects_is_never_run():
    experts = _experts()
    experts.grouped = (
        False  # the per-expert path, whose module calls the hooks count (the kernel: test_moe_kernel)
    )
    for p in experts[4].parameters():  # would turn any row it touches into NaN
        p.fill_(float("nan"))
    calls: dict[int, list[int]] = {}
    for e in range(E):
        experts[e].register_forward_hook(
            lambda mod, args, out, e=e: calls.setdefault(e, []).append(args[0].shape[0])
        )
    torch.manual_seed(2)
    x = torch.randn(7, H)
    ids = torch.tensor([[0, 1], [1, 2], [0, 2], [5, 0], [1, 5], [2, 0], [0, 1]])
    weights = torch.rand(7, K)
    out = experts(x, weights, ids)
    assert torch.isfinite(out).all()
    # each selected expert ran once, over exactly the rows routed to it; experts 3 and 4 never ran
    assert calls == {0: [5], 1: [4], 2: [3], 5: [2]}
    torch.testing.assert_close(out, _per_token(experts, x, weights, ids))


def test_a_selected_expert_with_nan_weights_poisons_only_its_own_tokens():
    experts = _experts()
    for p in experts[3].parameters():
        p.fill_(float("nan"))
    x = torch.randn(3, H)
    ids = torch.tensor([[0, 1], [3, 2], [2, 1]])
    out = experts(x, torch.full((3, K), 0.5), ids)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


def test_experts_over_many_rows_take_whole_buckets_and_drop_the_extra_rows():
    experts = _experts()
    experts.grouped = False
    seen: dict[int, list[int]] = {}
    for e in range(E):
        experts[e].register_forward_hook(
            lambda mod, args, out, e=e: seen.setdefault(e, []).append(args[0].shape[0])
        )
    torch.manual_seed(3)
    x = torch.randn(40, H)
    ids = torch.stack(
        [torch.zeros(40, dtype=torch.long), torch.arange(40) % 3 + 1], dim=1
    )  # expert 0: 40 rows
    weights = torch.rand(40, K)
    out = experts(x, weights, ids)
    bucketed = -(-40 // ROW_BUCKET) * ROW_BUCKET  # 40 rows take whole buckets; 16 or fewer go as they are
    assert seen == {0: [bucketed], 1: [14], 2: [13], 3: [13]}
    torch.testing.assert_close(out, _per_token(experts, x, weights, ids))
