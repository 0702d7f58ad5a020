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
POWER_OF_TWO_SCALES = ("ue8m0", "e8m0-floor", "e8m0-rceil")


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
    act_order: bool = False,
    scale_search: bool = False,
) -> PackedWeight:
    """Quantize a [N, K] weight to `format` with GPTQ rounding against `hessian` [K, K] (sum of x^T x).

    act_order: quantize columns by descending H diagonal (the inputs with the most energy first, while the most
    columns remain to absorb their error); every block's scale is then fixed up front from the original weight,
    since a block's columns come up scattered. scale_search: for power-of-two scales, try the rule's scale, half
    and twice it per block and keep the one with the least H-diagonal-weighted rounding error (E4M3 under
    MX FLOOR clips a block's top values above 448; the rule's own choice is kept on ties).

    Runs on one torch thread: the loop is thousands of small vector ops, and on a shared 2-core host two
    threads measured 20-50x slower than one (OpenMP hand-offs cost more than the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, hessian, format, name, tensor_amax, damp, act_order, scale_search)
    finally:
        torch.set_num_threads(threads)


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    format: str,
    name: str,
    tensor_amax: float | None,
    damp: float,
    act_order: bool = False,
    scale_search: bool = False,
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
    hdiag = torch.diagonal(hessian).to(w.device, torch.float32).clamp(min=0)
    search = scale_search and scheme.scale in POWER_OF_TWO_SCALES
    if act_order:
        return _gptq_act_order(w, hessian, hdiag, scheme, name, tensor_amax, damp, search)
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
                if search:
                    part = searched_scales(source, part, hdiag[col : col + source.shape[1]])
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


def searched_scales(weight: torch.Tensor, part: PackedWeight, hdiag: torch.Tensor) -> PackedWeight:
    """`part` (round to nearest of `weight` [N, B]) with each power-of-two block scale replaced by whichever of
    (rule / 2, rule, rule x 2) rounds the block with the least sum of H[j, j] (w - q)^2. Same dtypes and layout:
    E8M0 codes move by one, UE8M0's fp32 scales stay powers of two. The rule's scale wins ties."""
    scheme = part.scheme
    assert scheme.element is not None and part.scales is not None
    n, b = weight.shape
    br, bc = part.block
    br, bc = br or n, bc or b
    base = part.block_scales()  # [nb_rows, nb_cols]
    best_err = None
    best_factor = torch.zeros_like(base, dtype=torch.int32)
    pad_n, pad_k = (-n) % br, (-b) % bc
    for factor in (0, -1, 1):
        grid = torch.ldexp(base, torch.full_like(base, factor, dtype=torch.int32))
        full = grid.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:n, :b]
        q = codec.decode(scheme.element, codec.encode(scheme.element, weight / full, saturate=True)) * full
        err = (weight - q).square() * hdiag[None, :]
        err = torch.nn.functional.pad(err, (0, pad_k, 0, pad_n))
        err = err.reshape(base.shape[0], br, base.shape[1], bc).sum(dim=(1, 3))
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_factor = torch.where(better, torch.full_like(best_factor, factor), best_factor)
    if scheme.scale == "ue8m0":
        scales = torch.ldexp(part.scales, best_factor)
    else:  # E8M0 codes: the exponent plus 127, kept inside [0, 254]
        scales = (part.scales.to(torch.int32) + best_factor).clamp(0, 254).to(torch.uint8)
    return PackedWeight(part.format, part.codes, scales, part.shape, part.tensor_scale, part.block_override)


def _gptq_act_order(
    w: torch.Tensor,
    hessian: torch.Tensor,
    hdiag: torch.Tensor,
    scheme,  # type: ignore[no-untyped-def]
    name: str,
    tensor_amax: float | None,
    damp: float,
    search: bool,
) -> PackedWeight:
    """GPTQ over the columns in descending order of H's diagonal, with every scale fixed from the original
    weight first (the same scales round-to-nearest writes, or the searched ones): codes land in their own
    columns, so the layout is RTN's."""
    n, k = w.shape
    elem = scheme.element
    part = quantize(w, scheme.name, name=name, tensor_amax=tensor_amax)
    if search:
        part = searched_scales(w, part, hdiag)
    br, bc = part.block
    grid = part.block_scales().repeat_interleave(br or n, 0).repeat_interleave(bc or k, 1)[:n, :k]
    perm = torch.argsort(hdiag, descending=True, stable=True)
    wp = w[:, perm].clone()
    gp = grid[:, perm]
    u = hessian_inverse_factor(hessian.to(w.device)[perm][:, perm], damp)
    codes_p = torch.empty((n, k), dtype=torch.uint8, device=w.device)
    for i1 in range(0, k, LAZY_BATCH):
        i2 = min(i1 + LAZY_BATCH, k)
        batch = wp[:, i1:i2].clone()
        errors = torch.zeros_like(batch)
        for i in range(i2 - i1):
            col = i1 + i
            x = batch[:, i]
            code = codec.encode(elem, x / gp[:, col], saturate=True)
            q = codec.decode(elem, code) * gp[:, col]
            codes_p[:, col] = code
            err = (x - q) / u[col, col]
            batch[:, i + 1 :] -= err[:, None] * u[col, col + 1 : i2][None, :]
            errors[:, i] = err
        wp[:, i2:] -= errors @ u[i1:i2, i2:]
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    packed = packing.pack(codes, elem.bits).contiguous()
    return PackedWeight(scheme.name, packed, part.scales, (n, k), part.tensor_scale, part.block_override)
