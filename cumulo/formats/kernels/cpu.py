"""CPU fused kernels: the choice of kernel per format, over the format kernels' library (fp8.cpp, fp4.cpp and
lut.cpp in cumulo/platform/kernels/, built with g++ on first use and cached).

Why a plain shared library through ctypes rather than a torch extension: it compiles in about a second (no torch
headers), so the first test run on a fresh machine does not wait a minute for a build; the per-call overhead is
the same few microseconds. It links the same OpenMP runtime torch has loaded (libgomp.so.1), so one thread pool
serves both. Building and caching are the platform kernels' (`cumulo.platform.kernels.build`): torch's
extension directory ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), a name hashing sources, headers and
flags. Without g++, or on a CPU without AVX2/FMA/F16C, `find_kernel` still answers with these binders but they return None and `PackedLinear` takes
the reference path; a single warning says why.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cumulo.formats import codec
from cumulo.formats.element import E4M3FN, Kind
from cumulo.formats.kernels import BoundKernel, register_kernel
from cumulo.formats.packed import PackedWeight
from cumulo.formats.scales import e8m0_to_float
from cumulo.platform.kernels.abi import Kernels, Op
from cumulo.platform.kernels.build import SOURCE_DIR, KernelLibrary, cpu_features, requires_avx2

SOURCES = [SOURCE_DIR / "fp8.cpp", SOURCE_DIR / "fp4.cpp", SOURCE_DIR / "fp6.cpp", SOURCE_DIR / "lut.cpp"]
# The kernels take their AVX-512 paths where the CPU has them (tests turn this off to cover the AVX2 paths).
USE_AVX512 = True
# Above this many rows of x, dequantize once and let torch's GEMM do the compute-bound work. The fused kernels
# decode each weight row once per 4 rows of x. Against dequantize + fp32 sgemm they still win at 64 rows on
# SmolLM2's shapes, since dequantizing writes and rereads 4 bytes per weight (docs/benchmarks.md, "Figures behind the code's constants").
FUSED_MAX_ROWS = 64
# Against dequantize into bf16 + torch's bf16 GEMM (bf16 x, CPUs with AVX512-BF16; FP8 and MXFP4) they win over
# fewer rows: to 16; at 32 the two are even (docs/benchmarks.md, "Figures behind the code's constants").
FUSED_MAX_ROWS_BF16 = 16
BF16_DEQUANT_FAMILIES = ("fp8", "mxfp4")

# Threads per kernel call: torch's setting unless CUMULO_KERNEL_THREADS or set_kernel_threads says otherwise.
# On a machine shared with other busy processes one thread can beat two, because every call is a fork-join
# that waits for both threads to be scheduled (docs/formats.md, measurements).
_threads: int | None = (
    int(os.environ["CUMULO_KERNEL_THREADS"]) if os.environ.get("CUMULO_KERNEL_THREADS") else None
)


def set_kernel_threads(threads: int | None) -> None:
    """Fix the kernels' thread count (None: follow torch.get_num_threads())."""
    global _threads
    _threads = threads


def kernel_threads() -> int:
    return _threads or torch.get_num_threads()


KERNELS = [
    "cumulo_fp8_linear", "cumulo_fp8_dequant", "cumulo_table8_linear_bf16", "cumulo_table8_takes",
    "cumulo_mxfp4_linear", "cumulo_mxfp4_dequant", "cumulo_lut_linear",
    "cumulo_nvfp4_linear_bf16", "cumulo_mxfp6_linear_bf16", "cumulo_mxfp6_takes",
]  # fmt: skip
# Built and cached like the platform's kernels (cumulo.platform.kernels.build); each kernel's arguments are the
# ones its C source declares (cumulo.platform.kernels.abi), passed by name below.
_kernel = KernelLibrary(
    SOURCES,
    "fused CPU kernels",
    KERNELS,
    name="formats",
    requires=requires_avx2,
    fallback="using the reference path",
)


def library() -> Kernels | None:
    """The loaded kernels, or None (with one warning) when they cannot be built or run here."""
    return _kernel.get()


def _fp8_scales(w: PackedWeight) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int]:
    """(fp32 scales, E8M0 scales, rows per scale block, cols per scale block) in the kernel's terms."""
    n, k = w.shape
    br, bc = w.block
    assert w.scales is not None
    scales = w.scales.contiguous()
    if w.scheme.scale.startswith("e8m0"):
        return None, scales, br or n, bc or k
    return scales.to(torch.float32), None, br or n, bc or k


@functools.cache
def dequantizes_into_bf16() -> bool:
    """Whether this CPU runs the bf16 dequantizers (AVX512-BF16: where torch's bf16 GEMM is fast, too)."""
    features = cpu_features()
    return library() is not None and features.avx512 and features.avx512_bf16


def _bf16_dequant(dtype: torch.dtype, family: str | None) -> bool:
    """Whether x of `dtype` against weights of `family` ("fp8", "mxfp4"; None for the others) takes the bf16
    dequantize + bf16 GEMM path past the fused kernel's rows."""
    return (
        family in BF16_DEQUANT_FAMILIES and dtype == torch.bfloat16 and USE_AVX512 and dequantizes_into_bf16()
    )


def fused_max_rows(dtype: torch.dtype, family: str | None) -> int:
    """Most rows of x of `dtype` a fused kernel of `family` takes; more are dequantized for a GEMM, into bf16
    where `_bf16_dequant` says so (then from fewer rows)."""
    return FUSED_MAX_ROWS_BF16 if _bf16_dequant(dtype, family) else FUSED_MAX_ROWS


_scratch = threading.local()


def _dense_scratch(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """An [n, k] buffer for dequantized weights, reused by later calls on this thread (each engine steps on its
    own thread) and grown to the largest matrix seen: a fresh tensor per call cost more in page faults than
    dequantizing into it (docs/benchmarks.md, "Figures behind the code's constants")."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < n * k:
        buf = buffers[dtype] = torch.empty(n * k, dtype=dtype)
    return buf[: n * k].view(n, k)


Fused = Callable[[torch.Tensor, torch.Tensor], None]  # (x [M, K], y [M, N]) -> y written
Dequant = Callable[[torch.Tensor, bool], int]  # (out [N, K], into bf16) -> 0, or 1 where it cannot (bf16)


def _rows(x: torch.Tensor, y: torch.Tensor) -> dict:
    """The per-call arguments every fused kernel takes: rows of x in, rows of y out, the thread count."""
    return dict(x=x, M=x.shape[0], y=y, threads=kernel_threads())


def _call(
    x: torch.Tensor, n: int, fused: Fused, dequant: Dequant | None, family: str | None
) -> torch.Tensor | None:
    """Decode (few rows): the fused kernel, taking and giving bf16 or fp32 as x is. Prefill (many rows):
    dequantize once, then torch's GEMM, in bf16 for bf16 x where the kernels can write bf16 (else fp32);
    None (the reference path) for kernels without a C++ dequantizer."""
    if not x.is_cpu:
        return None
    if x.shape[0] > fused_max_rows(x.dtype, family):
        if dequant is None:
            return None
        if _bf16_dequant(x.dtype, family):
            dense = _dense_scratch(n, x.shape[1], torch.bfloat16)
            if dequant(dense, True) == 0:
                return F.linear(x, dense)
        xc = x.to(torch.float32).contiguous()
        dense = _dense_scratch(n, xc.shape[1], torch.float32)
        dequant(dense, False)
        return F.linear(xc, dense)
    xc = x.contiguous() if x.dtype == torch.bfloat16 else x.to(torch.float32).contiguous()
    y = torch.empty((xc.shape[0], n), dtype=xc.dtype)
    fused(xc, y)
    return y


def _graph_op(record: Callable[[torch.Tensor, torch.Tensor], Op], family: str | None) -> Callable:
    """A bound kernel's recorded form (cumulo.platform.kernels.graph): (x, y) -> the recorded call, or None, for
    the fused decode path only (contiguous x of at most fused_max_rows rows, y of x's dtype)."""

    def op(x: torch.Tensor, y: torch.Tensor) -> Op | None:
        if x.shape[0] > fused_max_rows(x.dtype, family) or not x.is_contiguous() or y.dtype != x.dtype:
            return None
        if x.dtype not in (torch.float32, torch.bfloat16):
            return None
        return record(x, y)

    return op


def bind_fp8(w: PackedWeight) -> BoundKernel | None:
    lib = library()
    n, k = w.shape
    f32, e8, bn, bk = _fp8_scales(w)
    if lib is None or w.device.type != "cpu" or (bk != k and bk % 16):
        return None
    weight = dict(K=k, codes=w.codes.contiguous(), N=n, scales_f32=f32, scales_e8m0=e8, bn=bn, bk=bk)
    linear = lib.cumulo_fp8_linear.partial(**weight)
    dequant_into = lib.cumulo_fp8_dequant.partial(**weight)

    def args(x: torch.Tensor, y: torch.Tensor) -> dict:
        return dict(_rows(x, y), wide_ok=USE_AVX512, bf16=x.dtype == torch.bfloat16)

    def dequant(out: torch.Tensor, bf16: bool) -> int:
        return dequant_into(out=out, threads=kernel_threads(), bf16=bf16)

    def run(x: torch.Tensor) -> torch.Tensor | None:
        return _call(x, n, lambda x, y: linear.call(args(x, y)), dequant, "fp8")

    run.graph_op = _graph_op(lambda x, y: linear.op(**args(x, y)), "fp8")  # type: ignore[attr-defined]
    return run


def bind_mxfp4(w: PackedWeight) -> BoundKernel | None:
    lib = library()
    n, k = w.shape
    if lib is None or w.device.type != "cpu" or k % 32:
        return None
    assert w.scales is not None
    weight = dict(K=k, codes=w.codes.contiguous(), N=n, scales=w.scales.contiguous())
    linear = lib.cumulo_mxfp4_linear.partial(**weight)
    dequant_into = lib.cumulo_mxfp4_dequant.partial(**weight)

    def args(x: torch.Tensor, y: torch.Tensor) -> dict:
        return dict(_rows(x, y), bf16=x.dtype == torch.bfloat16, wide_ok=USE_AVX512)

    def dequant(out: torch.Tensor, bf16: bool) -> int:
        return dequant_into(out=out, threads=kernel_threads(), bf16=bf16)

    def run(x: torch.Tensor) -> torch.Tensor | None:
        return _call(x, n, lambda x, y: linear.call(args(x, y)), dequant, "mxfp4")

    run.graph_op = _graph_op(lambda x, y: linear.op(**args(x, y)), "mxfp4")  # type: ignore[attr-defined]
    return run


def _bf16_table(lut: torch.Tensor, twos: bool) -> bool:
    """Whether an 8-bit element's 256-entry value table can be looked up by magnitude as exact bf16: sign-
    magnitude (code | 0x80 is the negative of code, NaN and zero codes aside) or, with `twos`, two's complement
    (code -c is the negative of code c), and every magnitude exact in bf16."""
    mags = lut[:128]
    negative = lut[256 - torch.arange(1, 128)] if twos else lut[129:]  # the codes of -1..-127 / of 0x81..0xFF
    return bool(torch.equal(negative, -mags[1:]) and torch.equal(mags.bfloat16().float(), mags))


def _decoded_kernel(lib: Kernels, w: PackedWeight, lut: torch.Tensor, scale_lut: torch.Tensor | None):
    """The bf16-x kernel of NVFP4 (fp4.cpp) or MXFP6 (fp6.cpp) bound to w's weights, or None where it does not
    run: another format, a CPU without AVX512-BF16 + VBMI, K not a multiple of 32, blocks other than the
    format's, or (MXFP6) a scale that would take a scaled value out of bf16's normal range."""
    n, k = w.shape
    scheme, elem = w.scheme, w.scheme.element
    features = cpu_features()
    if elem is None or k % 32 or not (features.avx512_bf16 and features.avx512_vbmi):
        return None
    assert w.scales is not None
    weight = dict(K=k, codes=w.codes.contiguous(), N=n, scales=w.scales.contiguous())
    if scheme.scale == "nvfp4" and elem.bits == 4 and tuple(w.block) == (1, 16):
        assert w.tensor_scale is not None and scale_lut is not None
        return lib.cumulo_nvfp4_linear_bf16.partial(
            **weight, scale_lut=scale_lut.contiguous(), tensor_scale=float(w.tensor_scale)
        )
    if scheme.scale.startswith("e8m0") and elem.bits == 6 and tuple(w.block) == (1, 32):
        values = lut[:64].contiguous()
        if not torch.equal(values.bfloat16().float(), values):
            return None
        if (
            lib.cumulo_mxfp6_takes(scales=weight["scales"], count=weight["scales"].numel(), values=values)
            != 1
        ):
            return None
        return lib.cumulo_mxfp6_linear_bf16.partial(**weight, values=values)
    return None


def bind_lut(w: PackedWeight) -> BoundKernel | None:
    """Any 8- or 4-bit element type through a value table (HiF8, MX INT8, NVFP4). Prefill uses the reference
    dequantize, as these formats have no C++ dequantizer."""
    lib = library()
    n, k = w.shape
    scheme = w.scheme
    br, bc = w.block
    bn, bk = br or n, bc or k
    elem = scheme.element
    if (
        lib is None
        or elem is None
        or elem.bits not in (4, 6, 8)
        or w.device.type != "cpu"
        or (bk != k and bk % 16)
    ):
        return None
    assert w.scales is not None
    lut = torch.nan_to_num(
        codec.decode(elem, torch.arange(256) % elem.num_codes), nan=0.0, posinf=0.0, neginf=0.0
    )
    codes = w.codes.contiguous()
    scale_f32 = scale_codes = scale_lut = None
    scale_mul = 1.0
    if scheme.scale.startswith("e8m0"):
        scale_codes, scale_lut = w.scales.contiguous(), e8m0_to_float(torch.arange(256, dtype=torch.uint8))
    elif scheme.scale == "nvfp4":
        assert w.tensor_scale is not None
        scale_codes, scale_lut = w.scales.contiguous(), codec.decode(E4M3FN, torch.arange(256))
        scale_mul = float(w.tensor_scale)
    else:
        scale_f32 = w.scales.to(torch.float32).contiguous()
    # 8-bit elements exact in bf16, sign-magnitude (HiF8) or two's complement (MX INT8), with fp32 or E8M0
    # scales also run through the FP8 kernel's bf16 path, their magnitudes looked up as exact bf16; the LUT
    # kernel answers where that path cannot.
    twos = elem.kind is Kind.INT
    table8 = elem.bits == 8 and scheme.scale != "nvfp4" and _bf16_table(lut, twos)
    mags = (lut[:128].abs() if twos else lut[:128]).contiguous() if table8 else None
    e8m0 = scale_codes if scheme.scale.startswith("e8m0") else None
    weight = dict(K=k, codes=codes, N=n, bn=bn, bk=bk)
    lut_linear = lib.cumulo_lut_linear.partial(
        **weight, bits=0 if elem.kind is Kind.INT else elem.bits,  # 0: MX INT8, decoded arithmetically
        lut=lut, scales_f32=scale_f32, scale_codes=scale_codes, scale_lut=scale_lut, scale_mul=scale_mul,
    )  # fmt: skip
    table_linear = None
    if mags is not None:
        table_linear = lib.cumulo_table8_linear_bf16.partial(
            **weight, scales_f32=scale_f32, scales_e8m0=e8m0, mags=mags, twos=twos
        )
    table_takes = table_linear is not None and lib.cumulo_table8_takes(K=k, bk=bk) == 1
    # NVFP4 and MXFP6 with bf16 x: their own bf16 kernels (fp4.cpp, fp6.cpp), where K and the blocks fit and,
    # for MXFP6, every scale keeps the scaled values normal bf16 (cumulo_mxfp6_takes).
    decoded_linear = _decoded_kernel(lib, w, lut, scale_lut)

    def lut_args(x: torch.Tensor, y: torch.Tensor) -> dict:
        return dict(_rows(x, y), bf16=x.dtype == torch.bfloat16, wide_ok=USE_AVX512)

    def fused(x: torch.Tensor, y: torch.Tensor) -> None:
        if decoded_linear is not None and x.dtype == torch.bfloat16 and USE_AVX512:
            if decoded_linear.call(_rows(x, y)) == 0:
                return
        if table_linear is not None and x.dtype == torch.bfloat16 and USE_AVX512:
            if table_linear.call(_rows(x, y)) == 0:
                return
        lut_linear.call(lut_args(x, y))

    def run(x: torch.Tensor) -> torch.Tensor | None:
        return _call(x, n, fused, None, None)

    def record(x: torch.Tensor, y: torch.Tensor) -> Op:
        if decoded_linear is not None and x.dtype == torch.bfloat16 and USE_AVX512:
            return decoded_linear.op(**_rows(x, y))
        if table_linear is not None and table_takes and x.dtype == torch.bfloat16 and USE_AVX512:
            return table_linear.op(**_rows(x, y))
        return lut_linear.op(**lut_args(x, y))

    run.graph_op = _graph_op(record, family=None)  # type: ignore[attr-defined]
    return run


FP8_FORMATS = ("fp8", "fp8-tensor", "fp8-block", "ue8m0-fp8", "mxfp8", "mxfp8-rceil")
MXFP4_FORMATS = ("mxfp4", "mxfp4-rceil")
for _name in FP8_FORMATS:
    register_kernel("cpu", _name)(bind_fp8)
for _name in MXFP4_FORMATS:
    register_kernel("cpu", _name)(bind_mxfp4)
LUT_FORMATS = (
    "hif8", "hif8-tensor", "mxint8", "mxint8-rceil", "nvfp4", "mxfp6", "mxfp6-rceil", "mxfp6-e3m2", "mxfp6-e3m2-rceil",
)  # fmt: skip
for _name in LUT_FORMATS:
    register_kernel("cpu", _name)(bind_lut)
