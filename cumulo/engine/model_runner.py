"""Owns all device work for one model: the weights, the KV cache, and turning a `ScheduledBatch` into one
forward pass. Everything else in the engine is bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cumulo.engine.decode_graph import DecodeGraph
from cumulo.engine.lora import LoRABatch, wrap_linears
from cumulo.engine.scheduler import ScheduledBatch
from cumulo.engine.sequence import Sequence
from cumulo.models.attention import AttentionContext, KVCache, PrefillChunk


def slots_of(seq: Sequence, start: int, end: int, block_size: int) -> list[int]:
    """The cache slots of positions start .. end - 1 of `seq`, through its block table."""
    table = seq.block_table
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def decode_rows(batch: ScheduledBatch, block_size: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Input ids, positions, cache slots and sampled rows of a step's decodes: one row each, all sampled."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    for seq in batch.decodes:
        pos = seq.num_computed_tokens
        input_ids.append(seq.token_ids[pos])
        positions.append(pos)
        slots.extend(slots_of(seq, pos, pos + 1, block_size))
    return input_ids, positions, slots, list(range(len(input_ids)))


def add_prefill_rows(
    batch: ScheduledBatch,
    block_size: int,
    device: torch.device,
    input_ids: list[int],
    positions: list[int],
    slots: list[int],
    sample_rows: list[int],
) -> list[PrefillChunk]:
    """Appends the step's prefill chunks after its decode rows; a chunk that completes its prompt is sampled."""
    chunks: list[PrefillChunk] = []
    for seq, n in batch.prefills:
        start = seq.num_computed_tokens
        table = torch.tensor(seq.block_table, dtype=torch.long, device=device)
        chunks.append(
            PrefillChunk(start=len(input_ids), num_tokens=n, context_len=start + n, block_table=table)
        )
        input_ids.extend(seq.token_ids[start : start + n])
        positions.extend(range(start, start + n))
        slots.extend(slots_of(seq, start, start + n, block_size))
        if start + n == seq.num_tokens:
            sample_rows.append(len(input_ids) - 1)
    return chunks


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        device: torch.device,
        paged_decode_attention: Callable[..., torch.Tensor] | None = None,
        graph_recorder: type | None = None,
        max_blocks_per_seq: int | None = None,
    ) -> None:
        self.model = model
        # Decode-only steps replay a recorded graph per batch size where the platform offers a recorder and
        # the model can be recorded (None in the dict: tried, not recordable).
        # A latent (MLA) cache records too (DeepSeek: cumulo.engine.decode_graph_mla); `record` answers None,
        # and the step runs eagerly, for any model it cannot record.
        self.graph_recorder = graph_recorder
        self._graphs: dict[int, DecodeGraph | None] = {}
        self._lora_graphs: dict[int, DecodeGraph | None] = {}  # the same with a LoRA op after each linear
        self.max_blocks_per_seq = max_blocks_per_seq or kv_cache.num_blocks  # block-table width of a graph
        self.paged_decode_attention = None if kv_cache.latent else paged_decode_attention  # dense GQA only
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self.lora: LoRABatch | None = None  # set by enable_lora, the first time a request brings an adapter

    def enable_lora(self) -> None:
        """Wrap the model's linears for multi-LoRA, once. Until then base-only steps pay nothing for it."""
        if self.lora is None:
            self.lora = LoRABatch()
            wrap_linears(self.model, self.lora)

    @staticmethod
    def lora_groups(batch: ScheduledBatch) -> list[tuple[object, int, int]]:
        """(adapter, first row, end row) of each run of consecutive rows with the same adapter, in the step's
        row order (decodes, then prefill chunks); the engine sorts both by adapter so each forms one run."""
        groups: list[tuple[object, int, int]] = []
        row = 0
        rows = [(s, 1) for s in batch.decodes] + list(batch.prefills)
        for seq, n in rows:
            adapter = seq.adapter
            if adapter is not None:
                if groups and groups[-1][0] is adapter and groups[-1][2] == row:
                    groups[-1] = (adapter, groups[-1][1], row + n)
                else:
                    groups.append((adapter, row, row + n))
            row += n
        return groups

    def _graph(self, batch: ScheduledBatch) -> DecodeGraph | None:
        """The recorded graph for this step, if it is decode-only and a graph of its size can be had."""
        n = len(batch.decodes)
        if self.graph_recorder is None or batch.prefills or not n:
            return None
        # steps with adapters replay a second graph, with a LoRA op after each linear; base-only steps the plain one
        lora = self.lora is not None and any(s.adapter is not None for s in batch.decodes)
        graphs = self._lora_graphs if lora else self._graphs
        if n not in graphs:
            graphs[n] = DecodeGraph.record(
                self.model, self.kv_cache, n, self.graph_recorder, self.max_blocks_per_seq, lora
            )
        graph = graphs[n]
        if lora and graph is not None and not graph.set_adapters([s.adapter for s in batch.decodes]):
            return None
        return graph

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Runs one step; returns float32 logits, one row per sequence whose step completes its known tokens
        (decodes, and prefills whose last chunk this is), in batch order: decodes then prefills."""
        input_ids, positions, slots, sample_rows = decode_rows(batch, self.block_size)
        graph = self._graph(batch)
        if graph is not None:
            decodes = batch.decodes
            hidden = graph.run(
                input_ids, positions, slots, [s.block_table for s in decodes],
                [s.num_computed_tokens + 1 for s in decodes],
            )  # fmt: skip
            return self.model.compute_logits(hidden)

        chunks = add_prefill_rows(
            batch, self.block_size, self.device, input_ids, positions, slots, sample_rows
        )

        dev = self.device
        ctx = AttentionContext(
            kv_cache=self.kv_cache,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode=len(batch.decodes),
            prefills=chunks,
            paged_decode_attention=self.paged_decode_attention,
        )
        if batch.decodes:
            width = max(len(s.block_table) for s in batch.decodes)
            tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.decodes]
            ctx.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=dev)
            ctx.decode_context_lens = torch.tensor(
                [s.num_computed_tokens + 1 for s in batch.decodes], dtype=torch.long, device=dev
            )
        if self.lora is not None:
            self.lora.set(self.lora_groups(batch))  # type: ignore[arg-type]
        try:
            hidden = self.model(
                torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev),
                ctx,
            )
        finally:
            if self.lora is not None:
                self.lora.clear()
        if not sample_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
