"""Shared layers: the output head keeps the leading candidates exact even when the model runs in bf16."""

from __future__ import annotations

import torch
from torch import nn

from cumulo.models.layers import REFINE_TOP, lm_logits


def test_bf16_output_head_ranks_close_candidates_exactly() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 64).bfloat16()
    head = nn.Linear(64, 100, bias=False).bfloat16()
    with torch.no_grad():
        # Two rows whose exact logits differ by far less than bf16's step at this magnitude.
        target = hidden[0].float()
        head.weight[7] = (target * 0.40).bfloat16()
        head.weight[9] = (target * 0.40).bfloat16()
        head.weight[9, 0] += head.weight[9, 0].sign() * 2**-7 * head.weight[9, 0].abs()
        exact = hidden.float() @ head.weight.float().t()
        rounded = head(hidden).float()
        got = lm_logits(head, hidden)
    leaders = rounded.topk(REFINE_TOP, dim=-1).indices
    torch.testing.assert_close(got.gather(1, leaders), exact.gather(1, leaders), rtol=1e-6, atol=1e-5)
    assert got.argmax(dim=-1).tolist() == exact.argmax(dim=-1).tolist()
    assert got.dtype == torch.float32
    assert not torch.equal(rounded, exact)  # the plain bf16 head does round


def test_fp32_output_head_is_left_as_is() -> None:
    head = nn.Linear(16, 40, bias=False)
    hidden = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(head, hidden), head(hidden), rtol=0, atol=0)
