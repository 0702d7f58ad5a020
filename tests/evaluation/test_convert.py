"""`--format`: the model is converted with cumulo.formats before scoring (`build_for_use` calls
quantize_model; see test_same_model_as_serving.py), and bad formats are clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cumulo.errors import FormatError
from cumulo.evaluation.perplexity import perplexity
from cumulo.formats.linear import quantize_model


def test_converting_to_mxfp8_keeps_perplexity_close(
    tiny_llama: torch.nn.Module, tiny_text: list[int]
) -> None:
    model = copy.deepcopy(tiny_llama)
    quantize_model(model, "mxfp8")
    # the decoder layers' Linear modules were swapped for packed ones
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())
    before = perplexity(tiny_llama, tiny_text, context=32, stride=16, progress=False).perplexity
    after = perplexity(model, tiny_text, context=32, stride=16, progress=False).perplexity
    assert math.isfinite(after) and after != before
    assert after == pytest.approx(before, rel=0.1)


def test_an_unknown_format_is_a_format_error(tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(FormatError, match="no-such-format"):
        quantize_model(copy.deepcopy(tiny_llama), "no-such-format")
