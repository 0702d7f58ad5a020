"""GPTQ rounding (cumulo.formats.gptq): lower output error than round-to-nearest on correlated inputs, for each
scheme family, in exactly round-to-nearest's layout, deterministically."""

from __future__ import annotations

import pytest
import torch

from cumulo.errors import FormatError
from cumulo.formats.gptq import gptq_quantize
from cumulo.formats.quantize import quantize
from tests.support.calibration import correlated_layer, output_error

# One per family of block shapes: 128 x 128 tiles, per channel, 1 x 32 along K (FP8, FP4, INT8 elements),
# 1 x 16 with a two-level scale, HiF8's per channel.
FAMILIES = ["ue8m0-fp8", "fp8", "mxfp8", "mxfp4", "mxint8", "nvfp4", "hif8", "mxfp6-rceil"]


def _layer() -> tuple[torch.Tensor, torch.Tensor]:
    return correlated_layer(200, 320, 1024)  # N and K not multiples of 128: tails included


@pytest.mark.parametrize("fmt", FAMILIES)
def test_gptq_output_error_is_well_below_round_to_nearest(fmt: str) -> None:
    w, x = _layer()
    rtn = output_error(quantize(w, fmt), w, x)
    gptq = output_error(gptq_quantize(w, x.T @ x, fmt), w, x)
    assert gptq < 0.85 * rtn, (fmt, rtn, gptq)


@pytest.mark.parametrize("fmt", FAMILIES)
def test_gptq_writes_round_to_nearest_layout(fmt: str) -> None:
    w, x = _layer()
    rtn, gptq = quantize(w, fmt), gptq_quantize(w, x.T @ x, fmt)
    assert gptq.format == rtn.format and gptq.shape == rtn.shape and gptq.block == rtn.block
    for a, b in [(rtn.codes, gptq.codes), (rtn.scales, gptq.scales), (rtn.tensor_scale, gptq.tensor_scale)]:
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert not torch.equal(rtn.codes, gptq.codes)  # it did round differently


def test_gptq_codes_decode_to_values_on_the_scheme_grid() -> None:
    """Requantizing GPTQ's own dequantized weight to nearest gives back its codes: every value is on the grid
    its stored scales define, so any reader of the layout sees what GPTQ chose."""
    w, x = _layer()
    for fmt in ("mxfp4", "mxfp8", "nvfp4"):
        gptq = gptq_quantize(w, x.T @ x, fmt)
        again = quantize(gptq.dequantize(), fmt, tensor_amax=float(w.abs().amax()))
        assert torch.equal(again.dequantize(), gptq.dequantize()), fmt


def test_gptq_is_deterministic() -> None:
    w, x = _layer()
    a, b = gptq_quantize(w, x.T @ x, "nvfp4"), gptq_quantize(w.clone(), (x.T @ x).clone(), "nvfp4")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_gptq_with_no_signal_rounds_like_round_to_nearest() -> None:
    """A zero Hessian (inputs that never fired) carries no error anywhere: GPTQ falls back to nearest."""
    w, _ = _layer()
    k = w.shape[1]
    for fmt in ("ue8m0-fp8", "mxfp4"):
        assert torch.equal(gptq_quantize(w, torch.zeros(k, k), fmt).codes, quantize(w, fmt).codes)


def test_gptq_refuses_mismatched_hessians_and_bad_weights() -> None:
    w, x = _layer()
    with pytest.raises(FormatError, match="Hessian shape"):
        gptq_quantize(w, torch.eye(7), "mxfp4")
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FormatError, match="NaN or Inf"):
        gptq_quantize(bad, x.T @ x, "mxfp4")


@pytest.mark.parametrize("fmt", ["ue8m0-fp8", "mxfp8", "mxfp4", "nvfp4", "fp8"])
@pytest.mark.parametrize(("act_order", "scale_search"), [(True, False), (False, True), (True, True)])
def test_gptq_options_keep_the_layout_and_beat_round_to_nearest(
    fmt: str, act_order: bool, scale_search: bool
) -> None:
    """Act-order (static scales) and the power-of-two scale search still write RTN's layout, values on the
    grid of the stored scales, and a layer output error below round-to-nearest's."""
    w, x = _layer()
    rtn = quantize(w, fmt)
    got = gptq_quantize(w, x.T @ x, fmt, act_order=act_order, scale_search=scale_search)
    assert got.format == rtn.format and got.shape == rtn.shape and got.block == rtn.block
    assert got.codes.shape == rtn.codes.shape and got.scales.shape == rtn.scales.shape
    assert got.scales.dtype == rtn.scales.dtype
    assert output_error(got, w, x) < 0.85 * output_error(rtn, w, x), fmt
    if got.scheme.scale == "ue8m0":  # still powers of two, as the reader of scale_fmt ue8m0 assumes
        mantissa, _ = torch.frexp(got.scales)
        assert bool((mantissa == 0.5).all())


def test_scale_search_moves_mx_floor_scales_where_the_block_maximum_clips() -> None:
    """MX FLOOR puts a block maximum of 1.9 x 2^e at 475 x the scale, beyond E4M3's 448, where it clips; the
    search doubles that block's scale (one E8M0 step) and leaves the blocks that do not clip alone."""
    from cumulo.formats.gptq import searched_scales

    w = torch.full((1, 64), 0.01)
    w[0, 0] = 1.9  # block 0 clips under FLOOR (1.9 / 2^-8 = 486 > 448)
    w[0, 32] = 1.2  # block 1 does not (1.2 / 2^-8 = 307)
    floor = quantize(w, "mxfp8")
    searched = searched_scales(w, floor, torch.ones(64))
    assert searched.scales.tolist() == [[floor.scales[0, 0].item() + 1, floor.scales[0, 1].item()]]
