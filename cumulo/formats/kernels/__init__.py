"""Registry of fused dequantize-and-multiply kernels, keyed by (device type, weight format).

A kernel computes y = x @ W^T for x [M, K] and a `PackedWeight` W without materialising W in full precision.
It is registered as a binder: `binder(W)` does the per-weight work once (pointers, scale layout) and returns a
function of x, or None when it cannot take this weight; the bound function returns None for an x it cannot
take (wrong device, shape). `PackedLinear` binds once per device and falls back to the reference path
(`PackedWeight.dequantize` then `F.linear`) whenever there is no answer; so a Triton kernel for CUDA, or one for
another device type, plugs in with `register_kernel("cuda", "mxfp4")` and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cumulo.formats.packed import PackedWeight

BoundKernel = Callable[[torch.Tensor], "torch.Tensor | None"]
Kernel = Callable[["PackedWeight"], "BoundKernel | None"]

_KERNELS: dict[tuple[str, str], Kernel] = {}
_LOADED_BUILTINS = False


def register_kernel(device_type: str, format: str) -> Callable[[Kernel], Kernel]:
    def deco(fn: Kernel) -> Kernel:
        _KERNELS[(device_type, format)] = fn
        return fn

    return deco


def find_kernel(device_type: str, format: str) -> Kernel | None:
    global _LOADED_BUILTINS
    if not _LOADED_BUILTINS:
        _LOADED_BUILTINS = True
        from cumulo.formats.kernels import cpu  # noqa: F401  (registers the CPU kernels)
    return _KERNELS.get((device_type, format))


def registered() -> list[tuple[str, str]]:
    find_kernel("cpu", "")
    return sorted(_KERNELS)
