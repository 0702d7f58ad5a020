"""Skinny bf16 matmul on the CPU (decode rows): the ctypes binding of gemv.cpp and its torch-facing call.

`bf16_linear(x, weight, bias)` answers for bf16 CPU tensors with at most MAX_ROWS rows of x and returns None
otherwise, so callers fall back to `F.linear` (which stays the better choice for prefill, where oneDNN's GEMM
is compute-bound and uses the CPU's matrix units). `available()` says whether the kernel built here.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from cumulo.platform.kernels.build import KernelLibrary, requires_avx2

SOURCE = Path(__file__).with_name("gemv.cpp")
# Above this many rows the matmul is compute-bound and torch's GEMM wins.
MAX_ROWS = 8

_P = ctypes.c_void_p
_I = ctypes.c_int64


def _configure(lib: ctypes.CDLL) -> None:
    lib.cumulo_bf16_linear.argtypes = [_P, _I, _I, _I, _P, _I, _I, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.cumulo_bf16_linear.restype = None
    lib.cumulo_bf16_linear_wide.restype = ctypes.c_int


_kernel = KernelLibrary(SOURCE, "CPU bf16 matmul kernel", _configure, requires=requires_avx2)


def library() -> ctypes.CDLL | None:
    """The built kernel, or None (with one warning) when it cannot be built or loaded here."""
    return _kernel.get()


def available() -> bool:
    return library() is not None


def uses_avx512_bf16() -> bool:
    """Whether the kernel runs its AVX512-BF16 path here (else AVX2 with exact bf16 -> fp32 widening)."""
    lib = library()
    return lib is not None and bool(lib.cumulo_bf16_linear_wide())


def bf16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    avx2_only: bool = False,
) -> torch.Tensor | None:
    """x [M, K] @ weight[N, K]^T (+ bias) in bf16 with fp32 accumulation; None when this kernel does not apply
    (not bf16, not CPU, more than MAX_ROWS rows, or no kernel here). `out_dtype=torch.float32` returns the fp32
    sums unrounded (logits); `avx2_only` forces the fallback path."""
    lib = library()
    if (
        lib is None
        or x.dim() != 2
        or x.shape[0] > MAX_ROWS
        or x.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
    ):
        return None
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        return None
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        bias = bias.to(torch.bfloat16).contiguous()
    fp32_out = out_dtype == torch.float32
    y = torch.empty((m, n), dtype=torch.float32 if fp32_out else torch.bfloat16)
    lib.cumulo_bf16_linear(
        x.data_ptr(), m, k, x.stride(0), weight.data_ptr(), n, weight.stride(0),
        None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads(), 0 if avx2_only else -1, fp32_out,
    )  # fmt: skip
    return y


bf16_linear.fp32_out = True  # type: ignore[attr-defined]  # DenseLinear.fp32_logits may ask for fp32 outputs


def graph_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor
) -> tuple[int, list[int]] | None:
    """The recorded form of `bf16_linear(x, weight, bias)` into y (cumulo.platform.kernels.graph), or None."""
    lib = library()
    if (
        lib is None
        or x.shape[0] > MAX_ROWS
        or x.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or weight.stride(1) != 1
        or x.stride(1) != 1
        or (bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()))
    ):
        return None
    fn = ctypes.cast(lib.cumulo_bf16_linear_op, ctypes.c_void_p).value or 0
    args = [x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), weight.data_ptr(), weight.shape[0], weight.stride(0),
            0 if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads(), 0]  # fmt: skip
    return fn, args


bf16_linear.graph_op = graph_op  # type: ignore[attr-defined]  # DenseLinear.graph_op records through it
