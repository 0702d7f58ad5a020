"""Rotary embedding plus KV-cache write in one call on the CPU: the ctypes binding of rope_cache.cpp.

`rope_and_cache(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, heads, kv_heads)` rotates the q
heads into a new [T, heads, dim] tensor and writes the rotated k heads and the v heads of every token to its
cache slot; it returns None (nothing written) when it does not take the input, so the caller's torch path runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cumulo.platform.kernels.abi import Kernels
from cumulo.platform.kernels.build import KernelLibrary

SOURCE = Path(__file__).with_name("rope_cache.cpp")
DTYPES = (torch.float32, torch.bfloat16)
ERRORS = {1: "a position is outside the rotary table", 2: "a slot is outside the KV cache"}


_kernel = KernelLibrary(SOURCE, "CPU rotary + KV-cache kernel", ["cumulo_rope_cache"])


def library() -> Kernels | None:
    """The built kernel, or None (with one warning) when it cannot be built or loaded here."""
    return _kernel.get()


def available() -> bool:
    return library() is not None


def rope_and_cache(
    qkv: torch.Tensor,  # [T, (heads + 2 * kv_heads) * dim], rows contiguous
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor,  # [max_positions, dim / 2] fp32
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [kv_heads, num_blocks, block_size, dim], the model's dtype
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
    heads: int,
    kv_heads: int,
) -> torch.Tensor | None:
    lib = library()
    dtype = qkv.dtype
    if (
        lib is None
        or dtype not in DTYPES
        or k_cache.dtype != dtype
        or v_cache.dtype != dtype
        or qkv.device.type != "cpu"
        or qkv.dim() != 2
        or qkv.stride(1) != 1
        or not (k_cache.is_contiguous() and v_cache.is_contiguous())
        or k_cache.shape != v_cache.shape
        or positions.dtype != torch.int64
        or slot_mapping.dtype != torch.int64
        or not (positions.is_contiguous() and slot_mapping.is_contiguous())
        or cos.dtype != torch.float32
        or not (cos.is_contiguous() and sin.is_contiguous())
    ):
        return None
    n, width = qkv.shape
    dim = k_cache.shape[-1]
    if width != (heads + 2 * kv_heads) * dim or k_cache.shape[0] != kv_heads or cos.shape[1] * 2 != dim:
        return None
    if positions.shape != (n,) or slot_mapping.shape != (n,):
        return None
    q = torch.empty((n, heads, dim), dtype=dtype)
    code = lib.cumulo_rope_cache.call(
        args(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, q, heads, kv_heads)
    )
    if code:
        raise ValueError(ERRORS.get(code, f"kernel error {code}"))
    return q


def args(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor, q: torch.Tensor, heads: int, kv_heads: int,
) -> dict:  # fmt: skip
    """cumulo_rope_cache's arguments, for tensors `rope_and_cache` has checked (q: [T, heads, dim], written)."""
    return dict(
        qkv=qkv, T=qkv.shape[0], ld=qkv.stride(0), heads=heads, kv_heads=kv_heads, dim=k_cache.shape[-1],
        pos=positions, cos=cos, sin=sin, max_pos=cos.shape[0], k_cache=k_cache, v_cache=v_cache,
        cache_hs=k_cache.stride(0), slots=k_cache.shape[1] * k_cache.shape[2], slot_mapping=slot_mapping, q_out=q,
        bf16=qkv.dtype == torch.bfloat16,
    )  # fmt: skip
