"""The LoRA training loop behind `cumulo.finetune.api.train`: AdamW on the adapter only, linear warmup then
linear decay, gradient clipping, packed examples, checkpoints that a killed worker resumes from exactly.

Reproducible: the adapter's initial A comes from a torch.Generator seeded with the job's seed, and each epoch's
example order from a generator seeded with (seed, epoch), so a resumed run sees the same batches; a checkpoint
holds the adapter, AdamW's moments, the step and the tokens trained, so the resumed run's arithmetic is the
uninterrupted run's. The loop is the same for each method; what a batch is and its loss is the method's
objective: supervised (here), the mean over the batch's trained tokens (weight-1 assistant tokens), whatever
sequences packing put them in; DPO (`dpo.PreferenceObjective`), the mean over the batch's preference pairs.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cumulo.errors import InvalidRequest
from cumulo.finetune.api import AUTO_BETA, STATE, TrainEvent, TrainResult, TrainSpec, newest_checkpoint
from cumulo.finetune.data import DEFAULT_MAX_SEQ_LEN, Example, PackedSequence, pack, read_examples
from cumulo.finetune.dpo import PreferenceObjective
from cumulo.finetune.lora import LoRALinear, apply_lora, lora_parameters
from cumulo.finetune.peft_io import AdapterInfo, load_into, save_adapter
from cumulo.models.attention import AttentionContext

WARMUP_FRACTION = 0.05  # of all steps, at least one
MAX_GRAD_NORM = 1.0


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over the first WARMUP_FRACTION of steps, then linear decay to zero at `total`."""
    warmup = max(1, round(total * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def loss_sum(model: torch.nn.Module, seq: PackedSequence) -> tuple[torch.Tensor, int]:
    """(sum of token losses, trained tokens) over one packed sequence; logits only where a label is."""
    ctx = AttentionContext(kv_cache=None, segment_ids=seq.segment_ids)
    hidden = model(seq.input_ids, seq.positions, ctx)  # [T, hidden]
    keep = seq.labels != -100
    logits = model.compute_logits(hidden[keep])  # [n, vocab] fp32
    return F.cross_entropy(logits, seq.labels[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def mean_loss(model: torch.nn.Module, examples: list[Example], max_seq_len: int) -> float | None:
    if not examples:
        return None
    total, count = 0.0, 0
    for seq in pack(examples, max_seq_len):
        s, n = loss_sum(model, seq)
        total, count = total + float(s), count + n
    return total / max(count, 1)


@dataclass
class SupervisedObjective:
    """The trainer's objective for `method.type = "supervised"`: batches of Example."""

    model: torch.nn.Module
    max_seq_len: int

    def tokens(self, example: Example) -> int:
        return len(example)

    def step(self, batch: list[Example]) -> tuple[float, dict[str, float]]:
        n_target = sum(sum(e.loss_mask) for e in batch)
        total_loss = 0.0
        for seq in pack(batch, self.max_seq_len):
            s, _ = loss_sum(self.model, seq)
            (s / n_target).backward()  # gradients of the batch mean, one packed sequence at a time
            total_loss += float(s.detach())
        return total_loss / n_target, {}

    def evaluate(self, examples: list[Example]) -> tuple[float | None, dict[str, float]]:
        return mean_loss(self.model, examples, self.max_seq_len), {}


def _read(path: Path, tokenizer, max_seq_len: int, what: str, method: str) -> list[Any]:
    if method == "dpo":
        from cumulo.finetune.preference import read_pairs

        examples, errors = read_pairs(path, tokenizer, max_seq_len)
    else:
        examples, errors = read_examples(path, tokenizer, max_seq_len)
    if errors:
        line, problem = errors[0]
        raise InvalidRequest(f"{what} file, line {line}: {problem}")
    return examples


def _save_checkpoint(output_dir: Path, step: int, wrapped, optimizer, info: AdapterInfo, extra: dict) -> Path:
    """Written under a temporary name and renamed: a checkpoint directory that exists is complete."""
    final = output_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(tmp, wrapped, info)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), **extra}, tmp / STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def run_training(
    spec: TrainSpec, on_event: Callable[[TrainEvent], None], should_stop: Callable[[], bool]
) -> TrainResult:
    from cumulo.models.loader import load
    from cumulo.models.registry import build_model

    hyper = spec.hyper
    loaded = load(spec.model, dtype=torch.float32)
    max_seq_len = min(spec.max_seq_len or DEFAULT_MAX_SEQ_LEN, loaded.config.max_position_embeddings)
    train_set = _read(spec.training_file, loaded.tokenizer, max_seq_len, "training", spec.method)
    valid_set = (
        _read(spec.validation_file, loaded.tokenizer, max_seq_len, "validation", spec.method)
        if spec.validation_file
        else []
    )
    model = build_model(loaded.config, loaded.weights, consume=True)
    wrapped: dict[str, LoRALinear] = apply_lora(
        model, spec.lora_rank, spec.lora_alpha, spec.target_modules, torch.Generator().manual_seed(spec.seed)
    )
    objective: SupervisedObjective | PreferenceObjective
    if spec.method == "dpo":
        beta = AUTO_BETA if hyper.beta is None else hyper.beta
        objective = PreferenceObjective(model, wrapped, beta, max_seq_len)
    else:
        objective = SupervisedObjective(model, max_seq_len)
    params = lora_parameters(wrapped)
    optimizer = torch.optim.AdamW(params, lr=hyper.learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_set) / hyper.batch_size)
    total = hyper.n_epochs * steps_per_epoch
    every = spec.checkpoint_every or steps_per_epoch
    output_dir = Path(spec.output_dir)
    identity = {"seed": spec.seed, "hyper": (hyper.n_epochs, hyper.batch_size, hyper.learning_rate),
                "rank": spec.lora_rank, "n_examples": len(train_set), "base_seal": loaded.seal}  # fmt: skip
    if spec.method == "dpo":
        identity["dpo_beta"] = objective.beta  # type: ignore[union-attr]

    def info(tokens: int) -> AdapterInfo:
        return AdapterInfo(str(spec.model), loaded.seal, tokens, spec.job_id, spec.lora_rank, spec.lora_alpha)

    step, trained_tokens = 0, 0
    newest = newest_checkpoint(output_dir) if spec.resume else None
    if newest is not None:
        state = torch.load(newest / STATE, weights_only=True)
        if state.get("identity") != identity:
            raise InvalidRequest(
                f"checkpoint {newest} belongs to another run (seed, data or settings differ)"
            )
        load_into(newest, wrapped, base_seal=loaded.seal)
        optimizer.load_state_dict(state["optimizer"])
        step, trained_tokens = state["step"], state["trained_tokens"]
        on_event(TrainEvent("message", step, total, trained_tokens, message=f"resumed from step {step}"))

    train_loss: float | None = None
    valid_loss: float | None = None
    order: list[int] = []
    stopped = False
    model.train()
    while step < total:
        if should_stop():
            stopped = True
            break
        epoch, index = divmod(step, steps_per_epoch)
        if index == 0 or not order:
            order = epoch_order(len(train_set), spec.seed, epoch)
        batch = [train_set[i] for i in order[index * hyper.batch_size : (index + 1) * hyper.batch_size]]
        optimizer.zero_grad(set_to_none=True)
        train_loss, train_metrics = objective.step(batch)
        metrics = {f"train_{k}": v for k, v in train_metrics.items()}
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, hyper.learning_rate)
        optimizer.step()
        step += 1
        trained_tokens += sum(objective.tokens(e) for e in batch)
        on_event(TrainEvent("step", step, total, trained_tokens, train_loss=train_loss, metrics=metrics))
        if step % every == 0 or step == total:
            model.eval()
            valid_loss, valid_metrics = objective.evaluate(valid_set)
            model.train()
            metrics.update({f"valid_{k}": v for k, v in valid_metrics.items()})
            extra = {"trained_tokens": trained_tokens, "identity": identity}
            where = _save_checkpoint(output_dir, step, wrapped, optimizer, info(trained_tokens), extra)
            on_event(
                TrainEvent(
                    "checkpoint", step, total, trained_tokens, train_loss, valid_loss, where, metrics=metrics
                )
            )
    if (
        stopped
        and step > 0
        and newest_checkpoint(output_dir) != output_dir / "checkpoints" / f"step-{step:06d}"
    ):
        extra = {"trained_tokens": trained_tokens, "identity": identity}
        _save_checkpoint(output_dir, step, wrapped, optimizer, info(trained_tokens), extra)
    model.eval()
    adapter_dir = save_adapter(output_dir / "adapter", wrapped, info(trained_tokens))
    if stopped:
        on_event(
            TrainEvent("message", step, total, trained_tokens, message=f"stopped at step {step} of {total}")
        )
    return TrainResult(adapter_dir, trained_tokens, step, train_loss, valid_loss, stopped)
