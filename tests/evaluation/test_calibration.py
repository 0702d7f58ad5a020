"""Calibration for GPTQ: its text is disjoint from the scored text, its windows are seeded, and fused engine
modules hand their inputs' statistics to each checkpoint part."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cumulo.errors import InvalidRequest
from cumulo.evaluation.calibration import Calibration, collect_hessians, sample_windows
from cumulo.evaluation.corpus import calibration_docs, python_docs


def test_calibration_text_shares_no_paragraph_with_the_scored_half() -> None:
    paragraphs = python_docs().text.split("\n\n")
    scored_half = set(paragraphs[: len(paragraphs) // 2])
    calibration = calibration_docs().text.split("\n\n")
    assert calibration and not scored_half.intersection(calibration)
    # eval ppl's default 4096 tokens lie inside the first half: it holds far more characters than they take
    assert sum(len(p) for p in scored_half) > 4 * 4096 * 2


def test_sample_windows_are_seeded_inside_the_text_and_cover_the_request() -> None:
    a, b, c = (sample_windows(10_000, 2048, 512, seed) for seed in (0, 0, 1))
    assert a == b and a != c
    assert len(a) == 4 and all(0 <= s < e <= 10_000 and e - s == 512 for s, e in a)
    assert sample_windows(700, 5000, 512, 0) == [(0, 512), (512, 700)]  # short text: all of it, once
    with pytest.raises(InvalidRequest, match="at least 2 tokens"):
        sample_windows(700, 1, 512, 0)


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(4, 6, bias=False)
        self.o_proj = nn.Linear(6, 4, bias=False)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx: object) -> torch.Tensor:
        x = nn.functional.one_hot(ids, 4).float()
        return self.o_proj(self.qkv_proj(x))


def test_collect_hessians_sums_x_transpose_x_of_the_targets_only() -> None:
    model = _TwoLinears()
    ids = [0, 1, 1, 3, 2]
    cal = collect_hessians(model, ids, [(0, 3), (3, 5)], {"qkv_proj"}, progress=False)
    x = nn.functional.one_hot(torch.tensor(ids), 4).float()
    assert set(cal.hessians) == {"qkv_proj"} and cal.tokens == 5 and cal.windows == 2
    assert torch.equal(cal.hessians["qkv_proj"], x.T @ x)
    assert not model.qkv_proj._forward_hooks  # hooks removed afterwards


def test_checkpoint_parts_find_their_fused_modules_statistics() -> None:
    h = torch.eye(3)
    cal = Calibration({"model.layers.0.self_attn.qkv_proj": h, "model.layers.0.mlp.down_proj": 2 * h}, 8, 1)
    assert cal.hessian_for("model.layers.0.self_attn.k_proj.weight") is h
    assert torch.equal(cal.hessian_for("model.layers.0.mlp.down_proj.weight"), 2 * h)
    assert cal.hessian_for("model.layers.0.mlp.up_proj.weight") is None
