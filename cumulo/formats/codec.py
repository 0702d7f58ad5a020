"""Vectorised encode / decode / round for every `ElementFormat`, on any torch device.

Decoding is a lookup in the table of code values (`element.code_value`). Encoding rounds |x| to the nearest entry
of the sorted table of non-negative values with `torch.searchsorted` over the midpoints, then breaks exact ties
by the format's rule: half-to-even on the code (the mantissa's last bit) for the OCP types, half away from zero
for HiF8, half up for E8M0. This is exact for every input float32 can hold, needs no per-format arithmetic, and
is checked against ml_dtypes, en_dtypes and torch over every code (tests/formats/test_codec.py).

Overflow: with `saturate=True` (the default, what quantisation wants: OCP "satfinite") values beyond the largest
finite magnitude, infinities included, clamp to +-max. With `saturate=False` a value whose rounded magnitude
exceeds max becomes the format's overflow code: NaN for E4M3FN (as ml_dtypes does), Inf for E5M2 and HiF8
(HiF8: |x| >= 40960, per arXiv 2409.16626), NaN for E8M0. FP6, FP4 and INT8 have no such code and always
saturate (OCP MX v1.0 section 5.3). NaN inputs become the NaN code; formats without one raise `FormatError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cumulo.errors import FormatError
from cumulo.formats.element import ElementFormat, Kind, Rounding, Specials, all_values


@dataclass(frozen=True)
class _Tables:
    values: torch.Tensor  # float32 [num_codes], value of each code
    mids: torch.Tensor  # float32 [n], midpoints of consecutive non-negative values, the overflow one included
    codes: torch.Tensor  # int32 [n + 1], code of each sorted non-negative value; last = overflow code
    even: torch.Tensor  # bool [n + 1], whether that entry wins a half-to-even tie
    max: float


_TABLES: dict[tuple[str, str], _Tables] = {}


def _overflow_code(fmt: ElementFormat, max_code: int) -> int:
    if fmt.specials is Specials.FN:
        return max_code + 1  # S.1111.111 = NaN
    if fmt.specials is Specials.IEEE:
        return max_code + 1  # S.11111.00 = Inf
    if fmt.specials is Specials.HIF8:
        return 0x6F
    if fmt.specials is Specials.E8M0:
        return 0xFF
    return max_code  # no overflow code: saturate


def _notional_next(fmt: ElementFormat, top: float) -> float:
    """The value one step above max if the exponent range went on: where rounding overflows."""
    if fmt.kind is Kind.EXPONENT:
        return top * 2
    if fmt.kind is Kind.HIF8:
        return 1.5 * 2.0**15  # the 0x6F slot, 49152: |x| >= 40960 rounds to it (ties away)
    exponent = math.floor(math.log2(top))
    return top + 2.0 ** (exponent - fmt.mantissa_bits)


def _tables(fmt: ElementFormat, device: torch.device) -> _Tables:
    key = (fmt.name, str(device))
    if key in _TABLES:
        return _TABLES[key]
    values = all_values(fmt)
    sign_bit = 1 << (fmt.bits - 1) if fmt.signed else 0
    pos = sorted((v, c) for c, v in enumerate(values) if math.isfinite(v) and v >= 0 and not (c & sign_bit))
    top, max_code = pos[-1]
    over = _notional_next(fmt, top)
    vals = [v for v, _ in pos] + [over]
    codes = [c for _, c in pos] + [_overflow_code(fmt, max_code)]
    # The overflow entry's tie parity is that of the code it would have had (max_code + 1).
    even = [c % 2 == 0 for _, c in pos] + [(max_code + 1) % 2 == 0]
    mids = [(a + b) / 2 for a, b in zip(vals[:-1], vals[1:], strict=True)]
    tables = _Tables(
        values=torch.tensor(values, dtype=torch.float32, device=device),
        mids=torch.tensor(mids, dtype=torch.float32, device=device),
        codes=torch.tensor(codes, dtype=torch.int32, device=device),
        even=torch.tensor(even, dtype=torch.bool, device=device),
        max=top,
    )
    _TABLES[key] = tables
    return tables


# torch's own float8 dtypes decode exactly like our tables (tests check every code) and run natively.
_NATIVE = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def decode(fmt: ElementFormat, codes: torch.Tensor) -> torch.Tensor:
    """Codes (any integer dtype, one code per element, unpacked) -> float32 values on the same device."""
    if fmt.name in _NATIVE and codes.dtype == torch.uint8:
        return codes.view(_NATIVE[fmt.name]).to(torch.float32)
    tables = _tables(fmt, codes.device)
    return tables.values[codes.long() & (fmt.num_codes - 1)]


def encode(fmt: ElementFormat, x: torch.Tensor, *, saturate: bool = True) -> torch.Tensor:
    """Float values -> uint8 codes (one per element, unpacked), rounding per the format's rule."""
    x = x.to(torch.float32)
    nan = torch.isnan(x)
    any_nan = bool(nan.any())
    if fmt.specials is Specials.NONE and any_nan:
        raise FormatError(f"cannot encode NaN in {fmt.name}: the format has no NaN")
    if saturate and not any_nan and fmt.name in _NATIVE:
        # torch's float8 casts round half-to-even; after clamping to +-max they equal the table path
        # (tests/formats/test_codec.py checks both on every midpoint) and run several times faster.
        return x.clamp(-fmt.max, fmt.max).to(_NATIVE[fmt.name]).view(torch.uint8)
    return _encode_table(fmt, x, nan, saturate)


def _encode_table(fmt: ElementFormat, x: torch.Tensor, nan: torch.Tensor, saturate: bool) -> torch.Tensor:
    if fmt.kind is Kind.INT:
        q = torch.round(x * 2.0**fmt.scale_exponent).clamp(-127, 127)  # torch.round is half-to-even
        return q.to(torch.int16).bitwise_and(0xFF).to(torch.uint8)
    tables = _tables(fmt, x.device)
    mag = x.abs()
    if saturate or fmt.specials is Specials.NONE:
        mag = mag.clamp(max=tables.max)
    lo = torch.searchsorted(tables.mids, mag, right=False)  # ties resolve to the smaller value
    hi = torch.searchsorted(tables.mids, mag, right=True)  # ties resolve to the larger value
    if fmt.rounding is Rounding.HALF_EVEN:
        idx = torch.where(tables.even[lo], lo, hi)
    else:
        idx = hi
    code = tables.codes[idx]
    if fmt.signed:
        negative = torch.signbit(x) & ~nan
        if not fmt.negative_zero:
            negative &= code != 0
        code = torch.where(negative, code | (1 << (fmt.bits - 1)), code)
    else:  # E8M0: zero and negatives have no code
        code = torch.where(x <= 0, torch.full_like(code, 0xFF), code)
    if bool(nan.any()):
        code = torch.where(nan, torch.full_like(code, _nan_code(fmt)), code)
    return code.to(torch.uint8)


def _nan_code(fmt: ElementFormat) -> int:
    return {Specials.FN: 0x7F, Specials.IEEE: 0x7E, Specials.HIF8: 0x80, Specials.E8M0: 0xFF}[fmt.specials]


def round_to(fmt: ElementFormat, x: torch.Tensor, *, saturate: bool = True) -> torch.Tensor:
    """x rounded to the nearest value `fmt` can hold, as float32 (fake quantisation)."""
    return decode(fmt, encode(fmt, x, saturate=saturate))
