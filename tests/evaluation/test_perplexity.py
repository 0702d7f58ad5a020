"""Sliding-window perplexity: window planning, agreement with an independent loop, and known-answer models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cumulo.errors import InvalidRequest
from cumulo.evaluation.perplexity import perplexity, windows
from cumulo.models.attention import AttentionContext

from .conftest import TINY_VOCAB, CyclePredictor, UniformPredictor


def reference_perplexity(model: torch.nn.Module, ids: list[int], context: int, stride: int) -> float:
    """Hugging Face's recipe written out plainly: full logits per window, earlier-scored labels masked."""
    tokens = torch.tensor(ids)
    nll_sum, counted, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        new = end - prev_end
        window = tokens[begin:end]
        labels = window.clone()
        labels[:-new] = -100
        with torch.no_grad():
            hidden = model(window, torch.arange(len(window)), AttentionContext(kv_cache=None))
            logits = model.compute_logits(hidden).double()
        losses = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")
        nll_sum += float(losses.sum())
        counted += int((labels[1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / counted)


@pytest.mark.parametrize(
    ("num_tokens", "context", "stride"),
    [(70, 16, 5), (70, 16, 1), (10, 16, 8), (2, 2, 1), (33, 8, 3), (33, 8, 7)],
)
def test_overlapping_windows_score_every_token_but_the_first_exactly_once(
    num_tokens: int, context: int, stride: int
) -> None:
    plan = windows(num_tokens, context, stride)
    targets = [t for w in plan for t in range(w.first_target, w.end)]
    assert targets == list(range(1, num_tokens))
    for w in plan:
        assert w.end - w.begin <= context
        assert w.begin < w.first_target  # each target has its predecessor inside the window


@pytest.mark.parametrize(("num_tokens", "context"), [(70, 16), (17, 16), (16, 16), (5, 16), (33, 8)])
def test_disjoint_windows_score_every_token_except_each_window_start(num_tokens: int, context: int) -> None:
    plan = windows(num_tokens, context, context)
    targets = [t for w in plan for t in range(w.first_target, w.end)]
    assert targets == [t for t in range(num_tokens) if t % context != 0]
    assert all(w.begin < w.first_target and w.end - w.begin <= context for w in plan)


def test_windows_after_the_first_see_context_minus_stride_tokens_of_history() -> None:
    plan = windows(100, 16, 4)
    assert plan[0] == type(plan[0])(0, 16, 1)
    for w in plan[1:]:
        assert w.begin % 4 == 0
        assert w.first_target - w.begin >= 16 - 4


def test_windows_with_stride_equal_to_context_are_disjoint() -> None:
    plan = windows(40, 16, 16)
    assert [(w.begin, w.end, w.first_target) for w in plan] == [(0, 16, 1), (16, 32, 17), (32, 40, 33)]


@pytest.mark.parametrize(("context", "stride"), [(1, 1), (16, 0), (16, 17), (16, -1)])
def test_windows_reject_bad_context_or_stride(context: int, stride: int) -> None:
    with pytest.raises(InvalidRequest):
        windows(100, context, stride)


def test_windows_reject_a_text_of_fewer_than_two_tokens() -> None:
    with pytest.raises(InvalidRequest, match="at least 2 tokens"):
        windows(1, 16, 8)


@pytest.mark.parametrize(("context", "stride"), [(16, 16), (16, 6), (128, 64)])
def test_perplexity_of_a_random_model_equals_the_independent_loop(
    tiny_llama: torch.nn.Module, tiny_text: list[int], context: int, stride: int
) -> None:
    result = perplexity(tiny_llama, tiny_text, context=context, stride=stride, progress=False)
    expected = reference_perplexity(tiny_llama, tiny_text, context, stride)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-5)
    plan = windows(len(tiny_text), context, stride)
    assert result.tokens == sum(w.end - w.first_target for w in plan)
    assert result.windows == len(plan)


def test_history_changes_the_score_so_overlap_matters(
    tiny_llama: torch.nn.Module, tiny_text: list[int]
) -> None:
    # Guards against windows that silently drop their history: with overlap, tokens see more context.
    disjoint = perplexity(tiny_llama, tiny_text, context=8, stride=8, progress=False).perplexity
    overlapping = perplexity(tiny_llama, tiny_text, context=8, stride=2, progress=False).perplexity
    assert disjoint != pytest.approx(overlapping, rel=1e-6)


def test_a_model_that_predicts_the_text_perfectly_scores_one() -> None:
    text = [i % TINY_VOCAB for i in range(200)]
    result = perplexity(CyclePredictor(TINY_VOCAB), text, context=32, stride=12, progress=False)
    assert result.perplexity == pytest.approx(1.0, abs=1e-9)
    assert result.tokens == 199


def test_a_model_that_guesses_uniformly_scores_the_vocabulary_size() -> None:
    text = [(7 * i) % TINY_VOCAB for i in range(50)]
    result = perplexity(UniformPredictor(TINY_VOCAB), text, context=16, stride=4, progress=False)
    assert result.perplexity == pytest.approx(TINY_VOCAB, rel=1e-6)  # float32 log-softmax


def test_each_window_is_fed_as_a_fresh_causal_sequence_without_cache_under_inference_mode() -> None:
    model = CyclePredictor(TINY_VOCAB)
    text = list(range(40))
    perplexity(model, text, context=16, stride=8, progress=False)
    plan = windows(len(text), 16, 8)
    assert [c["input_ids"] for c in model.calls] == [text[w.begin : w.end] for w in plan]
    for call in model.calls:
        assert call["positions"] == list(range(len(call["input_ids"])))  # type: ignore[arg-type]
        assert call["kv_cache"] is None
        assert call["inference_mode"] is True


def test_perplexity_shows_a_progress_bar_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    perplexity(UniformPredictor(TINY_VOCAB), list(range(40)), context=16, stride=8, progress=True)
    captured = capsys.readouterr()
    assert "perplexity" in captured.err and "39/39" in captured.err
    assert captured.out == ""
