"""The CPU decode graph: a decode step recorded once as a list of C kernel calls, then replayed in one call.

A decode step of a small model is mostly overhead on a CPU: SmolLM2-135M runs some 300 Python-level module
calls, as many small torch operators and 150 ctypes calls per token, several milliseconds on top of the
matmuls. Like a CUDA graph, a `Graph` records each kernel call once, as a function address and an int64
argument array over fixed buffers, and `run()` replays the whole list through `cumulo_graph_run` (graph.cpp).
The engine records one per decode batch size (`cumulo.engine.decode_graph`); each kernel offers its recorded
form beside its eager one (`*_op` functions in the C sources, `graph_op` on the Python side).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from cumulo.platform.kernels import gemv, paged_attention, rms_norm, rope_cache
from cumulo.platform.kernels.build import KernelLibrary, address, f32_bits

SOURCE = Path(__file__).with_name("graph.cpp")
DTYPES = (torch.bfloat16, torch.float32)  # the engine's dtypes on CPUs; every recorded kernel takes both
Op = tuple[int, list[int]]  # (function address, its int64 arguments)


def _configure(lib: ctypes.CDLL) -> None:
    lib.cumulo_graph_run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.cumulo_graph_run.restype = ctypes.c_int64


_kernel = KernelLibrary(SOURCE, "CPU decode graph", _configure, fallback="running decode steps eagerly")


def library() -> ctypes.CDLL | None:
    return _kernel.get()


def available() -> bool:
    return all(lib.library() is not None for lib in (gemv, rms_norm, rope_cache, paged_attention)) and (
        library() is not None
    )


class Graph:
    """Ops recorded in order; `run()` calls them all. The tensors the ops point into must outlive the graph,
    so every tensor handed to a recording method is kept (`keep`)."""

    DTYPES = DTYPES

    def __init__(self) -> None:
        self._ops: list[Op] = []
        self._keep: list[object] = []
        self._status = torch.zeros(1, dtype=torch.int64)
        self._table: torch.Tensor | None = None
        self._errors: list[dict[int, str]] = []

    def keep(self, *objects: object) -> None:
        self._keep.extend(objects)

    def add(self, op: Op, errors: dict[int, str] | None = None) -> None:
        self._ops.append(op)
        self._errors.append(errors or {})
        self._table = None

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, eps: float, offset: float
    ) -> None:
        lib = rms_norm.library()
        assert lib is not None
        self.keep(x, weight, y)
        args = [x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], f32_bits(eps),
                f32_bits(offset), int(x.dtype == torch.bfloat16), 1]  # fmt: skip
        self.add((address(lib.cumulo_rms_norm_op), args))

    def add_rms_norm(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        weight: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        offset: float,
    ) -> None:
        """x += r; y = rms_norm(x) * (weight + offset)."""
        lib = rms_norm.library()
        assert lib is not None
        self.keep(x, r, weight, y)
        args = [x.data_ptr(), r.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1],
                f32_bits(eps), f32_bits(offset), int(x.dtype == torch.bfloat16)]  # fmt: skip
        self.add((address(lib.cumulo_add_rms_norm_op), args))

    def silu_mul(self, gate_up: torch.Tensor, act: torch.Tensor) -> None:
        lib = library()
        assert lib is not None
        self.keep(gate_up, act)
        args = [
            gate_up.data_ptr(),
            act.data_ptr(),
            act.shape[0],
            act.shape[1],
            int(act.dtype == torch.bfloat16),
        ]
        self.add((address(lib.cumulo_silu_mul_op), args))

    def rope_and_cache(
        self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, q: torch.Tensor, heads: int,
        kv_heads: int,
    ) -> None:  # fmt: skip
        lib = rope_cache.library()
        assert lib is not None
        self.keep(qkv, positions, cos, sin, k_cache, v_cache, slots, q)
        dim = k_cache.shape[-1]
        args = [qkv.data_ptr(), qkv.shape[0], qkv.stride(0), heads, kv_heads, dim, positions.data_ptr(),
                cos.data_ptr(), sin.data_ptr(), cos.shape[0], k_cache.data_ptr(), v_cache.data_ptr(),
                k_cache.stride(0), k_cache.shape[1] * k_cache.shape[2], slots.data_ptr(), q.data_ptr(),
                int(qkv.dtype == torch.bfloat16), self._status.data_ptr()]  # fmt: skip
        self.add((address(lib.cumulo_rope_cache_op), args), rope_cache.ERRORS)

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
        lens: torch.Tensor, out: torch.Tensor, scale: float, window: int | None, threads: int,
    ) -> None:  # fmt: skip
        lib = paged_attention.library()
        assert lib is not None
        self.keep(q, k_cache, v_cache, tables, lens, out)
        args = paged_attention.pack_args(q, k_cache, v_cache, tables, lens, out, window, threads)
        args += [f32_bits(scale), self._status.data_ptr()]
        self.add((address(lib.cumulo_paged_decode_attention_op), args), paged_attention.ERRORS)

    def run(self) -> None:
        lib = library()
        assert lib is not None
        if self._table is None:
            arrays = [torch.tensor(args, dtype=torch.int64) for _, args in self._ops]
            self._arrays = arrays
            flat = [v for (fn, _), a in zip(self._ops, arrays, strict=True) for v in (fn, a.data_ptr())]
            self._table = torch.tensor(flat, dtype=torch.int64)
        failed = lib.cumulo_graph_run(self._table.data_ptr(), len(self._ops), self._status.data_ptr())
        if failed:
            code = int(self._status[0])
            self._status.zero_()
            raise ValueError(self._errors[failed - 1].get(code, f"kernel error {code}"))
