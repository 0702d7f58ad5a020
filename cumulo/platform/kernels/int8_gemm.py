"""The int8 GEMM of a 1x1 conv with its quantize and dequantize inside: the ctypes binding of int8_gemm.cpp.

`pack(codes)` lays an int8 weight [N, K] out for the kernel once; `int8_gemm(x, packed, scale, bias, ...)` is
y = relu6?(q(x) codes^T * step_row * scale + bias + residual) for fp32 rows x [M, K], where q(x) is the u8 code
[0, 255] of relu6(x) at the fixed step 6/255 (`relu6_input`) or the code of x at a per-row symmetric step
max|x| / 127, each rounded as torch rounds it. It returns None where the kernel does not apply (not built here, tensors not fp32 CPU rows), so
callers keep their torch path. `Int8Gemm` is the same with the weight's arguments bound once (`bind`), for the
per-frame calls of a vision net, whose Python cost per call is a few microseconds instead of tens. `available()`
says whether it built; `uses_vnni()` whether it runs vpdpbusd here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cumulo.platform.kernels.abi import Kernels
from cumulo.platform.kernels.build import KernelLibrary, cpu_features

SOURCE = Path(__file__).with_name("int8_gemm.cpp")
BLOCK_N, GROUP_K = 16, 4  # the packed layout: blocks of 16 output channels x 4 k (int8_gemm.cpp)

_kernel = KernelLibrary(SOURCE, "CPU int8 GEMM kernel", ["cumulo_int8_gemm"])


def library() -> Kernels | None:
    """The built kernel, or None (with one warning) when it cannot be built or loaded here."""
    return _kernel.get()


def available() -> bool:
    return library() is not None


def uses_vnni() -> bool:
    """Whether the kernel runs its AVX512-VNNI path here (else portable C++)."""
    features = cpu_features()
    return available() and features.avx512 and features.avx512_vnni


@dataclass(frozen=True)
class PackedInt8:
    """An int8 weight [N, K] as the kernel reads it: `blocks` [ceil(N/16), ceil(K/4), 16, 4] int8 (zero padded)
    and `sums` [N] int32, each output channel's code sum (what the +128 offset of signed activations adds)."""

    blocks: torch.Tensor
    sums: torch.Tensor
    out_features: int
    in_features: int


def pack(codes: torch.Tensor) -> PackedInt8:
    """int8 codes [N, K] -> the kernel's layout (a copy; the codes stay as they are)."""
    n, k = codes.shape
    padded = F.pad(codes.to(torch.int8), (0, -k % GROUP_K, 0, -n % BLOCK_N))  # [Np, Kp]
    blocks = padded.view(-1, BLOCK_N, padded.shape[1] // GROUP_K, GROUP_K).transpose(1, 2).contiguous()
    return PackedInt8(blocks, codes.to(torch.int32).sum(1, dtype=torch.int32).contiguous(), n, k)


def _rows(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1


def int8_gemm(
    x: torch.Tensor,
    packed: PackedInt8,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    relu6_input: bool,
    relu6_output: bool = False,
    residual: torch.Tensor | None = None,
    accumulators: bool = False,
    portable: bool = False,
) -> torch.Tensor | None:
    """x [M, K] fp32 rows -> [M, N] fp32 (see the module's docstring), or None where the kernel does not apply.
    `residual` [M, N] is added before the output's relu6; `accumulators` returns the int32 sums [M, N] instead
    (tests); `portable` forces the plain C++ path."""
    lib = library()
    m, k = x.shape if x.dim() == 2 else (0, -1)
    n = packed.out_features
    if (
        lib is None
        or not _rows(x)
        or k != packed.in_features
        or (residual is not None and (not _rows(residual) or residual.shape != (m, n)))
        or not all(t.dtype == torch.float32 and t.is_contiguous() and t.numel() == n for t in (scale, bias))
    ):
        return None
    y = torch.empty((m, n), dtype=torch.int32 if accumulators else torch.float32)
    code = lib.cumulo_int8_gemm.call(
        dict(x=x, M=m, K=k, xs=x.stride(0), w=packed.blocks, wsum=packed.sums, N=n, scale=scale, bias=bias,
             relu6_in=relu6_input, relu6_out=relu6_output, r=residual,
             rs=residual.stride(0) if residual is not None else 0, y=None if accumulators else y, ys=n, yw=0, yrs=0,
             acc=y if accumulators else None, threads=torch.get_num_threads(), path=0 if portable else -1)
    )  # fmt: skip
    return y if code == 0 else None


class Int8Gemm:
    """`int8_gemm` with one weight's arguments fixed (made by `bind`): `gemm(x)` for fp32 rows [M, K] or
    channels_last NCHW pixels [n, K, h, w] (answering [n, N, h, w], channels_last); None where x (or the
    residual, the output's shape and layout) is neither, so the caller falls back."""

    def __init__(self, lib: Kernels, packed: PackedInt8, scale: torch.Tensor, bias: torch.Tensor,
                 relu6_input: bool, relu6_output: bool) -> None:  # fmt: skip
        self.packed, self.scale, self.bias = packed, scale, bias
        self.relu6_output = relu6_output
        self.n, self.k = packed.out_features, packed.in_features
        self._call = lib.cumulo_int8_gemm.partial(
            w=packed.blocks, wsum=packed.sums, N=self.n, K=self.k, scale=scale, bias=bias, relu6_in=relu6_input,
            relu6_out=relu6_output, acc=None, path=-1,
        )  # fmt: skip

    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        pad: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor | None:
        """`pad` (left, right, top, bottom; pixels only): the output is the padded map, zero around the conv's
        output, as F.pad would make it in a pass of its own (the TF "SAME" padding of a strided conv next)."""
        if x.dtype != torch.float32 or x.shape[1] != self.k:
            return None
        if x.dim() == 2 and x.stride(1) == 1 and pad is None:
            m, xs = x.shape[0], x.stride(0)
            y = torch.empty((m, self.n))
            ok = residual is None or (residual.shape == y.shape and residual.stride(1) == 1)
            rs = residual.stride(0) if residual is not None else 0
        elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            if pad is not None:
                return self._padded(x, pad) if residual is None else None
            n, _, h, w = x.shape
            m, xs, rs = n * h * w, self.k, self.n  # pixels are rows of channels
            y = torch.empty((n, self.n, h, w), memory_format=torch.channels_last)
            ok = residual is None or (
                residual.shape == y.shape and residual.is_contiguous(memory_format=torch.channels_last)
            )
        else:
            return None
        if not ok or residual is not None and residual.dtype != torch.float32:
            return None
        # addresses as ints: the binding's quickest path (x, y and the residual live meanwhile)
        args = dict(x=x.data_ptr(), M=m, xs=xs, r=residual.data_ptr() if residual is not None else 0, rs=rs,
                    y=y.data_ptr(), ys=self.n, yw=0, yrs=0, threads=torch.get_num_threads())  # fmt: skip
        return y if self._call.call(args) == 0 else None

    def _padded(self, x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor | None:
        """[n, K, h, w] channels_last -> [n, N, h + top + bottom, w + left + right], the border zero: the kernel
        writes the inside image row by image row (yw, yrs), once per image."""
        left, right, top, bottom = pad
        n, _, h, w = x.shape
        hp, wp = h + top + bottom, w + left + right
        y = torch.empty((n, self.n, hp, wp), memory_format=torch.channels_last)
        for border in (y[:, :, :top], y[:, :, hp - bottom :], y[..., :left], y[..., wp - right :]):
            if border.numel():
                border.zero_()
        image, inside = h * w * self.k * 4, ((top * wp) + left) * self.n * 4  # bytes
        args = dict(x=x.data_ptr(), M=h * w, xs=self.k, r=0, rs=0, y=y.data_ptr() + inside, ys=self.n, yw=w,
                    yrs=wp * self.n, threads=torch.get_num_threads())  # fmt: skip
        for _ in range(n):  # one image at a time: between images the padded rows do not follow the pixels'
            if self._call.call(args) != 0:
                return None
            args["x"] += image
            args["y"] += hp * wp * self.n * 4
        return y


def bind(
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    relu6_input: bool,
    relu6_output: bool = False,
) -> Int8Gemm | None:
    """The kernel bound to this weight (codes [N, K] int8, scale and bias [N] fp32 contiguous, kept by
    reference: change them in place, or bind again after replacing them), or None where it does not pay: not
    built, or a CPU without AVX512-VNNI, where the portable C++ path measured 5-20x slower per layer than torch's
    oneDNN int8 GEMM with its eager passes (docs/edge.md), so callers keep that."""
    lib = library()
    n = codes.shape[0]
    if (
        lib is None
        or not uses_vnni()
        or codes.dim() != 2
        or codes.dtype != torch.int8
        or codes.device.type != "cpu"
    ):
        return None
    if not all(t.dtype == torch.float32 and t.is_contiguous() and t.numel() == n for t in (scale, bias)):
        return None
    return Int8Gemm(lib, pack(codes), scale, bias, relu6_input, relu6_output)
