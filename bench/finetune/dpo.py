"""DPO training speed: Cumulo's trainer with `method="dpo"` against a plain transformers + PEFT DPO loop doing
what TRL's DPOTrainer does per step (the batch's chosen and rejected sequences concatenated into one batch, one
reference forward with the adapter disabled and no gradients, one policy forward and backward, AdamW), same
model, LoRA rank/alpha/targets, pairs per batch and sequence lengths. Rates are preference pairs per second,
taken between each side's first and last step (loading and the warm-up step left out of both).

    python -m bench.finetune.dpo [--steps 6] [--batch 4] [--words 40] [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import log
from cumulo.finetune import api

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = "the cloud trains a small model on plain text and answers each question in a calm voice".split()


def preference_file(path: Path, n: int, words: int) -> Path:
    """`n` pairs whose two answers are `words` words long each (the same words, in another order)."""
    lines = []
    for i in range(n):
        answer = [VOCAB[(i + j) % len(VOCAB)] for j in range(words)]
        lines.append(
            {
                "input": {"messages": [{"role": "user", "content": f"Question {i}?"}]},
                "preferred_output": [{"role": "assistant", "content": " ".join(answer)}],
                "non_preferred_output": [{"role": "assistant", "content": " ".join(reversed(answer))}],
            }
        )
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def cumulo_rate(model: Path, data: Path, out: Path, batch: int, steps: int, rank: int) -> dict:
    stamps: list[float] = []

    def on_event(event: api.TrainEvent) -> None:
        if event.kind == "step":
            stamps.append(time.perf_counter())

    spec = api.TrainSpec(
        model=model, training_file=data, validation_file=None,
        hyper=api.Hyperparameters(n_epochs=1, batch_size=batch, learning_rate=2e-4, beta=0.1),
        seed=0, output_dir=out, lora_rank=rank, lora_alpha=2 * rank, checkpoint_every=10_000, resume=False,
        method="dpo",
    )  # fmt: skip
    api.train(spec, on_event, lambda: len(stamps) >= steps)
    return {"pairs_s": batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]), "steps": len(stamps)}


def _logps(logits: torch.Tensor, ids: torch.Tensor, answer: int) -> torch.Tensor:
    """[2B] summed log-probs of each row's last `answer` tokens."""
    logps = torch.log_softmax(logits[:, -answer - 1 : -1].float(), dim=-1)
    return logps.gather(2, ids[:, -answer:, None])[..., 0].sum(-1)


def peft_rate(model: Path, batch: int, seq_len: int, answer: int, steps: int, rank: int) -> dict:
    import peft  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    lora = peft.get_peft_model(hf, config).train()
    params = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    ids = torch.randint(1000, 41000, (2 * batch, seq_len), generator=torch.Generator().manual_seed(0))
    stamps = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad(), lora.disable_adapter():
            ref = _logps(lora(input_ids=ids).logits, ids, answer)
        policy = _logps(lora(input_ids=ids).logits, ids, answer)
        ratio = (policy[:batch] - ref[:batch]) - (policy[batch:] - ref[batch:])
        loss = -F.logsigmoid(0.1 * ratio).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        stamps.append(time.perf_counter())
    return {"pairs_s": batch * (steps - 1) / (stamps[-1] - stamps[0]), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune.dpo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--words", type=int, default=40, help="words per answer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both sides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench.finetune.model import smollm2_dir  # noqa: PLC0415
    from cumulo.finetune.data import load_tokenizer  # noqa: PLC0415
    from cumulo.finetune.preference import read_pairs  # noqa: PLC0415

    model = smollm2_dir()
    result: dict = {"model": "SmolLM2-135M (fp32)", "threads": args.threads, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        data = preference_file(Path(tmp) / "prefs.jsonl", args.batch * args.steps, args.words)
        tokenizer, _ = load_tokenizer(model)
        pairs, _ = read_pairs(data, tokenizer, 1024)
        seq_len = round(sum(len(p) for p in pairs) / (2 * len(pairs)))
        answer = round(sum(sum(p.chosen.loss_mask) for p in pairs) / len(pairs))
        rounds = []
        for r in range(args.rounds):
            log(f"round {r + 1}: Cumulo DPO, {args.steps} steps of {args.batch} pairs ...")
            ours = cumulo_rate(model, data, Path(tmp) / f"out-{r}", args.batch, args.steps, 8)
            log(f"round {r + 1}: transformers + PEFT DPO, {args.batch} pairs x 2 x {seq_len} tokens ...")
            ref = peft_rate(model, args.batch, seq_len, answer, args.steps, 8)
            rounds.append({"cumulo": ours, "peft": ref, "ratio": ours["pairs_s"] / ref["pairs_s"]})
    result.update(seq_len=seq_len, answer_tokens=answer, batch=args.batch, rounds=rounds)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
