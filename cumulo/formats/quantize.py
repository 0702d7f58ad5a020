"""Quantize a float weight [N, K] into a `PackedWeight` of a named scheme (the inverse of `dequantize`).

Each scheme's scale rule is spelled out in `cumulo.formats.scales`; elements are then encoded with saturation
(`codec.encode`), so no finite weight becomes NaN or Inf. Non-finite weights are refused with `FormatError`:
a scale computed from them would be garbage for the whole block.
"""

from __future__ import annotations

import torch

from cumulo.errors import FormatError
from cumulo.formats import codec, packing
from cumulo.formats.element import E2M1, E4M3FN
from cumulo.formats.packed import PackedWeight
from cumulo.formats.scales import block_amax, deepseek_scale, e8m0_from_exponent, mx_scale_exponent
from cumulo.formats.schemes import get_scheme


def quantize(
    weight: torch.Tensor, format: str, *, name: str = "weight", tensor_amax: float | None = None
) -> PackedWeight:
    """Quantize a [N, K] weight. `tensor_amax` (NVFP4 only) overrides the amax behind the fp32 tensor scale, so
    weights that the engine fuses (q/k/v, gate/up) can share one tensor scale and be joined exactly."""
    scheme = get_scheme(format)
    if weight.dim() != 2:
        raise FormatError(f"{name}: expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise FormatError(f"{name}: expected a floating-point weight, got {weight.dtype}")
    n, k = weight.shape
    if scheme.element is None:
        return PackedWeight(scheme.name, weight.to(torch.bfloat16).contiguous(), None, (n, k))
    if not bool(torch.isfinite(weight).all()):
        raise FormatError(f"{name}: weight has NaN or Inf values; refusing to quantize to {scheme.name}")
    w = weight.to(torch.float32)
    br, bc = scheme.block
    amax = block_amax(w, br, bc)
    tensor_scale = None
    if scheme.scale in ("e8m0-floor", "e8m0-rceil"):
        elem = scheme.element
        exp = mx_scale_exponent(amax, elem.max, elem.emax, scheme.scale.removeprefix("e8m0-"))
        scales = e8m0_from_exponent(exp)
        grid = torch.ldexp(torch.ones_like(amax), exp)
    elif scheme.scale == "nvfp4":
        scales, tensor_scale, grid = _nvfp4_scales(amax, tensor_amax or float(w.abs().amax()))
    elif scheme.scale in ("fp32", "ue8m0"):
        if scheme.name in ("fp8-block", "ue8m0-fp8"):
            grid = deepseek_scale(amax, ue8m0=scheme.scale == "ue8m0")
        else:
            grid = torch.where(amax > 0, amax / scheme.scale_target, torch.ones_like(amax))
        scales = grid
    else:
        raise FormatError(f"scheme {scheme.name} has no quantizer")
    full = grid.repeat_interleave(br or n, dim=0).repeat_interleave(bc or k, dim=1)[:n, :k]
    codes = codec.encode(scheme.element, w / full, saturate=True)
    packed = packing.pack(codes, scheme.element.bits).contiguous()
    return PackedWeight(scheme.name, packed, scales.contiguous(), (n, k), tensor_scale)


def _nvfp4_scales(amax_blocks: torch.Tensor, amax_tensor: float) -> tuple[torch.Tensor, ...]:
    """NVFP4 two-level scale: g = amax / (448 * 6) in fp32; per block s = e4m3(amax_b / 6 / g)."""
    g = amax_tensor / (E4M3FN.max * E2M1.max) if amax_tensor > 0 else 1.0
    tensor_scale = torch.tensor(g, dtype=torch.float32, device=amax_blocks.device)
    # Clamping to E4M3's smallest normal keeps tiny blocks away from subnormal scales; all-zero blocks then
    # get a harmless nonzero scale.
    wanted = (amax_blocks / E2M1.max / tensor_scale).clamp(2.0**-6, E4M3FN.max)
    codes = codec.encode(E4M3FN, wanted, saturate=True)
    grid = codec.decode(E4M3FN, codes) * tensor_scale
    return codes, tensor_scale, grid
