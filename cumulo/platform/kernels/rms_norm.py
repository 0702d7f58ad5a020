"""RMSNorm on the CPU in one call: the ctypes binding of rms_norm.cpp and its torch-facing function.

`rms_norm(x, weight, eps, offset)` answers for contiguous fp32 or bf16 CPU tensors (x and weight of one dtype)
and returns None otherwise, so `RMSNorm` falls back to torch. `offset` is added to the weight in fp32
(Gemma's x * (1 + w)).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from cumulo.platform.kernels.build import KernelLibrary

SOURCE = Path(__file__).with_name("rms_norm.cpp")
DTYPES = (torch.float32, torch.bfloat16)


def _configure(lib: ctypes.CDLL) -> None:
    P, I = ctypes.c_void_p, ctypes.c_int64  # noqa: E741, N806
    lib.cumulo_rms_norm.argtypes = [P, P, P, I, I, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.cumulo_rms_norm.restype = None


_kernel = KernelLibrary(SOURCE, "CPU RMSNorm kernel", _configure)


def library() -> ctypes.CDLL | None:
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
    dim = x.shape[-1]
    lib.cumulo_rms_norm(
        x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // max(dim, 1), dim, eps, offset,
        x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    return y
