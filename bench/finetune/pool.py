"""A fine-tuning job trained on a pool node (cluster/finetune_runner.py) against the same job trained in this
process, same model, data, seed and thread count, rounds interleaved:

    python -m bench.finetune.pool [--rounds 2] [--examples 16] [--words 24]

A Ray head with 1 CPU is started on a free port (never 6379) on this machine: the "node" shares the machine, so
the ratio shows what the pool adds to a job (the actor's start, loading the base there, the files and
checkpoints travelling, polling), not a faster machine. Prints wall seconds per run, the ratio pool / local and
the load average; JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, log
from bench.finetune.training import training_file
from cumulo.finetune import api


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(model: Path, data: Path, out: Path) -> api.TrainSpec:
    return api.TrainSpec(
        model=str(model),
        training_file=data,
        validation_file=None,
        hyper=api.Hyperparameters(1, 4, 0.1 * api.BASE_LEARNING_RATE),
        seed=3,
        output_dir=out,
        job_id="bench",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.finetune.pool", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--words", type=int, default=24)
    args = parser.parse_args(argv)
    from bench.finetune.model import smollm2_dir  # noqa: PLC0415
    from cumulo.cluster.finetune_runner import PoolTrainer  # noqa: PLC0415
    from cumulo.cluster.ray_cluster import Head, connect  # noqa: PLC0415

    torch.set_num_threads(1)  # as the actor, which takes one CPU
    model = smollm2_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-ft-pool-"))
    data = training_file(work / "train.jsonl", args.examples, args.words)
    head = Head(port=_free_port(), host="127.0.0.1", name="bench-node", num_cpus=1)
    rows = []
    try:
        connect(head.address)
        trainer = PoolTrainer(num_cpus=1)
        for round_ in range(args.rounds):
            for where in ("local", "pool") if round_ % 2 == 0 else ("pool", "local"):
                out = work / f"{where}-{round_}"
                start = time.perf_counter()
                run = api.train if where == "local" else trainer
                result = run(_spec(model, data, out), lambda event: None, lambda: False)
                seconds = time.perf_counter() - start
                rows.append({"round": round_, "where": where, "seconds": seconds, "steps": result.steps,
                             "tokens": result.trained_tokens, "load": os.getloadavg()[0]})  # fmt: skip
                log(
                    f"round {round_} {where}: {seconds:.1f} s, {result.steps} steps, load {os.getloadavg()[0]:.1f}"
                )
    finally:
        import ray  # noqa: PLC0415

        ray.shutdown()
        head.stop()
    for round_ in range(args.rounds):
        pool, local = (next(r["seconds"] for r in rows if r["round"] == round_ and r["where"] == w)
                       for w in ("pool", "local"))  # fmt: skip
        log(f"round {round_}: pool / local wall time {pool / local:.2f}x (+{pool - local:.1f} s)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "finetune_pool.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
