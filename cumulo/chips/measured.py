"""Measured matmul curves: how fast a calibrated host multiplies a few rows by big weights.

CPUs multiplying 1-16 rows reach neither their streaming bandwidth nor their square-matmul peak, so for chips
with these measurements (the `local` chip) `predict` uses the curve instead of the roofline's two lines.
"""

from __future__ import annotations

import math

from cumulo.chips.catalog import SKINNY_ROWS, Chip


def skinny_curve(chip: Chip, prefix: str, peak_tflops: float | None = None) -> list[tuple[float, float]]:
    """Measured (rows, FLOP/s) points of `prefix`_m<rows>_tflops (a dtype or a compact format), ending at
    `peak_tflops` for 1024 rows when given (the square-matmul peak); [] when nothing was measured."""
    points = []
    for m in SKINNY_ROWS:
        rate = chip.get(f"{prefix}_m{m}_tflops")
        if rate:
            points.append((float(m), rate * 1e12))
    if not points:
        return []
    return [*points, (1024.0, peak_tflops * 1e12)] if peak_tflops else points


def rate_at(curve: list[tuple[float, float]], rows: float) -> float:
    """FLOP/s at `rows`, interpolated in log-log between measured points and clamped at the ends."""
    if rows <= curve[0][0]:
        return curve[0][1]
    for (m0, r0), (m1, r1) in zip(curve, curve[1:], strict=False):
        if rows <= m1:
            f = math.log(rows / m0) / math.log(m1 / m0)
            return math.exp(math.log(r0) + f * math.log(r1 / r0))
    return curve[-1][1]
