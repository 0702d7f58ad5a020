"""Fine-tuning and multi-LoRA serving benchmarks (issue #14), ratios measured in one run:

    python -m bench.finetune            # SmolLM2-135M (fp32 HF copy of the catalog GGUF), all three parts
    python -m bench.finetune --quick    # fewer rounds and steps: a smoke run
    python -m bench.finetune --only serving|training|latency
    python -m bench.finetune --only serving --max-tokens 16 --rounds 3   # shorter rounds on a loaded machine

1. serving: output tok/s of one batch spread over 8 adapters vs the base alone (target >= 0.7x);
2. latency: seconds from a job's success to the first answered request for its ft: model (gateway, worker);
3. training: tokens/s of Cumulo's trainer vs a plain transformers + PEFT loop, same batch and length (>= 1.0x).
The machine is shared: the load average is printed beside the figures. JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["serving", "training", "latency"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="serving: requests in the batch")
    parser.add_argument("--max-tokens", type=int, help="serving: tokens per request (default 48, quick 16)")
    parser.add_argument(
        "--rounds", type=int, help="serving and training: interleaved rounds (default 3, quick 1)"
    )
    parser.add_argument(
        "--train-steps", type=int, help="training: steps per side per round (default 12, quick 3)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench.finetune import latency, serving, training  # noqa: PLC0415
    from bench.finetune.model import smollm2_dir  # noqa: PLC0415

    model = smollm2_dir()
    result: dict = {"model": "SmolLM2-135M (fp32)", "threads": args.threads, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        work = Path(tmp)
        if args.only in (None, "serving"):
            log("serving: 8 adapters vs the base ...")
            result["serving"] = serving.measure(
                model,
                work / "adapters",
                args.batch,
                8,
                8,
                32,
                args.max_tokens or (16 if args.quick else 48),
                args.rounds or (1 if args.quick else 3),
            )
        words = 40
        data = training.training_file(work / "train.jsonl", 64, words)
        if args.only in (None, "latency"):
            log("latency: job success -> first answer through a live gateway ...")
            small = training.training_file(work / "small.jsonl", 4, 8)
            result["latency"] = latency.measure(model, small, work / "gateway")
        if args.only in (None, "training"):
            steps = args.train_steps or (3 if args.quick else 12)
            batch = 2 if args.quick else 4
            rounds: list[dict] = []
            for r in range(args.rounds or (1 if args.quick else 3)):  # interleaved: a burst of load hits both
                log(f"training round {r}: Cumulo's trainer, {steps} steps of {batch} ...")
                ours = training.cumulo_rate(model, data, work / f"train-out-{r}", batch, steps, 8)
                seq_len = round(ours["tokens_per_step"] / batch)
                log(
                    f"training round {r}: transformers + PEFT, {steps} steps of {batch} x {seq_len} tokens ..."
                )
                ref = training.peft_rate(model, batch, seq_len, steps, 8)
                rounds.append({"cumulo": ours, "peft": ref, "seq_len": seq_len, "batch": batch,
                               "ratio": ours["tok_s"] / ref["tok_s"], "load": os.getloadavg()[0]})  # fmt: skip
                log(f"training round {r}: Cumulo/PEFT {rounds[-1]['ratio']:.2f}x")
            ratios = sorted(x["ratio"] for x in rounds)
            result["training"] = {"rounds": rounds, "ratio": ratios[len(ratios) // 2]}  # the median round
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"finetune-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
