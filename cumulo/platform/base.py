"""The `Platform` interface: everything core code may ask of a device kind, so that it never names one.

One subclass per device kind (cpu, cuda, npu, xpu, mps, mlu, musa) answers for its own vendor library;
engine, models and formats receive a `Platform` and use only what is declared here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

# A fused attention entry point a platform may offer; the engine falls back to its own when there is none.
AttentionFn = Callable[..., torch.Tensor]
NormFn = Callable[..., torch.Tensor | None]
RopeCacheFn = Callable[..., torch.Tensor | None]
# (x [M, K], weight [N, K], bias [N] or None) -> x W^T + b, or None when the kernel does not take this input.
LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None]


class Platform:
    """One device of one kind. `index` is None for kinds without numbered devices (cpu, mps)."""

    name: ClassVar[str]  # "cpu", "cuda", ... also the torch device type
    dist_backend: ClassVar[str]  # torch.distributed backend for collectives across devices of this kind
    numbered: ClassVar[bool] = True  # whether device strings carry an index ("cuda:1")
    is_accelerator: ClassVar[bool] = True
    supports_graph_capture: ClassVar[bool] = False

    def __init__(self, index: int | None = None) -> None:
        self.index = (index or 0) if self.numbered else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device!r})"

    @property
    def device(self) -> str:
        """The torch device string: "cpu", "cuda:0", "npu:1", "mps"."""
        return self.name if self.index is None else f"{self.name}:{self.index}"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @classmethod
    def is_available(cls) -> bool:
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls) -> str:
        """One line saying why `is_available()` is False, for error messages."""
        return f"this PyTorch sees no {cls.name} device"

    @classmethod
    def device_count(cls) -> int:
        return 1 if cls.is_available() else 0

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the memory this device computes from."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until all work queued on the device is done (for timing and hand-offs)."""

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        """Whether matmuls in `dtype` run natively fast here (a speed hint, not a capability check)."""
        return dtype in (torch.float32, torch.float16, torch.bfloat16)

    def paged_decode_attention(self, dtype: torch.dtype, head_dim: int) -> AttentionFn | None:
        """A fused decode-attention kernel over the paged KV cache for this dtype, or None for the portable
        path. Signature: (q [B, heads, dim], k_cache, v_cache, block_tables, context_lens, scale, window)."""
        return None

    def dense_linear(self, dtype: torch.dtype) -> LinearFn | None:
        """A faster matmul for few rows of x (decode) with dense `dtype` weights, or None for F.linear.
        Signature: (x [M, K], weight [N, K], bias [N] or None) -> Tensor, or None to let F.linear answer."""
        return None

    def rms_norm(self, dtype: torch.dtype) -> NormFn | None:
        """A one-call RMSNorm for `dtype` activations, or None for torch's. Signature:
        (x [..., dim], weight [dim], eps, offset) -> Tensor, or None to let torch answer."""
        return None

    def rope_and_cache(self, dtype: torch.dtype) -> RopeCacheFn | None:
        """A one-call rotary embedding + KV-cache write for `dtype`, or None for the torch path. Signature:
        (qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, heads, kv_heads) -> rotated q, or None."""
        return None

    def graph_recorder(self, dtype: torch.dtype) -> type | None:
        """A recorder for decode graphs in `dtype` (one step as a list of kernel calls replayed at once; see
        `cumulo.platform.kernels.graph.Graph` for the methods it offers), or None to run decode steps eagerly.
        A CUDA platform could answer with a recorder over torch.cuda.CUDAGraph."""
        return None

    def pick_dtype(self, wanted: torch.dtype) -> torch.dtype:
        """`wanted` if it is fast here, else float32 (e.g. bf16 on a CPU without native bf16 matmul)."""
        return wanted if self.supports_dtype(wanted) else torch.float32
