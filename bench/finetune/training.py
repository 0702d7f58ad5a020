"""Training tokens/s: Cumulo's trainer (`cumulo.finetune.api.train`) against a plain transformers + PEFT loop
(what HF Trainer runs per step: one batched forward and backward, AdamW), same model, LoRA rank, alpha and
targets, same batch size and sequence length. Each side's rate is taken between its first and last step, so
loading and the first (warm-up) step are left out of both."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cumulo.finetune import api

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def training_file(path: Path, n: int, words: int) -> Path:
    """`n` chat examples whose answers are `words` words long, so nearly every token is trained."""
    vocab = "the cloud trains a small model on plain text and answers each question in a calm voice".split()
    lines = []
    for i in range(n):
        answer = " ".join(vocab[(i + j) % len(vocab)] for j in range(words))
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def cumulo_rate(model: Path, data: Path, out: Path, batch: int, steps: int, rank: int) -> dict:
    stamps: list[tuple[float, int]] = []

    def on_event(event: api.TrainEvent) -> None:
        if event.kind == "step":
            stamps.append((time.perf_counter(), event.trained_tokens))

    spec = api.TrainSpec(
        model=model, training_file=data, validation_file=None,
        hyper=api.Hyperparameters(n_epochs=1, batch_size=batch, learning_rate=2e-4),
        seed=0, output_dir=out, lora_rank=rank, lora_alpha=2 * rank, checkpoint_every=10_000, resume=False,
    )  # fmt: skip
    api.train(spec, on_event, lambda: len(stamps) >= steps)
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    return {
        "tok_s": (n1 - n0) / (t1 - t0),
        "tokens_per_step": (n1 - n0) / (len(stamps) - 1),
        "steps": len(stamps),
    }


def peft_rate(model: Path, batch: int, seq_len: int, steps: int, rank: int) -> dict:
    import peft  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    lora = peft.get_peft_model(hf, config).train()
    optimizer = torch.optim.AdamW(
        [p for p in lora.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0
    )
    ids = torch.randint(1000, 41000, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    stamps = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in lora.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        stamps.append(time.perf_counter())
    return {"tok_s": batch * seq_len * (steps - 1) / (stamps[-1] - stamps[0]), "steps": steps}
