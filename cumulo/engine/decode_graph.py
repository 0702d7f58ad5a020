"""Decode steps of Llama-family models replayed as one recorded graph of platform kernels.

`DecodeGraph.record(model, kv_cache, batch, recorder, max_blocks)` walks a model whose decoder layers are the plain
pre-norm kind (RMSNorm, fused q/k/v without per-head norms, rotary, paged attention, SiLU-gated MLP) and
records one decode step at a fixed batch size over fixed buffers; a DeepSeek-V3 model over its latent-only cache
(multi-head latent attention + MoE) is recorded by `decode_graph_mla.record_mla`. It returns None for anything
else (Gemma 3, linears without a recorded form), and the engine keeps its eager path. `run()` fills the step's inputs
into the buffers, replays the graph and returns the final normalised hidden states. The recorder is the
platform's (`Platform.graph_recorder`), so the engine names no device here.

Recorded with `lora=True`, each multi-LoRA linear (cumulo.engine.lora) is followed by the recorder's LoRA op:
per row, `(x @ A^T) @ Bt` of that row's adapter, read in place from the adapter's own tensors through a table of
addresses that `run()` refills from the step's adapters (zeros for base rows). Nothing about the adapters is
recorded, so any mix of adapters, and adapters loaded or evicted between steps, replays the same graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cumulo.engine.decode_graph_mla import record_linear, record_mla
from cumulo.engine.lora import LoadedAdapter, MultiLoRALinear
from cumulo.models.attention import KVCache
from cumulo.models.layers import Attention, GatedMLP, RMSNorm
from cumulo.models.llama import LlamaModel
from cumulo.models.qwen3_moe import Qwen3MoeSparseBlock

MAX_BATCH = 16  # decode batches above this run eagerly (the dense decode kernels take at most 16 rows)


def _routed(mlp: nn.Module) -> bool:
    """Whether `mlp` is a Qwen3-MoE sparse block whose router and experts record (as two ops)."""
    return (
        isinstance(mlp, Qwen3MoeSparseBlock)
        and mlp.experts.grouped
        and mlp.experts.grouped_kernel() is not None
    )


def _plain_layer(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = {name for name, _ in layer.named_children()}
    return (
        names == {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
        and isinstance(attn, Attention)
        # per-head q/k norms (Qwen3) of the plain kind: normalised in place before the rotary kernel
        and (attn.q_norm is None) == (attn.k_norm is None)
        and all(type(n) is RMSNorm and not n.offset for n in (attn.q_norm, attn.k_norm) if n is not None)
        and not attn.rotary.interleaved
        # the rotary kernel reads fp32 tables; a model cast whole to 16 bits rotates eagerly with its own
        and attn.rotary.cos.dtype == torch.float32
        and attn.rotary.cos.is_contiguous()
        and attn.rotary.cos.shape[1] * 2 == attn.head_dim  # rotary over the whole head, as the kernel does
        and ((isinstance(mlp, GatedMLP) and mlp.act == "silu") or _routed(mlp))
        and isinstance(layer.input_layernorm, RMSNorm)
        and isinstance(layer.post_attention_layernorm, RMSNorm)
    )


class DecodeGraph:
    def __init__(
        self, graph: Any, buffers: dict[str, torch.Tensor], lora_names: tuple[str, ...] = ()
    ) -> None:
        self.graph = graph  # the platform recorder's graph, holding the ops
        self.buffers = buffers
        self.lora_names = (
            lora_names  # the multi-LoRA linears with a LoRA op, in the order of the table's rows
        )
        self.dtype = buffers["x"].dtype
        # NumPy views of the integer inputs: run() writes a step's Python ints straight into them, where a
        # torch.tensor per input plus a copy cost about 0.1 ms a step at batch 1 (docs/benchmarks.md, Session 9)
        self._inputs = {k: buffers[k].numpy() for k in ("ids", "positions", "slots", "lens", "tables")}

    @classmethod
    def record(
        cls, model: nn.Module, kv_cache: KVCache, batch: int, recorder: type, max_blocks: int | None = None,
        lora: bool = False,
    ) -> DecodeGraph | None:  # fmt: skip
        """The graph of one decode step of `batch` sequences, or None where this model cannot be recorded.
        `max_blocks`: the most KV blocks a sequence can hold (the block tables' width; default: the cache's).
        `lora`: add each multi-LoRA linear's LoRA op (None if the model has none or the recorder lacks it)."""
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        embed = getattr(body, "embed_tokens", None)
        final_norm = getattr(body, "norm", None)
        if (
            not 1 <= batch <= MAX_BATCH
            or layers is None
            or len(layers) == 0
            or not isinstance(embed, nn.Embedding)
            or not isinstance(final_norm, RMSNorm)
            or embed.weight.dtype not in recorder.DTYPES
            or not isinstance(
                body, LlamaModel
            )  # embeddings in, final norm out, nothing else around the layers
            or (lora and not hasattr(recorder, "lora"))
        ):
            return None
        if (
            not kv_cache.k
        ):  # a latent-only cache: multi-head latent attention (DeepSeek), recorded by its own walk
            recorded = (
                record_mla(model, kv_cache, batch, recorder, max_blocks, lora) if kv_cache.latent else None
            )
            return None if recorded is None else cls(*recorded)
        if (
            kv_cache.k[0].dtype != embed.weight.dtype  # the kernels write the cache in the activations' dtype
            or not all(_plain_layer(layer) for layer in layers)
        ):
            return None
        dtype = embed.weight.dtype
        attn0: Attention = layers[0].self_attn
        hidden, heads, kv_heads, dim = (
            embed.weight.shape[1],
            attn0.num_heads,
            attn0.num_kv_heads,
            attn0.head_dim,
        )
        dense = [layer.mlp for layer in layers if isinstance(layer.mlp, GatedMLP)]
        sparse = [layer.mlp for layer in layers if not isinstance(layer.mlp, GatedMLP)]
        if (
            len({m.down_proj.in_features for m in dense}) > 1
            or len({(m.experts.num_experts, m.top_k) for m in sparse}) > 1
        ):
            return None  # the buffers have one width per kind of layer
        inter = dense[0].down_proj.in_features if dense else 1
        experts, top_k = (sparse[0].experts.num_experts, sparse[0].top_k) if sparse else (1, 1)
        width = attn0.qkv_proj.out_features

        def buf(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dt)

        b = {
            "ids": buf(batch, dt=torch.int64), "positions": buf(batch, dt=torch.int64),
            "slots": buf(batch, dt=torch.int64), "lens": buf(batch, dt=torch.int64),
            "tables": buf(batch, max_blocks or kv_cache.num_blocks, dt=torch.int64),
            "x": buf(batch, hidden), "h": buf(batch, hidden), "qkv": buf(batch, width),
            "q": buf(batch, heads, dim), "attn": buf(batch, heads, dim), "o": buf(batch, hidden),
            "gu": buf(batch, 2 * inter), "act": buf(batch, inter), "d": buf(batch, hidden),
            "logits": buf(batch, experts), "expert_ids": buf(batch, top_k, dt=torch.int64),
            "expert_weights": buf(batch, top_k, dt=torch.float32),
        }  # fmt: skip
        lora_names = tuple(
            m.name for layer in layers for m in layer.modules() if lora and isinstance(m, MultiLoRALinear)
        )
        if lora and not lora_names:
            return None
        b["lora"] = buf(
            len(lora_names), batch, 3, dt=torch.int64
        )  # per linear, per row: (A, Bt, R) (lora.py)
        g = recorder()
        threads = torch.get_num_threads()

        def linear(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
            if not record_linear(g, module, x, y):
                return False
            if lora and isinstance(module, MultiLoRALinear):
                # one thread: a LoRA op is small, and on a loaded 2-core machine its fork/join cost more
                # than it saved (bench.finetune.profile: replay ratio 0.66 with 2 threads, 0.81 with 1)
                g.lora(x, y, b["lora"][lora_names.index(module.name)], 1)
            return True

        def add_norm(r: torch.Tensor, n: RMSNorm) -> None:  # x += r; h = n(x)
            weight = n.weight.detach().to(dtype).contiguous()
            g.add_rms_norm(x=b["x"], r=r, weight=weight, y=b["h"], eps=n.eps, offset=n.offset)

        first = layers[0].input_layernorm
        weight = first.weight.detach().to(dtype).contiguous()
        g.rms_norm(x=b["x"], weight=weight, y=b["h"], eps=first.eps, offset=first.offset)
        for i, layer in enumerate(layers):
            attn: Attention = layer.self_attn
            mlp: GatedMLP = layer.mlp
            if (attn.num_heads, attn.num_kv_heads, attn.head_dim) != (heads, kv_heads, dim):
                return None
            if not linear(attn.qkv_proj, b["h"], b["qkv"]):
                return None
            if attn.q_norm is not None and attn.k_norm is not None:
                # each row's q heads, then its k heads, normalised in place (as Attention.norm_qk_heads does)
                q_size, kv_size = heads * dim, kv_heads * dim
                for r in range(batch):
                    row = b["qkv"][r]
                    for n, part, count in ((attn.q_norm, row[:q_size], heads),
                                           (attn.k_norm, row[q_size : q_size + kv_size], kv_heads)):  # fmt: skip
                        weight = n.weight.detach().to(dtype).contiguous()
                        g.rms_norm(x=part.view(count, dim), weight=weight, y=part.view(count, dim), eps=n.eps,
                                   offset=0.0)  # fmt: skip
            k_cache, v_cache = kv_cache.k[attn.layer_idx], kv_cache.v[attn.layer_idx]
            g.rope_and_cache(qkv=b["qkv"], positions=b["positions"], cos=attn.rotary.cos, sin=attn.rotary.sin,
                             k_cache=k_cache, v_cache=v_cache, slots=b["slots"], q=b["q"], heads=heads,
                             kv_heads=kv_heads)  # fmt: skip
            g.attention(q=b["q"], k_cache=k_cache, v_cache=v_cache, tables=b["tables"], lens=b["lens"],
                        out=b["attn"], scale=attn.scale, window=attn.sliding_window, threads=threads)  # fmt: skip
            if not linear(attn.o_proj, b["attn"].view(batch, heads * dim), b["o"]):
                return None
            add_norm(b["o"], layer.post_attention_layernorm)
            if isinstance(mlp, GatedMLP):
                if not linear(mlp.gate_up_proj, b["h"], b["gu"]):
                    return None
                g.silu_mul(gate_up=b["gu"], act=b["act"])
                if not linear(mlp.down_proj, b["act"], b["d"]):
                    return None
            else:  # the router's linear, then routing and the selected experts in the grouped kernel's one call
                if not linear(mlp.gate, b["h"], b["logits"]):
                    return None
                recorded = mlp.experts.softmax_routed_op(
                    b["h"],
                    b["logits"],
                    b["expert_ids"],
                    b["expert_weights"],
                    b["d"],
                    mlp.top_k,
                    mlp.norm_topk_prob,
                )
                if recorded is None:
                    return None
                g.keep(mlp.experts, b["logits"], b["expert_ids"], b["expert_weights"])
                g.add(*recorded)
            add_norm(b["d"], layers[i + 1].input_layernorm if i + 1 < len(layers) else final_norm)
        b["embed"] = embed.weight
        return cls(g, b, lora_names)

    def set_adapters(self, adapters: list[LoadedAdapter | None]) -> bool:
        """Point the LoRA ops at this step's adapters, one per row (None: a base row); False (nothing changed)
        if one's tensors are not in the graph's dtype and layout, and the step must run eagerly."""
        rows = []
        for adapter in adapters:
            if adapter is None:
                rows.append(None)
                continue
            table = adapter.graph_rows(self.lora_names) if adapter.dtype == self.dtype else None
            if table is None:
                return False
            rows.append(table)
        zeros = torch.zeros(len(self.lora_names), 3, dtype=torch.int64)
        self.buffers["lora"].copy_(
            torch.stack([zeros if r is None else r for r in rows], dim=1)
        )  # [L, batch, 3]
        return True

    def run(
        self, input_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
        context_lens: list[int],
    ) -> torch.Tensor:  # fmt: skip
        """Final normalised hidden states [batch, hidden] of one decode step (a view of the graph's buffer,
        overwritten by the next run)."""
        b, inputs = self.buffers, self._inputs
        inputs["ids"][:] = input_ids
        inputs["positions"][:] = positions
        inputs["slots"][:] = slots
        inputs["lens"][:] = context_lens
        width = max(len(t) for t in block_tables)
        tables = inputs["tables"]  # [batch, max_blocks]: each row's table, zeros up to the step's widest
        for row, table in zip(tables, block_tables, strict=True):
            row[: len(table)] = table
            row[len(table) : width] = 0
        torch.index_select(b["embed"], 0, b["ids"], out=b["x"])
        self.graph.run()
        return b["h"]
