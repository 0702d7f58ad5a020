"""Does Cumulo read a bench GGUF the way llama.cpp does? Logits at every position of a few prompts, both engines on
the same file, teacher-forced (no sampling, so one near-tie cannot send the two down different paths).

    python -m bench.moe.parity --arch deepseek2     # the bench's random DeepSeek-V3 (written first if missing)
    python -m bench.moe.parity --model FILE.gguf

A layout mistake in either the bench's writer or Cumulo's reader (a transposed k_b, a rotary half swapped, the
wrong routing) moves most logits; what is left when both agree is llama.cpp's Q8_0 activations against
Cumulo's fp32 ones. Prints per prompt the relative error of Cumulo's logits against llama.cpp's, their
correlation, and how often the two pick the same top-1 token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import anchors
from bench.common import log, prompt_token_ids, thread_env

PROMPTS = 4
LENGTH = 48


def llama_logits(model: Path, prompts: list[list[int]], out: Path, threads: int) -> None:
    """Runs in the anchor venv: llama.cpp's logits of every position, saved as out (.npy, [prompts, len, vocab])."""
    from llama_cpp import Llama  # noqa: PLC0415

    anchors.binding_without_repack()
    llm = Llama(model_path=str(model), n_ctx=256, n_threads=threads, logits_all=True, verbose=False)
    rows = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        rows.append(np.array(llm.scores[: len(prompt)], dtype=np.float32))
    np.save(out, np.stack(rows))


def cumulo_logits(model: Path, prompts: list[list[int]]) -> np.ndarray:
    import torch  # noqa: PLC0415

    from cumulo.models.attention import AttentionContext  # noqa: PLC0415
    from cumulo.models.loader import load  # noqa: PLC0415
    from cumulo.models.registry import build_model  # noqa: PLC0415

    loaded = load(model)
    net = build_model(loaded.config, loaded.weights)
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor(prompt)
            hidden = net(ids, torch.arange(len(prompt)), AttentionContext(kv_cache=None))
            rows.append(net.compute_logits(hidden).float().numpy())
    return np.stack(rows)


def compare(ours: np.ndarray, theirs: np.ndarray) -> list[dict]:
    out = []
    for a, b in zip(ours, theirs, strict=True):
        out.append(
            {
                "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                "correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
                "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.moe.parity", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="deepseek2", help="the bench model to check (bench.moe --arch)")
    parser.add_argument("--quick", action="store_true", help="the quick shape of that model")
    parser.add_argument("--model", type=Path, help="any GGUF instead of the bench model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-child", nargs=2, metavar=("PROMPTS_JSON", "OUT_NPY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    prompts = [prompt_token_ids(LENGTH, seed=11 + i) for i in range(PROMPTS)]
    if args.llama_child:
        llama_logits(args.model, json.loads(Path(args.llama_child[0]).read_text()), Path(args.llama_child[1]),
                     args.threads)  # fmt: skip
        return
    model = args.model
    if model is None:
        from bench.moe.__main__ import ensure_model  # noqa: PLC0415
        from bench.moe.spec import ARCHES  # noqa: PLC0415

        shape = ARCHES[args.arch]
        model = ensure_model(shape.quick() if args.quick else shape())
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file, out = Path(tmp) / "prompts.json", Path(tmp) / "llama.npy"
        prompts_file.write_text(json.dumps(prompts))
        log(f"llama.cpp on {model.name} ...")
        cmd = [str(anchors.VENV_PYTHON), "-m", "bench.moe.parity", "--model", str(model), "--threads",
               str(args.threads), "--llama-child", str(prompts_file), str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, env=thread_env(args.threads))
        theirs = np.load(out)
    log("Cumulo (fp32, the file's Q8_0 dequantized) ...")
    ours = cumulo_logits(model, prompts)
    rows = compare(ours, theirs)
    for i, r in enumerate(rows):
        print(f"prompt {i}: relative error {r['relative_error']:.4f}, correlation {r['correlation']:.5f}, "
              f"top-1 agreement {r['top1_agreement']:.3f} over {LENGTH} positions")  # fmt: skip
    print(json.dumps({"model": str(model), "prompts": rows}))


if __name__ == "__main__":
    sys.exit(main())
