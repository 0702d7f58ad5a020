"""Element codecs against independent references, over every code and over random, tie and edge values."""

from __future__ import annotations

import math

import en_dtypes
import ml_dtypes
import numpy as np
import pytest
import torch

from cumulo.errors import FormatError
from cumulo.formats.codec import _encode_table, decode, encode, round_to
from cumulo.formats.element import (
    E2M1,
    E2M3,
    E3M2,
    E4M3FN,
    E5M2,
    E8M0,
    ELEMENT_FORMATS,
    HIF8,
    INT8,
    ElementFormat,
    all_values,
    element_format,
)

# Our format -> the independent numpy dtype that implements the same type.
REFERENCES: dict[str, type] = {
    "e4m3fn": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e8m0": ml_dtypes.float8_e8m0fnu,
    "hif8": en_dtypes.hifloat8,
}
FLOATS = [E4M3FN, E5M2, E2M3, E3M2, E2M1, HIF8]


def _ref_decode(fmt: ElementFormat) -> np.ndarray:
    codes = np.arange(fmt.num_codes, dtype=np.uint8)
    return codes.view(REFERENCES[fmt.name]).astype(np.float32)


def _ref_encode(fmt: ElementFormat, x: np.ndarray) -> np.ndarray:
    codes = x.astype(np.float32).astype(REFERENCES[fmt.name]).view(np.uint8)
    return codes & (fmt.num_codes - 1)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values, NaN where NaN, and the same sign on zeros (the sign of a NaN carries no meaning)."""
    signs_agree = np.array_equal(np.signbit(a) | np.isnan(a), np.signbit(b) | np.isnan(b))
    return bool(np.array_equal(a, b, equal_nan=True) and signs_agree)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_decode_of_every_code_matches_reference(name: str) -> None:
    fmt = ELEMENT_FORMATS[name]
    ours = decode(fmt, torch.arange(fmt.num_codes, dtype=torch.uint8)).numpy()
    table = np.array(all_values(fmt), dtype=np.float32)  # straight from the format's definition
    assert _same(ours, _ref_decode(fmt)) and _same(table, _ref_decode(fmt))


@pytest.mark.parametrize("name", list(ELEMENT_FORMATS))
def test_encode_of_decoded_code_gives_the_code_back(name: str) -> None:
    fmt = ELEMENT_FORMATS[name]
    codes = torch.arange(fmt.num_codes)
    values = decode(fmt, codes)
    keep = ~torch.isnan(values)
    if fmt is INT8:
        keep &= codes != 0x80  # -128 decodes to -2.0 but MX INT8 clamps symmetrically to +-127
    back = encode(fmt, values[keep], saturate=False)
    assert torch.equal(back.long(), codes[keep])


@pytest.mark.parametrize("fmt", [E4M3FN, E5M2, E2M3, E3M2, E2M1], ids=str)
def test_torch_float8_and_ml_dtypes_agree_with_our_table(fmt: ElementFormat) -> None:
    if fmt in (E4M3FN, E5M2):
        dt = torch.float8_e4m3fn if fmt is E4M3FN else torch.float8_e5m2
        via_torch = torch.arange(256, dtype=torch.uint8).view(dt).float().numpy()
        assert _same(decode(fmt, torch.arange(256)).numpy(), via_torch)
    assert fmt.max == float(ml_dtypes.finfo(REFERENCES[fmt.name]).max)


def _probe_values(fmt: ElementFormat, rng: np.random.Generator) -> np.ndarray:
    """Random magnitudes over the whole range, every exact midpoint (tie), and values just either side."""
    finite = np.array([v for v in all_values(fmt) if math.isfinite(v) and v >= 0], dtype=np.float64)
    finite = np.unique(finite)
    mids = (finite[:-1] + finite[1:]) / 2
    lo = math.log2(fmt.min_positive) - 2
    hi = math.log2(fmt.max) + 1
    rand = 2.0 ** rng.uniform(lo, hi, 4000) * rng.uniform(1, 2, 4000)
    mids32 = mids.astype(np.float32)
    near = np.concatenate([np.nextafter(mids32, np.float32(0)), np.nextafter(mids32, np.float32(np.inf))])
    mags = np.concatenate([rand.astype(np.float32), mids32, near, finite.astype(np.float32), [0.0]])
    return np.concatenate([mags, -mags]).astype(np.float32)


@pytest.mark.parametrize("fmt", FLOATS, ids=str)
def test_encode_matches_reference_on_random_ties_and_overflow(fmt: ElementFormat) -> None:
    x = _probe_values(fmt, np.random.default_rng(0))
    if fmt in (E4M3FN, E5M2, HIF8):  # ml_dtypes / en_dtypes do not saturate these
        x = np.concatenate([x, np.float32([np.inf, -np.inf, np.nan, 1e30, -1e30])])
        ours = encode(fmt, torch.from_numpy(x), saturate=False).numpy()
    else:  # FP6/FP4 always saturate, as the references do
        x = np.concatenate([x, np.float32([np.inf, -np.inf, 1e30])])
        ours = encode(fmt, torch.from_numpy(x)).numpy()
    ref = _ref_encode(fmt, x)
    assert np.array_equal(ours, ref), x[ours != ref][:10]


@pytest.mark.parametrize("fmt", [E4M3FN, E5M2], ids=str)
def test_saturating_fp8_fast_path_equals_the_table_path(fmt: ElementFormat) -> None:
    x = _probe_values(fmt, np.random.default_rng(1))
    x = np.concatenate([x, np.float32([465.0, 61440.0, 1e6, -1e6, np.inf, -np.inf])])
    t = torch.from_numpy(x)
    table = _encode_table(fmt, t, torch.isnan(t), saturate=True)
    assert torch.equal(encode(fmt, t), table)
    if fmt is E4M3FN:  # torch's own E4M3 cast saturates too
        assert torch.equal(table, t.to(torch.float8_e4m3fn).view(torch.uint8))


def test_e8m0_rounds_to_nearest_power_of_two_with_ties_up_like_ml_dtypes_and_torch() -> None:
    exps = np.arange(-126, 127)
    x = np.concatenate([2.0**exps * 1.5, 2.0**exps * 1.4, 2.0**exps * 1.6, 2.0**exps]).astype(np.float32)
    ours = encode(E8M0, torch.from_numpy(x))
    assert np.array_equal(ours.numpy(), _ref_encode(E8M0, x))
    assert torch.equal(ours, torch.from_numpy(x).to(torch.float8_e8m0fnu).view(torch.uint8))
    assert encode(E8M0, torch.tensor([1.5, 3.0])).tolist() == [128, 129]  # en_dtypes would floor: 127, 128


def test_e8m0_has_no_zero_or_negative_and_saturates_at_2_pow_127() -> None:
    codes = encode(E8M0, torch.tensor([0.0, -1.0, float("nan"), 1e39, 2.0**-130]))
    assert codes.tolist() == [0xFF, 0xFF, 0xFF, 0xFE, 0x00]


def test_mx_int8_is_two_complement_times_2_pow_minus_6_with_symmetric_clamp() -> None:
    values = decode(INT8, torch.arange(256))
    expected = torch.arange(256, dtype=torch.uint8).view(torch.int8).float() / 64
    assert torch.equal(values, expected)
    x = torch.tensor([1.984375, 2.5, -2.0, -5.0, 0.5 / 64, 1.5 / 64, -0.5 / 64, 2.5 / 64])
    assert encode(INT8, x).view(torch.int8).tolist() == [127, 127, -127, -127, 0, 2, 0, 2]


def test_hif8_overflows_at_40960_unless_saturating() -> None:
    x = torch.tensor([32768.0, 40959.0, 40960.0, -40960.0, float("inf")])
    assert encode(HIF8, x, saturate=False).tolist() == [0x6E, 0x6E, 0x6F, 0xEF, 0x6F]
    assert encode(HIF8, x).tolist() == [0x6E, 0x6E, 0x6E, 0xEE, 0x6E]


def test_hif8_rounds_ties_away_from_zero_and_has_one_zero() -> None:
    # 1.0625 lies halfway between 1.0 and 1.125 (E = 0 has 3 mantissa bits).
    x = torch.tensor([1.0625, -1.0625, 2.0**-23, -(2.0**-24), 0.0, -0.0])
    assert round_to(HIF8, x).tolist() == [1.125, -1.125, 2.0**-22, 0.0, 0.0, 0.0]
    assert encode(HIF8, torch.tensor([-0.0, -(2.0**-24)])).tolist() == [0, 0]


def test_hif8_field_widths_follow_the_dot_prefix() -> None:
    values = decode(HIF8, torch.arange(128))
    assert values[0x08].item() == 1.0 and values[0x0F].item() == 1.875  # dot 0001: E=0, 3 mantissa bits
    assert values[0x18].item() == 0.5  # dot 001: E=-1
    assert values[0x28].item() == 8.0  # dot 01: |E| = 2 + 1
    assert values[0x4C].item() == 128.0  # dot 10: |E| = 4 + 3
    assert values[0x6E].item() == 32768.0 and math.isinf(values[0x6F].item())
    assert values[0x7E].item() == 2.0**-15 and values[0x01].item() == 2.0**-22


def test_negative_values_that_round_to_zero_keep_the_sign_where_the_format_has_minus_zero() -> None:
    assert encode(E4M3FN, torch.tensor([-1e-9])).item() == 0x80
    assert encode(E2M1, torch.tensor([-0.1])).item() == 0x8


@pytest.mark.parametrize("fmt", [E2M3, E3M2, E2M1, INT8], ids=str)
def test_encoding_nan_into_a_format_without_nan_is_an_error(fmt: ElementFormat) -> None:
    with pytest.raises(FormatError, match="NaN"):
        encode(fmt, torch.tensor([1.0, float("nan")]))


def test_unknown_element_name_is_a_format_error_listing_known_names() -> None:
    with pytest.raises(FormatError, match="e4m3fn"):
        element_format("e9m9")
    assert element_format("UE8M0") is E8M0


def test_derived_limits_match_the_specifications() -> None:
    limits = {f.name: (f.max, f.min_positive) for f in ELEMENT_FORMATS.values()}
    assert limits["e4m3fn"] == (448.0, 2.0**-9)
    assert limits["e5m2"] == (57344.0, 2.0**-16)
    assert limits["e2m3"] == (7.5, 0.125)
    assert limits["e3m2"] == (28.0, 0.0625)
    assert limits["e2m1"] == (6.0, 0.5)
    assert limits["int8"] == (127 / 64, 1 / 64)
    assert limits["e8m0"] == (2.0**127, 2.0**-127)
    assert limits["hif8"] == (32768.0, 2.0**-22)
    assert [f.emax for f in (E4M3FN, E5M2, E2M3, E3M2, E2M1, INT8)] == [8, 15, 2, 4, 2, 0]
