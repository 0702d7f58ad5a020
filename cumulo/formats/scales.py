"""Scale rules of the block schemes: block amax with zero padding, and the power-of-two (E8M0/UE8M0) scales.

All exponents are computed exactly with `torch.frexp` (no float log2), so a block whose amax is an exact power
of two lands on the right side of every boundary. Rules, with their sources:

- OCP MX v1.0 FLOOR (section 6.3): X = 2**(floor(log2(amax)) - emax_elem); the block maximum may clip to the
  element max after rounding.
- RCEIL (cuBLAS / PTX cvt.rp.satfinite.ue8m0x2; arXiv 2506.08027): X = 2**ceil(log2(amax / max_elem)); never
  clips.
- DeepSeek UE8M0 (DeepGEMM `ceil_to_ue8m0`, DeepSeek-V3.1 checkpoints): s = 2**ceil(log2(max(amax, 1e-4) / 448)),
  i.e. the fp32 scale of DeepSeek-V3 inference/kernel.py rounded up to a power of two.
E8M0 exponents are clamped to [-127, 127]; an all-zero block gets the smallest scale, 2**-127.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E8M0_BIAS = 127


def block_amax(x: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """amax of |x| per (block_rows x block_cols) tile of a 2-D tensor; tails are padded with zeros.

    A block size of 0 means the whole dimension. Returns float32 [ceil(N / br), ceil(K / bc)].
    """
    n, k = x.shape
    br = block_rows or n
    bc = block_cols or k
    a = x.abs().to(torch.float32)
    pad_n, pad_k = (-n) % br, (-k) % bc
    if pad_n or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_n))
    tiles = a.reshape(a.shape[0] // br, br, a.shape[1] // bc, bc)
    return tiles.amax(dim=(1, 3))


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) for x > 0 as int32, exact (x = m * 2**e with m in [0.5, 1))."""
    _, e = torch.frexp(x.to(torch.float32))
    return e.to(torch.int32) - 1


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) for x > 0 as int32, exact."""
    m, e = torch.frexp(x.to(torch.float32))
    return torch.where(m == 0.5, e - 1, e).to(torch.int32)


def mx_scale_exponent(amax: torch.Tensor, elem_max: float, elem_emax: int, rule: str) -> torch.Tensor:
    """Shared-scale exponent per block (int32, clamped to E8M0's range) by the "floor" or "rceil" rule."""
    zero = amax <= 0
    safe = torch.where(zero, torch.ones_like(amax), amax)
    if rule == "floor":
        exp = floor_log2(safe) - elem_emax
    elif rule == "rceil":
        exp = ceil_log2(safe / elem_max)
    else:
        raise ValueError(f"unknown MX scale rule {rule!r}")
    exp = torch.where(zero, torch.full_like(exp, -E8M0_BIAS), exp)
    return exp.clamp(-E8M0_BIAS, E8M0_BIAS)


def e8m0_from_exponent(exp: torch.Tensor) -> torch.Tensor:
    return (exp + E8M0_BIAS).to(torch.uint8)


def e8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 codes -> float32 2**(code - 127), exact (2**-127 is a float32 subnormal); 0xFF -> NaN."""
    exp = codes.to(torch.int32) - E8M0_BIAS
    out = torch.ldexp(torch.ones_like(exp, dtype=torch.float32), exp)
    return torch.where(codes.to(torch.int32) == 0xFF, torch.full_like(out, float("nan")), out)


def deepseek_scale(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """DeepSeek block FP8 scale (what `weight_scale_inv` stores): max(amax, 1e-4) / 448, optionally 2**ceil."""
    s = amax.to(torch.float32).clamp(min=1e-4) / 448.0
    if ue8m0:
        s = torch.ldexp(torch.ones_like(s), ceil_log2(s))
    return s
