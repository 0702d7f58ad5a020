"""Greedy-flip rounding refinement on top of GPTQ, in exactly GPTQ's layout (same scales, same codes' format).

GPTQ decides each column once, greedily, left to right; its codes are a good start but not a local minimum of
the layer's output error sum_n e_n H e_n^T (e_n = q_n - w_n, H = sum x^T x over calibration tokens). Here each
row then repeatedly moves the one weight whose step to its next grid value (up or down, under the block scale
GPTQ fixed) lowers that error the most: exact coordinate descent, never worse than GPTQ on the calibration
objective. Only codes change, so the written file is the same format and layout as GPTQ's and RTN's.

An AdaRound-style continuous relaxation (rectified sigmoid between two neighbours, annealed regulariser) was
tried first against the same Hessian: its hard rounding came out 1.3-2x worse than GPTQ on a random correlated
layer (the relaxed optimum sits between grid points), so it is not kept.
"""

from __future__ import annotations

import torch

from cumulo.formats import codec, packing
from cumulo.formats.element import Kind
from cumulo.formats.gptq import gptq_quantize
from cumulo.formats.packed import PackedWeight
from cumulo.formats.schemes import get_scheme


def _signed_table(elem, device: torch.device) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Every finite value of a float element format, ascending, [C]."""
    codes = torch.arange(0, 1 << elem.bits, dtype=torch.int32, device=device).to(torch.uint8)
    values = codec.decode(elem, codes)
    return torch.unique(values[torch.isfinite(values)])


def flip_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    format: str,
    *,
    name: str = "weight",
    rounds: int = 256,
    **gptq_options: object,
) -> PackedWeight:
    """GPTQ, then exact greedy coordinate descent on the layer's output error: each round, every row moves the one
    weight whose step to its next grid value (either way) lowers e_n H e_n^T the most, if any does. The change
    of flipping weight j by d is 2 d (E H)[n, j] + d^2 H[j, j], so one round costs O(N K). Never worse than GPTQ
    on the calibration objective; same scales and layout."""
    start = gptq_quantize(weight, hessian, format, name=name, **gptq_options)  # type: ignore[arg-type]
    elem = get_scheme(format).element
    if elem is None or elem.kind != Kind.FLOAT or not elem.signed:
        return start
    n, k = weight.shape
    w = weight.to(torch.float32)
    h = hessian.to(w.device, torch.float32)
    grid = start._apply_scales(torch.ones((n, k), device=w.device))  # [N, K]
    table = _signed_table(elem, w.device)  # [C]
    q = start.dequantize()
    at = torch.searchsorted(table, (q / grid).contiguous())  # [N, K] indices into table
    eh = (q - w) @ h  # [N, K]
    hd = torch.diagonal(h)
    rows = torch.arange(n, device=w.device)
    last = len(table) - 1
    for _ in range(rounds):
        best_gain = torch.zeros(n, device=w.device)
        best_j = torch.zeros(n, dtype=torch.long, device=w.device)
        best_to = torch.zeros(n, dtype=torch.long, device=w.device)
        for move in (-1, 1):
            to = (at + move).clamp(0, last)
            d = (table[to] - table[at]) * grid
            gain = -(2 * d * eh + d * d * hd)  # [N, K] decrease of the row's error
            g, j = gain.max(dim=1)
            take = g > best_gain
            best_gain = torch.where(take, g, best_gain)
            best_j = torch.where(take, j, best_j)
            best_to = torch.where(take, to[rows, j], best_to)
        moving = best_gain > 0
        if not bool(moving.any()):
            break
        r, j, to = rows[moving], best_j[moving], best_to[moving]
        d = (table[to] - table[at[r, j]]) * grid[r, j]  # [M]
        at[r, j] = to
        eh[r] += d[:, None] * h[j]
    codes = codec.encode(elem, table[at], saturate=True)  # grid values, before the block scales
    packed = packing.pack(codes, elem.bits).contiguous()
    return PackedWeight(
        start.format, packed, start.scales, start.shape, start.tensor_scale, start.block_override
    )
