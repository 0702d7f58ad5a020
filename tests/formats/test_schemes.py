"""Block schemes: scale rules recomputed independently (python math + ml_dtypes / torch casts), tails, bad input."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from cumulo.errors import FormatError
from cumulo.formats.packed import concat_rows
from cumulo.formats.packing import pack, packed_row_bytes, unpack
from cumulo.formats.quantize import quantize
from cumulo.formats.schemes import SCHEMES, get_scheme


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    # Rows of very different magnitude so per-block scales differ.
    return w * torch.logspace(-3, 1, n).unsqueeze(1)


def test_deepseek_block_fp8_matches_kernel_py_recipe_with_tails() -> None:
    w = _weight(200, 300)
    p = quantize(w, "fp8-block")
    assert p.codes.shape == (200, 300) and p.scales is not None and p.scales.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            tile = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            s = max(tile.abs().max().item(), 1e-4) / 448
            assert p.scales[i, j].item() == pytest.approx(s, rel=1e-7)
            expected = (tile / p.scales[i, j]).to(torch.float8_e4m3fn).view(torch.uint8)
            assert torch.equal(p.codes[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128], expected)


def test_ue8m0_scale_is_the_fp32_scale_rounded_up_to_a_power_of_two() -> None:
    w = _weight(256, 384, seed=1)
    fp32 = quantize(w, "fp8-block").scales
    pow2 = quantize(w, "ue8m0-fp8").scales
    assert fp32 is not None and pow2 is not None
    for raw, got in zip(fp32.flatten().tolist(), pow2.flatten().tolist(), strict=True):
        assert got == 2.0 ** math.ceil(math.log2(raw))


@pytest.mark.parametrize(
    ("name", "elem", "emax"),
    [
        ("mxfp8", ml_dtypes.float8_e4m3fn, 8),
        ("mxfp6", ml_dtypes.float6_e2m3fn, 2),
        ("mxfp6-e3m2", ml_dtypes.float6_e3m2fn, 4),
        ("mxfp4", ml_dtypes.float4_e2m1fn, 2),
    ],
)
def test_mx_floor_rule_matches_spec_formula(name: str, elem: type, emax: int) -> None:
    w = _weight(4, 70, seed=2)  # 70 = 2 full blocks + a tail of 6
    p = quantize(w, name)
    assert p.scales is not None and p.scales.shape == (4, 3)
    codes = p.element_codes()
    elem_max = float(ml_dtypes.finfo(elem).max)
    for r in range(4):
        for b in range(3):
            block = w[r, b * 32 : (b + 1) * 32].double().numpy()
            x_exp = math.floor(math.log2(np.abs(block).max())) - emax
            assert int(p.scales[r, b]) == x_exp + 127
            ref = np.clip(block / 2.0**x_exp, -elem_max, elem_max).astype(np.float32).astype(elem)
            got = codes[r, b * 32 : (b + 1) * 32].numpy()
            assert np.array_equal(got, ref.view(np.uint8) & ((1 << p.scheme.element.bits) - 1))


@pytest.mark.parametrize("name", ["mxfp8-rceil", "mxfp4-rceil", "mxint8-rceil"])
def test_mx_rceil_rule_never_clips_the_block_max(name: str) -> None:
    w = _weight(8, 256, seed=3)
    p = quantize(w, name)
    elem = p.scheme.element
    assert elem is not None and p.scales is not None
    amax = w.abs().reshape(8, -1, 32).amax(-1)
    expected = torch.tensor(
        [[math.ceil(math.log2(a / elem.max)) + 127 for a in row] for row in amax.tolist()]
    )
    assert torch.equal(p.scales.long(), expected)
    scaled_max = amax / torch.ldexp(torch.ones_like(amax), p.scales.long() - 127)
    assert bool((scaled_max <= elem.max).all())


def test_mxint8_floor_rule_keeps_elements_within_plus_minus_127_over_64() -> None:
    p = quantize(_weight(3, 64, seed=4), "mxint8")
    assert p.codes.view(torch.int8).abs().max().item() <= 127


def test_nvfp4_uses_e4m3_block_scales_under_an_fp32_tensor_scale() -> None:
    w = _weight(6, 48, seed=5)
    p = quantize(w, "nvfp4")
    assert p.tensor_scale is not None and p.scales is not None and p.scales.shape == (6, 3)
    g = w.abs().max().item() / (448 * 6)
    assert p.tensor_scale.item() == pytest.approx(g, rel=1e-7)
    amax_b = w.abs().reshape(6, 3, 16).amax(-1).numpy()
    want = np.clip(amax_b / 6 / np.float32(g), 2.0**-6, 448).astype(np.float32)
    assert np.array_equal(p.scales.numpy(), want.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    assert p.codes.shape == (6, 24)  # two FP4 codes per byte


@pytest.mark.parametrize(
    ("name", "limit"),
    [
        ("fp8", 0.03),
        ("ue8m0-fp8", 0.03),
        ("mxfp8", 0.031),
        ("mxfp8-rceil", 0.03),
        ("mxfp6", 0.035),
        ("mxfp4", 0.13),
        ("nvfp4", 0.11),
        ("mxint8", 0.012),
        ("hif8", 0.03),
        ("bf16", 0.004),
    ],
)
def test_relative_error_on_gaussian_weights_is_what_the_format_allows(name: str, limit: float) -> None:
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(6))
    err = (quantize(w, name).dequantize() - w).norm() / w.norm()
    assert err.item() < limit


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_scheme_round_trips_zero_blocks_and_odd_shapes(name: str) -> None:
    w = _weight(130, 67, seed=7)
    w[:, :32] = 0.0  # an all-zero block for every K-blocked scheme
    p = quantize(w, name)
    d = p.dequantize(torch.float32)
    assert d.shape == (130, 67) and bool(torch.isfinite(d).all())
    assert bool((d[:, :32] == 0).all())
    assert p.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_bytes_per_weight_are_real_for_sub_byte_formats() -> None:
    w = _weight(64, 256)
    assert quantize(w, "mxfp4").codes.numel() == 64 * 128
    assert quantize(w, "mxfp6").codes.numel() == 64 * 192
    assert quantize(w, "ue8m0-fp8").codes.numel() == 64 * 256


def test_fp4_packing_puts_element_zero_in_the_low_nibble() -> None:
    packed = pack(torch.tensor([[0x1, 0xF, 0x7]], dtype=torch.uint8), 4)
    assert packed.tolist() == [[0xF1, 0x07]]


@pytest.mark.parametrize(("bits", "k"), [(4, 7), (4, 8), (6, 5), (6, 12), (8, 3)])
def test_pack_then_unpack_gives_the_codes_back(bits: int, k: int) -> None:
    codes = torch.randint(0, 1 << bits, (3, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    packed = pack(codes, bits)
    assert packed.shape == (3, packed_row_bytes(bits, k))
    assert torch.equal(unpack(packed, bits, k), codes)


def test_non_finite_weights_are_refused_with_a_clear_error() -> None:
    w = torch.ones(4, 32)
    w[1, 3] = float("inf")
    with pytest.raises(FormatError, match="NaN or Inf"):
        quantize(w, "mxfp8", name="layers.0.q_proj.weight")


def test_unknown_format_names_list_the_known_ones() -> None:
    with pytest.raises(FormatError, match="ue8m0-fp8"):
        get_scheme("fp7")
    with pytest.raises(FormatError, match="2-D"):
        quantize(torch.ones(3), "fp8")


@pytest.mark.parametrize(
    ("fmt", "rows"),
    [("ue8m0-fp8", (576, 192, 192)), ("ue8m0-fp8", (256, 128)), ("fp8", (5, 7)), ("fp8-tensor", (5, 7)),
     ("mxfp4", (3, 9)), ("hif8", (4, 4)), ("bf16", (2, 3))],
)  # fmt: skip
def test_concat_rows_joins_packed_weights_exactly(fmt: str, rows: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(9)
    parts = [quantize(torch.randn(n, 160, generator=g) * (i + 1), fmt) for i, n in enumerate(rows)]
    joined = concat_rows(parts)
    assert joined.shape == (sum(rows), 160)
    assert torch.equal(joined.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_concat_rows_keeps_128_row_blocks_when_they_align_and_refuses_mixed_nvfp4() -> None:
    aligned = concat_rows(
        [quantize(torch.randn(256, 128), "ue8m0-fp8"), quantize(torch.randn(128, 128), "ue8m0-fp8")]
    )
    assert aligned.block == (128, 128) and aligned.scales is not None and aligned.scales.shape == (3, 1)
    misaligned = concat_rows(
        [quantize(torch.randn(64, 128), "ue8m0-fp8"), quantize(torch.randn(64, 128), "ue8m0-fp8")]
    )
    assert misaligned.block == (1, 128)
    with pytest.raises(FormatError, match="tensor scales"):
        concat_rows([quantize(torch.randn(4, 32), "nvfp4"), quantize(torch.randn(4, 32) * 5, "nvfp4")])
