"""Weight formats as the performance model sees them: bits per weight (scales included) and the compute class.

`compute` names the throughput figure a chip uses when it multiplies in this format natively (`fp8` ->
`fp8_tflops`); `None` means weight-only (GGUF blocks): always dequantized to the chip's compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from cumulo.errors import FormatError


@dataclass(frozen=True, slots=True)
class WeightFormat:
    name: str
    bits_per_weight: float  # storage cost including block scales
    compute: str | None  # "fp32" | "bf16" | "fp8" | "int8" | "fp4" | None
    description: str


def _f(name: str, bits: float, compute: str | None, description: str) -> WeightFormat:
    return WeightFormat(name, bits, compute, description)


FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        _f("fp32", 32, "fp32", "IEEE single"),
        _f("bf16", 16, "bf16", "bfloat16"),
        _f("fp16", 16, "bf16", "IEEE half (same tensor-core rate as bf16)"),
        _f("fp8", 8, "fp8", "E4M3 with a per-tensor or per-channel scale (negligible)"),
        _f(
            "ue8m0-fp8",
            8 + 8 / (128 * 128),
            "fp8",
            "E4M3, one power-of-two scale per 128x128 block (DeepSeek)",
        ),
        _f("fp8-block", 8 + 32 / (128 * 128), "fp8", "E4M3, one fp32 scale per 128x128 block (DeepSeek-V3)"),
        _f("hif8", 8, "fp8", "Huawei HiFloat8, tapered precision, no block scale"),
        _f("mxfp8", 8 + 8 / 32, "fp8", "OCP MX: E4M3 + E8M0 scale per 32"),
        _f("mxfp6", 6 + 8 / 32, "fp8", "OCP MX: E2M3/E3M2 + E8M0 scale per 32 (runs at the FP8 rate)"),
        _f("mxfp4", 4 + 8 / 32, "fp4", "OCP MX: E2M1 + E8M0 scale per 32"),
        _f("nvfp4", 4 + 8 / 16, "fp4", "NVIDIA: E2M1 + E4M3 scale per 16 (+ a per-tensor FP32)"),
        _f("mxint8", 8 + 8 / 32, "int8", "OCP MX: INT8 + E8M0 scale per 32"),
        _f("int8", 8, "int8", "INT8 with per-channel scales (negligible)"),
        _f("q8_0", 8.5, None, "GGUF: 32 x int8 + fp16 scale"),
        _f("q4_0", 4.5, None, "GGUF: 32 x int4 + fp16 scale"),
        _f("q4_1", 5.0, None, "GGUF: 32 x int4 + fp16 scale and min"),
    )
}

# Bytes per element when an emulated format is expanded into a compute dtype.
COMPUTE_DTYPE_BITS = {"fp32": 32, "bf16": 16, "fp8": 8, "int8": 8, "fp4": 4}


# Variants that cost the same as a base format here (scale rounding rule, per-tensor scale, element layout).
ALIASES = {
    "fp8-tensor": "fp8",
    "hif8-tensor": "hif8",
    "mxfp6-e3m2": "mxfp6",
    "e4m3": "fp8",
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
}


def get_format(name: str) -> WeightFormat:
    key = name.strip().lower().removesuffix("-rceil")
    fmt = FORMATS.get(ALIASES.get(key, key))
    if fmt is None:
        raise FormatError(f"unknown weight format '{name}'; known: {', '.join(FORMATS)}")
    return fmt
