"""Fit the performance model's serving-software terms (`Assumptions`' overheads) to an engine's measured probes.

The roofline describes hardware; an engine adds its own time per step, per decoded sequence, per prompt and per
prompt token. Given short probe runs (measured elsewhere: `python -m bench.chips` times them) and the model's
hardware-only predictions for the same shapes, these functions solve for those four terms. The model is linear in
them (docs/chips.md), so probes made by the model itself with known terms give those terms back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cumulo.chips.predict import Assumptions, Prediction

# (batch, context tokens, assumptions) -> the model's prediction for one configuration of one chip and format.
Predictor = Callable[[int, int, Assumptions], Prediction]


@dataclass(frozen=True, slots=True)
class DecodeProbe:
    """`batch` sequences decoding at `tok_s` (all sequences together), over a mean context of `context` tokens."""

    batch: int
    context: int
    tok_s: float


@dataclass(frozen=True, slots=True)
class PrefillProbe:
    """`batch` prompts of `prompt_tokens` tokens arriving together; `ttft_s` until the last got its first token."""

    batch: int
    prompt_tokens: int
    ttft_s: float


def fit_decode_overhead(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(per step, per sequence) seconds, both >= 0, of the line a + b * batch through two (batch, seconds) points:
    a decode step's time beyond the hardware model at two batch sizes. A falling line (noise) keeps no
    per-sequence term and the smaller batch's time as the per-step term."""
    if len(points) != 2 or points[0][0] == points[1][0]:
        raise ValueError(f"the decode fit takes two distinct batch sizes, got {[b for b, _ in points]}")
    (b1, r1), (b2, r2) = sorted(points)
    per_seq = max(0.0, (r2 - r1) / (b2 - b1))
    return max(0.0, r1 - per_seq * b1), per_seq


def fit_prefill_overhead(points: Sequence[tuple[int, int, float, float]]) -> tuple[float, float]:
    """(c0, c1) >= 0 minimising sum ((c0 * b + c1 * b * L - residual) / ttft)^2 over (batch b, length L, residual,
    measured ttft): errors relative to each probe's TTFT, the measure a prediction is judged by, so that the long
    probes do not outweigh the short ones. Where the free fit wants a negative term, the better of the two
    one-term fits is kept."""
    w = np.array([1.0 / t for *_, t in points])
    a = np.array([[b, b * n] for b, n, *_ in points], dtype=float) * w[:, None]
    r = np.array([res for _, _, res, _ in points], dtype=float) * w
    c0, c1 = np.linalg.lstsq(a, r, rcond=None)[0]
    if c0 >= 0 and c1 >= 0:
        return float(c0), float(c1)
    only = [(max(0.0, float(np.linalg.lstsq(a[:, [i]], r, rcond=None)[0][0])), i) for i in (0, 1)]
    best, i = min(only, key=lambda t: float(np.sum((a[:, t[1]] * t[0] - r) ** 2)))
    return (best, 0.0) if i == 0 else (0.0, best)


def _prefill_steps(tokens: int, max_step_tokens: int) -> int:
    """Engine steps a prefill of `tokens` takes under a token budget per step (0: one step), as predict counts."""
    return max(1, -(-tokens // max_step_tokens)) if max_step_tokens else 1


def fit_software(
    decode: Sequence[DecodeProbe],
    prefill: Sequence[PrefillProbe],
    predict: Predictor,
    max_step_tokens: int = 0,
    graph_max_batch: int = 0,
) -> Assumptions:
    """The engine's software time beyond the hardware model, as `Assumptions`.

    Two decode probes give the decode step's a + b * sequences; the prefill probes' TTFTs, less the hardware
    model and the per-step term of each prefill step (`max_step_tokens` splits a prompt batch into steps), give
    the prefill's c0 + c1 * tokens per prompt by `fit_prefill_overhead`. `predict` is called with hardware-only
    assumptions (the two step settings and no overheads)."""
    hw = Assumptions(max_step_tokens=max_step_tokens, graph_max_batch=graph_max_batch)
    per_step, per_seq = fit_decode_overhead(
        [(p.batch, p.batch / p.tok_s - predict(p.batch, p.context, hw).tpot_s) for p in decode]
    )
    points = []
    for p in prefill:
        steps = _prefill_steps(p.batch * p.prompt_tokens, max_step_tokens)
        residual = p.ttft_s - predict(p.batch, p.prompt_tokens, hw).ttft_s - per_step * steps
        points.append((p.batch, p.prompt_tokens, residual, p.ttft_s))
    per_prompt, per_token = fit_prefill_overhead(points)
    return Assumptions(
        step_overhead_s=per_step,
        seq_overhead_s=per_seq,
        prefill_seq_overhead_s=per_prompt,
        prefill_token_overhead_s=per_token,
        max_step_tokens=max_step_tokens,
        graph_max_batch=graph_max_batch,
    )
