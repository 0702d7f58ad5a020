"""Error-compensating rounding (GPTQ, arXiv 2210.17323) into any block scheme, with the same layout as `quantize`.

Round-to-nearest minimises each weight's own error; what a layer's user sees is the output error ||X W^T - X Q^T||.
GPTQ quantizes the K input columns in order and, after each column, moves that column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = 2 X^T X over a small
calibration set, damped), so later columns absorb what earlier ones lost. The update uses the upper Cholesky
factor U of H^-1: err = (w_i - q_i) / U[i, i]; W[:, j>i] -= err U[i, j]. Columns are processed in lazy batches
of 128 with one matrix product per batch for the rest of the weight (the paper's "lazy batch" trick).

Scales follow the scheme's own rule, decided per block when the block's first column comes up, from the weights
as updated so far: MX (1 x 32) and NVFP4 (1 x 16) blocks run along K, so each block's scale sees the error that
earlier blocks pushed into it; ue8m0-fp8's 128 x 128 tiles take their scale at every 128th column; per-channel and
per-tensor schemes decide theirs from the original weight at column 0. NVFP4's fp32 tensor scale is fixed from
the original weight (or `tensor_amax`) so fused siblings still share it. Scales come from `quantize` applied to
the block's columns, so the rule lives in one place, and the result is a `PackedWeight` of exactly the shape and
dtypes round-to-nearest gives: only codes and scales differ.
"""

from __future__ import annotations

import torch

from cumulo.errors import FormatError
from cumulo.formats import codec, packing
from cumulo.formats.packed import PackedWeight
from cumulo.formats.quantize import quantize
from cumulo.formats.schemes import get_scheme

LAZY_BATCH = 128  # columns per lazy batch; a multiple of every block width along K (16, 32, 128)


def hessian_inverse_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in float64 for a stable factorisation.

    Inputs that never fired in calibration (zero diagonal) get H[i, i] = 1: their columns are rounded to nearest
    and pass no error on. If H is still not positive definite, the damping grows tenfold until it is.
    """
    h = hessian.to(torch.float64).clone()
    k = h.shape[0]
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(k, dtype=torch.float64, device=h.device)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)
        damp *= 10
    raise FormatError("calibration Hessian is not positive definite even with heavy damping")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    format: str,
    *,
    name: str = "weight",
    tensor_amax: float | None = None,
    damp: float = 0.01,
) -> PackedWeight:
    """Quantize a [N, K] weight to `format` with GPTQ rounding against `hessian` [K, K] (sum of x^T x).

    Runs on one torch thread: the loop is thousands of small vector ops, and on a shared 2-core host two
    threads measured 20-50x slower than one (OpenMP hand-offs cost more than the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, hessian, format, name, tensor_amax, damp)
    finally:
        torch.set_num_threads(threads)


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    format: str,
    name: str,
    tensor_amax: float | None,
    damp: float,
) -> PackedWeight:
    scheme = get_scheme(format)
    if scheme.element is None:
        return quantize(weight, scheme.name, name=name)
    if weight.dim() != 2:
        raise FormatError(f"{name}: expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise FormatError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match K = {k}")
    if not bool(torch.isfinite(weight).all()):
        raise FormatError(f"{name}: weight has NaN or Inf values; refusing to quantize to {scheme.name}")
    elem = scheme.element
    w = weight.to(torch.float32).clone()
    if scheme.scale == "nvfp4" and tensor_amax is None:
        tensor_amax = float(w.abs().amax())
    u = hessian_inverse_factor(hessian.to(w.device), damp)
    br, bc = scheme.block
    block_cols = bc or k  # 0: one scale across the whole row (per channel / per tensor)
    # A block narrower than K must lie inside one lazy batch, so its scale sees every update pushed into it.
    lazy = block_cols if block_cols < k and LAZY_BATCH % block_cols else LAZY_BATCH
    codes = torch.empty((n, k), dtype=torch.uint8, device=w.device)
    scale_parts: list[torch.Tensor] = []
    tensor_scale = None
    grid = torch.empty(n, device=w.device)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        batch = w[:, i1:i2].clone()  # [N, B], updated in place as its columns go
        errors = torch.zeros_like(batch)
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_cols == 0:
                # A new block: its scale from the weights as they are now (the rest of the batch is current).
                source = batch[:, i : i + block_cols] if block_cols < k else w
                part = quantize(source, scheme.name, name=name, tensor_amax=tensor_amax)
                assert part.scales is not None
                scale_parts.append(part.scales)
                tensor_scale = part.tensor_scale
                grid = part.block_scales()[:, 0].repeat_interleave(br or n)[:n]  # [N]
            x = batch[:, i]
            code = codec.encode(elem, x / grid, saturate=True)
            q = codec.decode(elem, code) * grid
            codes[:, col] = code
            err = (x - q) / u[col, col]
            batch[:, i + 1 :] -= err[:, None] * u[col, col + 1 : i2][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    scales = torch.cat(scale_parts, dim=1).contiguous()
    packed = packing.pack(codes, elem.bits).contiguous()
    return PackedWeight(scheme.name, packed, scales, (n, k), tensor_scale)
