"""The weight formats Cumulo converts to, by name: element type, block shape and scale rule of each, as data.

A `Scheme` says how an [N, K] weight (N outputs, K inputs) becomes codes plus scales; `cumulo.formats.quantize`
does the work. Block shapes are (rows, cols) of one scale tile; 0 means the whole dimension, so (1, 0) is one
scale per output channel and (0, 0) one per tensor. Tails that a block does not divide are padded with zeros
for the scale computation only; codes are stored unpadded (FP4/FP6 rows round up to whole bytes).

Sources: DeepSeek-V3 inference/kernel.py and README_WEIGHTS.md (block FP8, 128 x 128 weight tiles, fp32
`weight_scale_inv`); DeepGEMM `ceil_to_ue8m0` (UE8M0 scales); OCP Microscaling Formats (MX) v1.0 (block 32 along
K, E8M0 scale, FLOOR rule); NVIDIA PTX / cuBLAS block scaling (RCEIL rule, NVFP4: E2M1, block 16, E4M3 scale,
fp32 tensor scale); HiFloat8, arXiv 2409.16626 (HiF8).
"""

from __future__ import annotations

from dataclasses import dataclass

from cumulo.errors import FormatError
from cumulo.formats.element import E2M1, E2M3, E3M2, E4M3FN, HIF8, INT8, ElementFormat


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str
    element: ElementFormat | None  # None: no quantisation (bf16)
    block: tuple[int, int]  # (rows, cols) sharing one scale; 0 = the whole dimension
    scale: str  # "fp32" | "ue8m0" | "e8m0-floor" | "e8m0-rceil" | "nvfp4" | "none"
    description: str
    scale_target: float = 0.0  # fp32 scales: the value a block's amax maps to

    @property
    def element_bits(self) -> int:
        return 16 if self.element is None else self.element.bits

    def bits_per_weight(self) -> float:
        """Storage bits per weight including scales, for a large matrix."""
        rows, cols = self.block
        scale_bits = {"fp32": 32, "ue8m0": 32, "e8m0-floor": 8, "e8m0-rceil": 8, "nvfp4": 8, "none": 0}
        per_block = rows * cols if rows and cols else 0
        return self.element_bits + (scale_bits[self.scale] / per_block if per_block else 0.0)


def _mx(name: str, element: ElementFormat, rule: str, label: str) -> Scheme:
    desc = f"OCP MX {label}: {element.name} elements, block 32 along K, E8M0 scale ({rule.upper()} rule)"
    return Scheme(name, element, (1, 32), f"e8m0-{rule}", desc)


_ALL = [
    Scheme("bf16", None, (0, 0), "none", "bfloat16 weights, no scales"),
    Scheme("fp8", E4M3FN, (1, 0), "fp32", "FP8 E4M3 with one fp32 scale per output channel", 448.0),
    Scheme("fp8-tensor", E4M3FN, (0, 0), "fp32", "FP8 E4M3 with one fp32 scale per tensor", 448.0),
    Scheme(
        "fp8-block",
        E4M3FN,
        (128, 128),
        "fp32",
        "DeepSeek-V3 block FP8: E4M3, fp32 scale max(amax, 1e-4)/448 per 128x128 tile",
        448.0,
    ),
    Scheme(
        "ue8m0-fp8",
        E4M3FN,
        (128, 128),
        "ue8m0",
        "DeepSeek-V3.1 block FP8: E4M3, power-of-two (UE8M0) scale per 128x128 tile, rounded up",
        448.0,
    ),
    Scheme(
        "nvfp4",
        E2M1,
        (1, 16),
        "nvfp4",
        "NVFP4: E2M1 elements, block 16 along K, E4M3 block scale times an fp32 tensor scale",
    ),
    # HiF8 has 3 mantissa bits for |x| in [1/8, 16): mapping a channel's amax to 15 keeps the bulk there.
    Scheme("hif8", HIF8, (1, 0), "fp32", "HiF8 with one fp32 scale per output channel (amax -> 15)", 15.0),
    Scheme("hif8-tensor", HIF8, (0, 0), "fp32", "HiF8 with one fp32 scale per tensor (amax -> 15)", 15.0),
]
for _rule in ("floor", "rceil"):
    _suffix = "" if _rule == "floor" else "-rceil"
    _ALL += [
        _mx(f"mxfp8{_suffix}", E4M3FN, _rule, "MXFP8"),
        _mx(f"mxfp6{_suffix}", E2M3, _rule, "MXFP6"),
        _mx(f"mxfp6-e3m2{_suffix}", E3M2, _rule, "MXFP6"),
        _mx(f"mxfp4{_suffix}", E2M1, _rule, "MXFP4"),
        _mx(f"mxint8{_suffix}", INT8, _rule, "MXINT8"),
    ]

SCHEMES: dict[str, Scheme] = {s.name: s for s in _ALL}


def get_scheme(name: str) -> Scheme:
    key = name.strip().lower()
    if key not in SCHEMES:
        raise FormatError(f"unknown weight format {name!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[key]
