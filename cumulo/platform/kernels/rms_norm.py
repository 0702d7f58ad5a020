"""RMSNorm on the CPU in one call: the ctypes binding of rms_norm.cpp and its torch-facing function.

`rms_norm(x, weight, eps, offset)` answers for contiguous fp32 or bf16 CPU tensors (x and weight of one dtype)
and returns None otherwise, so `RMSNorm` falls back to torch. `offset` is added to the weight in fp32
(Gemma's x * (1 + w)).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cumulo.platform.kernels.abi import Kernels
from cumulo.platform.kernels.build import KernelLibrary

SOURCE = Path(__file__).with_name("rms_norm.cpp")
DTYPES = (torch.float32, torch.bfloat16)


_kernel = KernelLibrary(SOURCE, "CPU RMSNorm kernel", ["cumulo_rms_norm", "cumulo_add_rms_norm"])


def library() -> Kernels | None:
    """The built kernel, or None (with one warning) when it cannot be built or loaded here."""
    return _kernel.get()


def available() -> bool:
    return library() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor | None:
    """x [..., dim] normalised over its last dimension and scaled by (weight + offset); None if not taken."""
    lib = library()
    if (
        lib is None
        or x.dtype not in DTYPES
        or weight.dtype != x.dtype
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or not x.is_contiguous()
        or not weight.is_contiguous()
        or weight.shape != x.shape[-1:]
    ):
        return None
    y = torch.empty_like(x)
    lib.cumulo_rms_norm.call(args(x, weight, y, eps, offset, torch.get_num_threads()))
    return y


def args(
    x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, eps: float, offset: float, threads: int
) -> dict:
    """cumulo_rms_norm's arguments: y = norm(x) * (weight + offset) over x's last dimension."""
    dim = x.shape[-1]
    return dict(x=x, w=weight, y=y, rows=x.numel() // max(dim, 1), dim=dim, eps=eps, offset=offset,
                bf16=x.dtype == torch.bfloat16, threads=threads)  # fmt: skip
