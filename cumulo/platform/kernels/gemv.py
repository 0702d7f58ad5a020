"""Skinny bf16 and fp32 matmuls on the CPU (decode rows): the ctypes binding of gemv.cpp and its torch-facing
calls.

`bf16_linear(x, weight, bias)` (and `f32_linear` for fp32) answers for CPU tensors of its dtype with at most
MAX_ROWS rows of x and returns None otherwise, so callers fall back to `F.linear` (which stays the better choice
for prefill, where oneDNN's GEMM is compute-bound and uses the CPU's matrix units). `available()` says whether the kernel built here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cumulo.platform.kernels.abi import Kernels, Op
from cumulo.platform.kernels.build import KernelLibrary, cpu_features, requires_avx2

SOURCE = Path(__file__).with_name("gemv.cpp")
# Above this many rows the matmul is compute-bound and torch's GEMM wins; at 16 rows the kernel still measured
# faster in bf16 and fp32 (docs/benchmarks.md, "Figures behind the code's constants").
MAX_ROWS = 16
DTYPES = (torch.bfloat16, torch.float32)

_kernel = KernelLibrary(
    SOURCE, "CPU bf16 matmul kernel", ["cumulo_bf16_linear", "cumulo_f32_linear"], requires=requires_avx2
)


def library() -> Kernels | None:
    """The built kernel, or None (with one warning) when it cannot be built or loaded here."""
    return _kernel.get()


def available() -> bool:
    return library() is not None


def uses_avx512_bf16() -> bool:
    """Whether the kernel runs its AVX512-BF16 path here (else AVX2 with exact bf16 -> fp32 widening)."""
    features = cpu_features()
    return library() is not None and features.avx512 and features.avx512_bf16


def _checked(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernel of `dtype` takes x [M, K] and weight [N, K] (raises if they do not multiply)."""
    if (
        x.dim() != 2
        or x.shape[0] > MAX_ROWS
        or x.dtype != dtype
        or weight.dtype != dtype
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or weight.stride(1) != 1
    ):
        return False
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    return True


def _args(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, threads: int, path: int
) -> dict:
    """The kernel's arguments for x [M, K] @ weight [N, K]^T (+ bias) into y, rows of x and weight contiguous."""
    args = dict(x=x, M=x.shape[0], K=x.shape[1], xs=x.stride(0), w=weight, N=weight.shape[0], ws=weight.stride(0),
                bias=bias, y=y, threads=threads, path=path)  # fmt: skip
    if x.dtype == torch.bfloat16:
        args["y_fp32"] = y.dtype == torch.float32
    return args


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, out_dtype: torch.dtype,
    avx2_only: bool,
) -> torch.Tensor | None:  # fmt: skip
    """The kernel of `dtype` on x and weight (None where it does not apply): shared by the two entry points."""
    lib = library()
    if lib is None or not _checked(x, weight, dtype):
        return None
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        bias = bias.to(dtype).contiguous()
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=out_dtype)
    kernel = lib.cumulo_bf16_linear if dtype == torch.bfloat16 else lib.cumulo_f32_linear
    kernel.call(_args(x, weight, bias, y, torch.get_num_threads(), 0 if avx2_only else -1))
    return y


def bf16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    avx2_only: bool = False,
) -> torch.Tensor | None:
    """x [M, K] @ weight[N, K]^T (+ bias) in bf16 with fp32 accumulation; None when this kernel does not apply
    (not bf16, not CPU, more than MAX_ROWS rows, column-major weight, or no kernel here).
    `out_dtype=torch.float32` returns the fp32 sums unrounded (logits); `avx2_only` forces the fallback path."""
    return _linear(x, weight, bias, torch.bfloat16, out_dtype, avx2_only)


bf16_linear.fp32_out = True  # type: ignore[attr-defined]  # DenseLinear.fp32_logits may ask for fp32 outputs


def f32_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    avx2_only: bool = False,
) -> torch.Tensor | None:
    """x [M, K] @ weight[N, K]^T (+ bias) in fp32; None when this kernel does not apply (as `bf16_linear`)."""
    return _linear(x, weight, bias, torch.float32, torch.float32, avx2_only)


def graph_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> Op | None:
    """The recorded form of `bf16_linear` / `f32_linear` (x, weight, bias) into y for a decode graph
    (cumulo.platform.kernels.graph), or None where the kernel would not take them."""
    lib = library()
    if lib is None or not _checked(x, weight, x.dtype) or x.dtype not in DTYPES or x.stride(1) != 1:
        return None
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return None
    kernel = lib.cumulo_bf16_linear if x.dtype == torch.bfloat16 else lib.cumulo_f32_linear
    return kernel.op(**_args(x, weight, bias, y, torch.get_num_threads(), -1))


bf16_linear.graph_op = graph_op  # type: ignore[attr-defined]  # DenseLinear.graph_op records through them
f32_linear.graph_op = graph_op  # type: ignore[attr-defined]
