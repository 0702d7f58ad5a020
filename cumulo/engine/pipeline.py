"""Pipeline parallelism: one model's decoder layers split into contiguous stages, each with its own weights and
its own KV cache for its own layers, so a model too large for one device runs over several.

The driver (`PipelineRunner`, in the engine) keeps the scheduler, block manager, sampler and bookkeeping; block
ids are global (every stage's cache has the same block count and size), so one block table serves all stages.
Each step the driver sends the token ids, positions and the step's attention inputs (`StepInputs`) down the
stages: stage 0 embeds, every stage runs its layers, the last applies the final norm and the output head and
returns logits of the rows to sample. `LocalStages` runs the stages in this process (a test seam and a
multi-device process); `cumulo.cluster.stage` runs each on a Ray actor.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from cumulo.engine.model_runner import add_prefill_rows, decode_rows
from cumulo.engine.scheduler import ScheduledBatch
from cumulo.errors import InvalidRequest
from cumulo.models.attention import AttentionContext, KVCache, PrefillChunk
from cumulo.models.config import ModelConfig


def split_layers(num_layers: int, weights: SequenceOf[float]) -> list[range]:
    """Contiguous layer ranges, one per stage, sized in proportion to each stage's relative speed (`weights`),
    each at least one layer. Rounds by largest remainder so the counts add up to `num_layers` exactly."""
    n = len(weights)
    if n < 1 or any(w <= 0 for w in weights):
        raise InvalidRequest("stage weights must be positive, one per stage")
    if n > num_layers:
        raise InvalidRequest(f"cannot split {num_layers} layers into {n} stages")
    total = float(sum(weights))
    exact = [num_layers * w / total for w in weights]
    counts = [max(1, int(e)) for e in exact]
    while sum(counts) < num_layers:  # give the layer to the stage furthest below its share
        i = max(range(n), key=lambda j: exact[j] - counts[j])
        counts[i] += 1
    while sum(counts) > num_layers:  # a stage was lifted to one layer: take it from the furthest above
        i = max((j for j in range(n) if counts[j] > 1), key=lambda j: counts[j] - exact[j])
        counts[i] -= 1
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


@dataclass(slots=True)
class StepInputs:
    """What every stage needs to build one step's `AttentionContext` (CPU tensors: they may cross processes)."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of each token
    num_decode: int
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks]
    decode_context_lens: torch.Tensor | None  # [num_decode]
    prefills: list[PrefillChunk]


def stage_kv_cache(
    config: ModelConfig,
    layers: range,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KVCache:
    """A cache for `layers` only, indexed by global layer number (the layers' attention uses its own index):
    the slots of other stages' layers hold empty tensors."""
    latent = config.kv_lora_rank + config.qk_rope_head_dim if config.kv_lora_rank else 0
    cache = KVCache(
        len(layers),
        num_blocks,
        block_size,
        config.num_key_value_heads,
        config.head_dim,
        dtype,
        device,
        latent,
    )
    pad = [torch.empty(0, dtype=dtype, device=device)] * layers.start
    cache.k, cache.v = (pad + cache.k if cache.k else []), (pad + cache.v if cache.v else [])
    cache.latent = pad + cache.latent if cache.latent else []
    return cache


class StageWorker:
    """One stage's compute: its layers of `model` (a `CausalLM`; layers outside `layers` may be placeholders),
    its KV cache; stage 0 also embeds, the last stage also norms and computes logits."""

    def __init__(
        self,
        model: nn.Module,
        layers: range,
        kv_cache: KVCache,
        device: torch.device,
        *,
        first: bool,
        last: bool,
        paged_decode_attention=None,
    ) -> None:
        self.model, self.layers, self.kv_cache, self.device = model, layers, kv_cache, device
        self.first, self.last = first, last
        self.paged_decode_attention = None if kv_cache.latent else paged_decode_attention

    @torch.inference_mode()
    def run(
        self, x: torch.Tensor, positions: torch.Tensor, step: StepInputs, sample_rows: list[int]
    ) -> torch.Tensor:
        """x: token ids [T] on stage 0, else hidden states [T, H]. Returns hidden states [T, H], or on the last
        stage float32 logits [len(sample_rows), V]."""
        dev = self.device
        ctx = AttentionContext(
            kv_cache=self.kv_cache,
            slot_mapping=step.slot_mapping.to(dev),
            num_decode=step.num_decode,
            prefills=[
                PrefillChunk(c.start, c.num_tokens, c.context_len, c.block_table.to(dev))
                for c in step.prefills
            ],
            paged_decode_attention=self.paged_decode_attention,
        )
        if step.decode_block_tables is not None and step.decode_context_lens is not None:
            ctx.decode_block_tables = step.decode_block_tables.to(dev)
            ctx.decode_context_lens = step.decode_context_lens.to(dev)
        x, positions = x.to(dev), positions.to(dev)
        body = self.model.model
        if self.first:
            x = body.embed_tokens(x)
            scale = getattr(body, "embed_scale", None)  # Gemma 3 scales embeddings, rounded to their dtype
            if scale is not None:
                x = x * torch.tensor(scale, dtype=x.dtype)
        for i in self.layers:
            x = body.layers[i](x, positions, ctx)
        if not self.last:
            return x
        if not sample_rows:
            return x.new_empty((0, 0), dtype=torch.float32)
        x = body.norm(x[torch.tensor(sample_rows, device=dev)])  # the norm is per row: only rows sampled
        return self.model.compute_logits(x).float()


class Stages(Protocol):
    """How the driver reaches its stages: one call runs a step through all of them and returns the logits."""

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, step: StepInputs, sample_rows: list[int]
    ) -> torch.Tensor: ...


class LocalStages:
    """Stages in this process, run one after another."""

    def __init__(self, workers: list[StageWorker]) -> None:
        self.workers = workers

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, step: StepInputs, sample_rows: list[int]
    ) -> torch.Tensor:
        x = input_ids
        for worker in self.workers:
            x = worker.run(x, positions, step, sample_rows)
        return x.cpu()


class PipelineRunner:
    """The engine's runner for a split model: turns a `ScheduledBatch` into the step's inputs (as
    `ModelRunner.execute` does) and sends them through `stages`. No decode graphs and no LoRA."""

    def __init__(
        self, stages: Stages, model_config: ModelConfig, block_size: int, layer_split: list[range]
    ) -> None:
        self.stages, self.model_config, self.block_size = stages, model_config, block_size
        self.layer_split = layer_split
        self.lora = None  # the engine's LoRA hooks see a runner without adapters

    def enable_lora(self) -> None:
        raise InvalidRequest("LoRA adapters are not served by a model split over pipeline stages")

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Float32 logits, one row per sequence whose step completes its known tokens, decodes then prefills."""
        input_ids, positions, slots, sample_rows = decode_rows(batch, self.block_size)
        chunks = add_prefill_rows(
            batch, self.block_size, torch.device("cpu"), input_ids, positions, slots, sample_rows
        )
        tables = lens = None
        if batch.decodes:
            width = max(len(s.block_table) for s in batch.decodes)
            tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in batch.decodes])
            lens = torch.tensor([s.num_computed_tokens + 1 for s in batch.decodes], dtype=torch.long)
        step = StepInputs(torch.tensor(slots, dtype=torch.long), len(batch.decodes), tables, lens, chunks)
        return self.stages.run(
            torch.tensor(input_ids, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long),
            step,
            sample_rows,
        )


def local_pipeline(
    model: nn.Module,
    weights: SequenceOf[float],
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    paged_decode_attention=None,
) -> PipelineRunner:
    """An in-process split of a whole `model` (the test seam): stage i runs `split_layers(...)[i]` over the
    same module, each stage with a cache for its own layers."""
    config = model.config
    ranges = split_layers(config.num_hidden_layers, weights)
    workers = [
        StageWorker(
            model,
            r,
            stage_kv_cache(config, r, num_blocks, block_size, dtype, device),
            device,
            first=i == 0,
            last=i == len(ranges) - 1,
            paged_decode_attention=paged_decode_attention,
        )
        for i, r in enumerate(ranges)
    ]
    return PipelineRunner(LocalStages(workers), config, block_size, ranges)
