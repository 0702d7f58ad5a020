"""The CPU decode graph: a decode step recorded once as a list of C kernel calls, then replayed in one call.

A decode step of a small model is mostly overhead on a CPU: SmolLM2-135M runs some 300 Python-level module
calls, as many small torch operators and 150 ctypes calls per token, several milliseconds on top of the
matmuls. Like a CUDA graph, a `Graph` records each kernel call once, as the kernel's address and the int64
argument array an eager call would pass (cumulo.platform.kernels.abi), over fixed buffers, and `run()` replays
the whole list through `cumulo_graph_run` (graph.cpp). The engine records one per decode batch size
(`cumulo.engine.decode_graph`); linears offer their recorded form as `graph_op(x, y)`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cumulo.platform.kernels import gemv, paged_attention, rms_norm, rope_cache
from cumulo.platform.kernels.abi import Kernels, Op
from cumulo.platform.kernels.build import KernelLibrary

SOURCE = Path(__file__).with_name("graph.cpp")
DTYPES = (torch.bfloat16, torch.float32)  # the engine's dtypes on CPUs; every recorded kernel takes both

_kernel = KernelLibrary(
    SOURCE,
    "CPU decode graph",
    ["cumulo_graph_run", "cumulo_silu_mul", "cumulo_lora", "cumulo_mla_decode", "cumulo_mla_rope_cache"],
    fallback="running decode steps eagerly",
)


def library() -> Kernels | None:
    return _kernel.get()


def available() -> bool:
    return all(lib.library() is not None for lib in (gemv, rms_norm, rope_cache, paged_attention)) and (
        library() is not None
    )


MLA_ERRORS = {
    1: "MLA: a context length or position out of range",
    2: "MLA: a block id or cache slot out of range",
    3: "MLA: rotary width odd or over 1024",
}


def mla_decode_op(
    q: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor,
    lens: torch.Tensor, out: torch.Tensor, scale: float, threads: int,
) -> Op:  # fmt: skip
    """The call of `Graph.mla_decode` (also run directly by tests)."""
    lib = library()
    assert lib is not None
    heads, nope, rank = w_uk.shape
    return lib.cumulo_mla_decode.op(
        q=q, w_uk=w_uk, w_uv=w_uv, cache=cache, tables=tables, lens=lens, out=out, batch=q.shape[0], heads=heads,
        nope=nope, rope=q.shape[2] - nope, rank=rank, v_dim=w_uv.shape[1], block_size=cache.shape[1],
        max_blocks=tables.shape[1], num_blocks=cache.shape[0], scale=scale, bf16=q.dtype == torch.bfloat16,
        threads=threads,
    )  # fmt: skip


def mla_rope_cache_op(
    q: torch.Tensor, kv: torch.Tensor, weight: torch.Tensor, eps: float, positions: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, interleaved: bool,
) -> Op:  # fmt: skip
    """The call of `Graph.mla_rope_cache`."""
    lib = library()
    assert lib is not None
    rank = weight.shape[0]
    return lib.cumulo_mla_rope_cache.op(
        q=q, kv=kv, w=weight, eps=eps, positions=positions, cos=cos, sin=sin, max_positions=cos.shape[0],
        cache=cache, slots=slots, num_slots=cache.shape[0] * cache.shape[1], batch=q.shape[0], heads=q.shape[1],
        nope=q.shape[2] - (kv.shape[1] - rank), rope=kv.shape[1] - rank, rank=rank, interleaved=interleaved,
        bf16=q.dtype == torch.bfloat16,
    )  # fmt: skip


def _kernels(module: object) -> Kernels:
    lib = module.library()  # type: ignore[attr-defined]
    assert lib is not None, "check graph.available() before recording"
    return lib


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
        """Record one kernel call (a kernel's `op(...)`); `errors` maps its return codes to messages."""
        self._ops.append(op)
        self._errors.append(errors or {})
        self._table = None

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, eps: float, offset: float
    ) -> None:
        """y = rms_norm(x) * (weight + offset), on the replaying thread."""
        self.keep(x, weight, y)
        self.add(_kernels(rms_norm).cumulo_rms_norm.op(**rms_norm.args(x, weight, y, eps, offset, threads=1)))

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
        self.keep(x, r, weight, y)
        op = _kernels(rms_norm).cumulo_add_rms_norm.op(
            x=x, r=r, w=weight, y=y, rows=x.shape[0], dim=x.shape[1], eps=eps, offset=offset,
            bf16=x.dtype == torch.bfloat16,
        )  # fmt: skip
        self.add(op)

    def silu_mul(self, gate_up: torch.Tensor, act: torch.Tensor) -> None:
        """act = silu(gate) * up, gate_up = [gate | up] per row."""
        self.keep(gate_up, act)
        lib = library()
        assert lib is not None
        op = lib.cumulo_silu_mul.op(
            gate_up=gate_up, act=act, rows=act.shape[0], inter=act.shape[1], bf16=act.dtype == torch.bfloat16
        )
        self.add(op)

    def lora(self, x: torch.Tensor, y: torch.Tensor, table: torch.Tensor, threads: int) -> None:
        """y += per row (x @ A^T) @ Bt, each row's A [R, in] and Bt [R, out] named by `table` [rows, 3] int64
        (addresses and rank; zeros: no product), which the caller refills before every run."""
        self.keep(x, y, table)
        lib = library()
        assert lib is not None
        op = lib.cumulo_lora.op(
            x=x, y=y, table=table, rows=x.shape[0], **{"in": x.shape[1]}, out=y.shape[1],
            bf16=x.dtype == torch.bfloat16, threads=threads,
        )  # fmt: skip
        self.add(op)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> bool:
        """y = x @ weight^T for a bare weight [N, K] (no module to offer a `graph_op`), e.g. DeepSeek's router;
        bf16 x may write fp32 y (the sums unrounded). False, nothing recorded, where the kernel does not take
        them."""
        op = gemv.graph_op(x, weight, None, y) if y.dtype in (x.dtype, torch.float32) else None
        if op is None:
            return False
        self.keep(x, weight, y)
        self.add(op)
        return True

    def mla_decode(
        self, q: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor,
        lens: torch.Tensor, out: torch.Tensor, scale: float, threads: int,
    ) -> None:  # fmt: skip
        """Absorbed multi-head latent attention of one query per row (cumulo.models.mla): q [B, H, nope + rope]
        with q_pe rotated, w_uk [H, nope, rank], w_uv [H, v, rank], cache [blocks, block_size, rank + rope],
        tables [B, max_blocks] and lens [B] int64 -> out [B, H, v]; all contiguous, in one dtype."""
        self.keep(q, w_uk, w_uv, cache, tables, lens, out)
        self.add(mla_decode_op(q, w_uk, w_uv, cache, tables, lens, out, scale, threads), MLA_ERRORS)

    def mla_rope_cache(
        self, q: torch.Tensor, kv: torch.Tensor, weight: torch.Tensor, eps: float, positions: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, interleaved: bool,
    ) -> None:  # fmt: skip
        """MLA's per-step writes: q_pe rotated in place in q [B, H, nope + rope]; kv [B, rank + rope] (kv_a_proj's
        output) -> the normalised latent and the rotated k_pe in each row's slot of cache [blocks, block_size,
        rank + rope]; cos/sin fp32 [positions, rope / 2], weight [rank]; all contiguous."""
        self.keep(q, kv, weight, positions, cos, sin, cache, slots)
        self.add(
            mla_rope_cache_op(q, kv, weight, eps, positions, cos, sin, cache, slots, interleaved), MLA_ERRORS
        )

    def rope_and_cache(
        self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, q: torch.Tensor, heads: int,
        kv_heads: int,
    ) -> None:  # fmt: skip
        self.keep(qkv, positions, cos, sin, k_cache, v_cache, slots, q)
        args = rope_cache.args(qkv, positions, cos, sin, k_cache, v_cache, slots, q, heads, kv_heads)
        self.add(_kernels(rope_cache).cumulo_rope_cache.op(**args), rope_cache.ERRORS)

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
        lens: torch.Tensor, out: torch.Tensor, scale: float, window: int | None, threads: int,
    ) -> None:  # fmt: skip
        self.keep(q, k_cache, v_cache, tables, lens, out)
        args = paged_attention.args(q, k_cache, v_cache, tables, lens, out, window, threads, scale)
        self.add(_kernels(paged_attention).cumulo_paged_decode_attention.op(**args), paged_attention.ERRORS)

    def run(self) -> None:
        lib = library()
        assert lib is not None
        if self._table is None:
            arrays = [torch.tensor(args, dtype=torch.int64) for _, args in self._ops]
            self._arrays = arrays
            flat = [v for (fn, _), a in zip(self._ops, arrays, strict=True) for v in (fn, a.data_ptr())]
            self._table = torch.tensor(flat, dtype=torch.int64)
        failed = lib.cumulo_graph_run(ops=self._table, n=len(self._ops), status=self._status)
        if failed:
            code = int(self._status[0])
            self._status.zero_()
            raise ValueError(self._errors[failed - 1].get(code, f"kernel error {code}"))
