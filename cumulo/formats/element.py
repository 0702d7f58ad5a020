"""Element number formats described as data: one frozen `ElementFormat` per type, and the value of every code.

Following gfloat's idea (graphcore-research/gfloat), a format is a small record of bit widths, bias and special
values; `code_value(fmt, code)` derives the real value of any code from that record alone, and the vectorised
codecs in `cumulo.formats.codec` are built from the table of those values. Sources:

- FP8 E4M3 (FN) and E5M2: OCP 8-bit Floating Point Specification (OFP8) rev. 1.0. E4M3 has no infinities and one
  NaN per sign (S.1111.111), max 448; E5M2 follows IEEE 754 (Inf = S.11111.00), max 57344.
- FP6 E2M3, FP6 E3M2, FP4 E2M1, MX INT8 and the E8M0 scale: OCP Microscaling Formats (MX) Specification v1.0,
  section 5. FP6/FP4 have no Inf or NaN; MX INT8 is two's complement with an implicit scale of 2^-6; E8M0 is an
  unsigned exponent with bias 127, no zero, and 0xFF = NaN. DeepSeek calls the same scale type UE8M0.
- HiF8: "Ascend HiFloat8 Format for Deep Learning", arXiv 2409.16626. Sign, a prefix-coded dot field giving the
  exponent width, a sign-magnitude exponent with an implicit leading 1, then the mantissa; see `_hif8_value`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from cumulo.errors import FormatError


class Kind(StrEnum):
    FLOAT = "float"  # sign | exponent | mantissa, IEEE-style subnormals
    INT = "int"  # two's complement integer times 2**-scale_exponent (MX INT8)
    EXPONENT = "exponent"  # unsigned pure exponent (E8M0)
    HIF8 = "hif8"  # Huawei's tapered float with a prefix-coded dot field


class Specials(StrEnum):
    NONE = "none"  # every code is a finite number (FP6, FP4, INT8)
    IEEE = "ieee"  # all-ones exponent: Inf when the mantissa is 0, else NaN (E5M2)
    FN = "fn"  # "finite, NaN": only the all-ones code (per sign) is NaN, no Inf (E4M3FN)
    E8M0 = "e8m0"  # 0xFF is NaN
    HIF8 = "hif8"  # 0x80 is NaN, 0x6F/0xEF are +-Inf


class Rounding(StrEnum):
    HALF_EVEN = "half_even"  # OCP and IEEE default
    HALF_AWAY = "half_away"  # HiF8 (the paper's TA rounding)
    HALF_UP = "half_up"  # E8M0 ties go to the larger power of two, as ml_dtypes and torch do


@dataclass(frozen=True, slots=True)
class ElementFormat:
    """One element type. `max`, `min_normal` and the other derived numbers come from `code_value`."""

    name: str
    bits: int
    exponent_bits: int
    mantissa_bits: int
    bias: int
    kind: Kind = Kind.FLOAT
    signed: bool = True
    specials: Specials = Specials.NONE
    rounding: Rounding = Rounding.HALF_EVEN
    scale_exponent: int = 0  # INT kind: value = int * 2**-scale_exponent
    negative_zero: bool = True  # a distinct -0 code exists (not in HiF8, INT8 or E8M0)

    @property
    def num_codes(self) -> int:
        return 1 << self.bits

    @property
    def max(self) -> float:
        return max(v for v in all_values(self) if math.isfinite(v))

    @property
    def min_positive(self) -> float:
        return min(v for v in all_values(self) if math.isfinite(v) and v > 0)

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two not above `max` (OCP MX's emax_elem; 0 for INT8)."""
        return math.floor(math.log2(self.max))

    def __str__(self) -> str:
        return self.name


E4M3FN = ElementFormat("e4m3fn", 8, 4, 3, bias=7, specials=Specials.FN)
E5M2 = ElementFormat("e5m2", 8, 5, 2, bias=15, specials=Specials.IEEE)
E2M3 = ElementFormat("e2m3", 6, 2, 3, bias=1)
E3M2 = ElementFormat("e3m2", 6, 3, 2, bias=3)
E2M1 = ElementFormat("e2m1", 4, 2, 1, bias=1)
INT8 = ElementFormat("int8", 8, 0, 7, bias=0, kind=Kind.INT, scale_exponent=6, negative_zero=False)
E8M0 = ElementFormat(
    "e8m0",
    8,
    8,
    0,
    bias=127,
    kind=Kind.EXPONENT,
    signed=False,
    specials=Specials.E8M0,
    rounding=Rounding.HALF_UP,
    negative_zero=False,
)
HIF8 = ElementFormat(
    "hif8",
    8,
    0,
    0,
    bias=0,
    kind=Kind.HIF8,
    specials=Specials.HIF8,
    rounding=Rounding.HALF_AWAY,
    negative_zero=False,
)

ELEMENT_FORMATS: dict[str, ElementFormat] = {
    f.name: f for f in (E4M3FN, E5M2, E2M3, E3M2, E2M1, INT8, E8M0, HIF8)
}
# Other names the field uses for the same types.
_ALIASES = {
    "e4m3": "e4m3fn",
    "fp8": "e4m3fn",
    "fp6": "e2m3",
    "fp4": "e2m1",
    "ue8m0": "e8m0",
    "mxint8": "int8",
}


def element_format(name: str) -> ElementFormat:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in ELEMENT_FORMATS:
        known = ", ".join(sorted(ELEMENT_FORMATS))
        raise FormatError(f"unknown element format {name!r}; known: {known}")
    return ELEMENT_FORMATS[key]


def code_value(fmt: ElementFormat, code: int) -> float:
    """The real value of one code, straight from the format's definition (NaN and +-inf included)."""
    if not 0 <= code < fmt.num_codes:
        raise FormatError(f"code {code} out of range for {fmt.name}")
    if fmt.kind is Kind.HIF8:
        return _hif8_value(code)
    if fmt.kind is Kind.EXPONENT:
        return math.nan if code == 0xFF else 2.0 ** (code - fmt.bias)
    if fmt.kind is Kind.INT:
        signed = code - (1 << fmt.bits) if code >> (fmt.bits - 1) else code
        return signed * 2.0**-fmt.scale_exponent
    return _float_value(fmt, code)


def _float_value(fmt: ElementFormat, code: int) -> float:
    sign = -1.0 if (code >> (fmt.bits - 1)) & 1 else 1.0
    exp = (code >> fmt.mantissa_bits) & ((1 << fmt.exponent_bits) - 1)
    man = code & ((1 << fmt.mantissa_bits) - 1)
    all_ones_exp = exp == (1 << fmt.exponent_bits) - 1
    if fmt.specials is Specials.IEEE and all_ones_exp:
        return sign * math.inf if man == 0 else math.nan
    if fmt.specials is Specials.FN and all_ones_exp and man == (1 << fmt.mantissa_bits) - 1:
        return math.nan
    if exp == 0:  # subnormal: 0.m * 2**(1 - bias)
        return sign * man * 2.0 ** (1 - fmt.bias - fmt.mantissa_bits)
    return sign * (1 + man * 2.0**-fmt.mantissa_bits) * 2.0 ** (exp - fmt.bias)


# HiF8 dot field, read from the 7 bits after the sign: (prefix, prefix length, dot value D).
# D is the stored exponent width; D = 0 means exponent 0; the all-zero prefix is the denormal mode.
_HIF8_DOTS = ((0b11, 2, 4), (0b10, 2, 3), (0b01, 2, 2), (0b001, 3, 1), (0b0001, 4, 0))


def _hif8_value(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    body = code & 0x7F
    if code == 0x80:
        return math.nan
    if body == 0x6F:
        return sign * math.inf
    for prefix, plen, dot in _HIF8_DOTS:
        if body >> (7 - plen) == prefix:
            rest_bits = 7 - plen
            rest = body & ((1 << rest_bits) - 1)
            man_bits = rest_bits - dot
            man = rest & ((1 << man_bits) - 1)
            if dot == 0:
                exponent = 0
            else:
                # Sign-magnitude exponent; the magnitude's leading 1 is implicit: |E| = 2**(D-1) + stored.
                field = rest >> man_bits
                e_sign = -1 if field >> (dot - 1) else 1
                magnitude = (1 << (dot - 1)) + (field & ((1 << (dot - 1)) - 1))
                exponent = e_sign * magnitude
            return sign * (1 + man * 2.0**-man_bits) * 2.0**exponent
    # Prefix 0000: denormal mode, value 2**(M - 23) for the 3-bit M = 1..7; M = 0 is zero.
    man = body & 0x7
    return 0.0 if man == 0 else sign * 2.0 ** (man - 23)


def all_values(fmt: ElementFormat) -> list[float]:
    """Values of codes 0 .. 2**bits - 1, in code order (computed once per format: `max` reads them on every
    encode, and a `setdefault(name, [...])` would rebuild the list each time just to throw it away)."""
    values = _VALUES_CACHE.get(fmt.name)
    if values is None:
        values = _VALUES_CACHE[fmt.name] = [code_value(fmt, c) for c in range(fmt.num_codes)]
    return values


_VALUES_CACHE: dict[str, list[float]] = {}
