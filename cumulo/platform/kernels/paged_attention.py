"""Fused paged decode attention on the CPU: the ctypes binding of paged_attention.cpp and its torch-facing call.

One call per layer replaces the gather + matmul + mask + softmax + matmul of the PyTorch path; see the C++
source for the method. `available()` says whether it can run here (a compiler built it, CPU tensors, fp32 or
bf16); when it cannot, the engine keeps its PyTorch path, so a missing compiler costs speed, never a crash.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cumulo.platform.kernels.abi import Kernels
from cumulo.platform.kernels.build import KernelLibrary, load

SOURCE = Path(__file__).with_name("paged_attention.cpp")
DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 512

# Fewest (query, key) pairs worth a thread: more work than waking the pool costs (docs/benchmarks.md, "Figures behind the code's constants").
# Smaller calls (batch 1, short contexts) run on the calling thread.
MIN_PAIRS_PER_THREAD = 8192
ERRORS = {
    1: "a block table entry points outside the KV cache",
    2: "a context length exceeds its block table",
    3: "unsupported shape (head_dim must be a multiple of 8 and at most 512; heads a multiple of kv_heads)",
}


# `load` is looked up at each build, so a test can replace it.
_kernel = KernelLibrary(
    SOURCE, "CPU attention kernel", ["cumulo_paged_decode_attention"], fallback="using PyTorch attention",
    loader=lambda sources, _flags, name: load(sources, name=name),
)  # fmt: skip


def library() -> Kernels | None:
    """The built kernel, or None (with one warning) when it cannot be built or loaded here."""
    return _kernel.get()


def available(dtype: torch.dtype, device: torch.device | str, head_dim: int | None = None) -> bool:
    """Whether `paged_decode_attention` runs for this cache dtype and device (and head_dim, if given)."""
    if torch.device(device).type != "cpu" or dtype not in DTYPES:
        return False
    if head_dim is not None and (head_dim % 8 or head_dim > MAX_HEAD_DIM):
        return False
    return library() is not None


def args(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    out: torch.Tensor, window: int | None, threads: int, scale: float,
) -> dict:  # fmt: skip
    """The kernel's arguments (paged_attention.cpp declares them), for tensors already checked."""
    qs, ks, vs, kshape = q.stride(), k_cache.stride(), v_cache.stride(), k_cache.shape
    return dict(
        q=q, q_sb=qs[0], q_sh=qs[1], k=k_cache, v=v_cache, k_sh=ks[0], k_sb=ks[1], k_st=ks[2], v_sh=vs[0],
        v_sb=vs[1], v_st=vs[2], tables=tables, t_sb=tables.stride(0), max_blocks=tables.shape[1], lens=lens,
        out=out, batch=q.shape[0], heads=q.shape[1], kv_heads=kshape[0], dim=q.shape[2], num_blocks=kshape[1],
        block_size=kshape[2], window=window or 0, bf16=q.dtype == torch.bfloat16, threads=threads,
        min_pairs=MIN_PAIRS_PER_THREAD, scale=scale,
    )  # fmt: skip


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged K/V.

    q [batch, heads, head_dim] in the cache's dtype; k_cache, v_cache [kv_heads, num_blocks, block_size,
    head_dim]; block_tables [batch, max_blocks] int64 (entries past a sequence's blocks are never read);
    context_lens [batch] int64, keys 0..len-1 valid; with `window`, only keys at positions >= len - window.
    Head h reads kv head h // (heads // kv_heads). Returns [batch, heads, head_dim] in q's dtype.
    """
    # Called once per layer per step: the checks below are the cheap ones.
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU attention kernel is not available here; check available() first")
    dtype = q.dtype
    if k_cache.dtype != dtype or v_cache.dtype != dtype or dtype not in DTYPES:
        raise ValueError(f"q {dtype}, k {k_cache.dtype}, v {v_cache.dtype}: want one of fp32, bf16")
    if not (q.is_cpu and k_cache.is_cpu and v_cache.is_cpu and block_tables.is_cpu and context_lens.is_cpu):
        raise ValueError("paged_decode_attention runs on CPU tensors only")
    kshape = k_cache.shape
    if kshape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(kshape)} and v_cache {tuple(v_cache.shape)} differ")
    batch, heads, dim = q.shape
    qs, ks, vs = q.stride(), k_cache.stride(), v_cache.stride()
    # Any strides are read in place except along head_dim, which must be contiguous.
    if qs[2] != 1:
        q = q.contiguous()
        qs = q.stride()
    if ks[3] != 1 or vs[3] != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    tables = block_tables
    if tables.dtype != torch.int64 or tables.stride(1) != 1:
        tables = tables.to(torch.int64).contiguous()
    lens = context_lens
    if lens.dtype != torch.int64 or not lens.is_contiguous():
        lens = lens.to(torch.int64).contiguous()
    if tables.shape[0] != batch or lens.shape != (batch,):
        raise ValueError(
            f"block_tables {tuple(tables.shape)}, context_lens {tuple(lens.shape)}; batch {batch}"
        )
    out = torch.empty((batch, heads, dim), dtype=dtype)
    code = lib.cumulo_paged_decode_attention.call(
        args(q, k_cache, v_cache, tables, lens, out, window, torch.get_num_threads(), scale)
    )
    if code:
        raise ValueError(ERRORS.get(code, f"kernel error {code}"))
    return out
