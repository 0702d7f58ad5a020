"""Fitting the model's software terms: probes the model itself made with known terms give those terms back."""

from __future__ import annotations

import pytest

from cumulo.chips.fit import (
    DecodeProbe,
    PrefillProbe,
    fit_decode_overhead,
    fit_prefill_overhead,
    fit_software,
)
from cumulo.chips.predict import Assumptions, Prediction, predict

PREFILL_SHAPES = (
    (1, 32),
    (8, 32),
    (1, 128),
    (2, 96),
    (4, 48),
)  # (batch, prompt tokens), as bench.chips probes


def _predictor(fmt: str):
    def pred(batch: int, context: int, soft: Assumptions) -> Prediction:
        return predict("smollm2-135m", fmt, "cpu-avx2-2core", batch=batch, context=context, assumptions=soft)

    return pred


def _probes(pred, truth: Assumptions) -> tuple[list[DecodeProbe], list[PrefillProbe]]:
    decode = [DecodeProbe(b, 48, pred(b, 48, truth).decode_tok_s) for b in (1, 8)]
    prefill = [PrefillProbe(b, n, pred(b, n, truth).ttft_s) for b, n in PREFILL_SHAPES]
    return decode, prefill


def test_decode_fit_is_the_line_through_two_batch_sizes():
    per_step, per_seq = fit_decode_overhead([(8, 0.004 + 8 * 0.0005), (1, 0.004 + 0.0005)])
    assert per_step == pytest.approx(0.004)
    assert per_seq == pytest.approx(0.0005)


def test_decode_fit_keeps_no_negative_term():
    # More time at batch 1 than at batch 8 (a noisy host): no per-sequence cost, batch 1's time per step.
    assert fit_decode_overhead([(1, 0.006), (8, 0.005)]) == (0.006, 0.0)
    # A line through zero below batch 1: the per-step term stops at 0 and the slope stays.
    per_step, per_seq = fit_decode_overhead([(1, 0.001), (8, 0.015)])
    assert per_step == 0.0 and per_seq == pytest.approx(0.002)


def test_decode_fit_needs_two_distinct_batch_sizes():
    with pytest.raises(ValueError, match="two distinct batch sizes"):
        fit_decode_overhead([(4, 0.01), (4, 0.02)])
    with pytest.raises(ValueError):
        fit_decode_overhead([(1, 0.01)])


def test_prefill_fit_recovers_known_per_prompt_and_per_token_costs():
    c0, c1 = 0.003, 40e-6
    points = [(b, n, b * c0 + b * n * c1, 0.05 + b * n * 1e-4) for b, n in PREFILL_SHAPES]
    fitted = fit_prefill_overhead(points)
    assert fitted == pytest.approx((c0, c1), rel=1e-9)


def test_prefill_fit_drops_a_negative_term_and_refits_the_other_alone():
    # Costs per token only, less a little per prompt: the free fit would want c0 < 0.
    c1 = 50e-6
    points = [(b, n, b * (n * c1 - 0.0002), b * n * c1 + 0.01) for b, n in PREFILL_SHAPES]
    c0, fitted_c1 = fit_prefill_overhead(points)
    assert c0 == 0.0
    assert 0 < fitted_c1 < c1  # the refit absorbs the negative per-prompt part into a smaller slope


def test_prefill_fit_minimises_errors_relative_to_each_probe_ttft():
    # Noisy probes, the long one 30 ms off: the fit is the least squares of errors relative to each TTFT (an
    # absolute fit bends towards the long probe, c0 27% lower here, and is not this minimum).
    shapes = [(1, 16), (2, 16), (1, 32), (2, 32), (8, 512)]
    noise = [0.001, -0.001, 0.0015, -0.0005, 0.03]
    points = []
    for (b, n), e in zip(shapes, noise, strict=True):
        points.append((b, n, b * 0.002 + b * n * 20e-6 + e, 0.01 * b + b * n * 1e-4))

    def relative_sse(c0: float, c1: float) -> float:
        return sum(((c0 * b + c1 * b * n - res) / t) ** 2 for b, n, res, t in points)

    c0, c1 = fit_prefill_overhead(points)
    best = relative_sse(c0, c1)
    for d0, d1 in ((1.01, 1), (0.99, 1), (1, 1.01), (1, 0.99), (1.01, 0.99), (0.99, 1.01)):
        assert best < relative_sse(c0 * d0, c1 * d1)


@pytest.mark.parametrize("fmt", ["fp32", "mxfp4"])
def test_software_fit_recovers_the_terms_the_probes_were_made_with(fmt):
    pred = _predictor(fmt)
    truth = Assumptions(
        step_overhead_s=0.004,
        seq_overhead_s=0.0006,
        prefill_seq_overhead_s=0.002,
        prefill_token_overhead_s=30e-6,
        max_step_tokens=64,  # the 128-token and 8 x 32 probes take several prefill steps, each with its overhead
        graph_max_batch=16,
    )
    decode, prefill = _probes(pred, truth)
    fitted = fit_software(decode, prefill, pred, max_step_tokens=64, graph_max_batch=16)
    assert fitted.step_overhead_s == pytest.approx(truth.step_overhead_s, rel=1e-6)
    assert fitted.seq_overhead_s == pytest.approx(truth.seq_overhead_s, rel=1e-6)
    assert fitted.prefill_seq_overhead_s == pytest.approx(truth.prefill_seq_overhead_s, rel=1e-6)
    assert fitted.prefill_token_overhead_s == pytest.approx(truth.prefill_token_overhead_s, rel=1e-6)
    assert (fitted.max_step_tokens, fitted.graph_max_batch) == (64, 16)


def test_software_fit_of_probes_with_no_software_cost_is_zero():
    pred = _predictor("bf16")
    decode, prefill = _probes(pred, Assumptions())
    fitted = fit_software(decode, prefill, pred)
    assert fitted.step_overhead_s == pytest.approx(0.0, abs=1e-12)
    assert fitted.seq_overhead_s == pytest.approx(0.0, abs=1e-12)
    assert fitted.prefill_seq_overhead_s == pytest.approx(0.0, abs=1e-12)
    assert fitted.prefill_token_overhead_s == pytest.approx(0.0, abs=1e-12)
