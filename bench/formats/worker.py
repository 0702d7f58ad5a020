"""Child process of bench.formats: serves one model (one format) and measures decode speed, memory and perplexity.

    python -m bench.formats.worker cumulo --model DIR|GGUF [--dtype float32] [--ppl-tokens 2048] ...
    <anchor venv python> -m bench.formats.worker llama --model GGUF ...

Each format runs in a fresh process so that its peak resident memory (VmHWM) is its own: it is read after the
engine has loaded and decoded, before perplexity allocates its 512-token activations. Perplexity reuses the
served module (the packed weights the decode ran on) rather than loading a second copy. The llama.cpp runner
executes in the anchors' venv, which has no torch: only the standard library is imported at module level.
The last stdout line carries the result as JSON (bench.common.print_result).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import print_result, prompt_token_ids, vm_hwm_mib

# generate(prompt, n) -> seconds from the first generated token to the last, for n greedy tokens (ignore_eos).
Decode = Callable[[list[int], int], float]


def rss_mib() -> dict[str, float]:
    """Current resident memory, split into anonymous (heap: tensors) and file-backed (mapped files, libraries)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024.0
    return out


def best_decode_tok_s(
    decode: Decode, prompt_len: int, tokens: int, repeats: int, budget_s: float
) -> dict[str, float | int]:
    """Tokens after the first over the time after the first (prefill excluded), best of `repeats`.

    A format without a fused kernel can decode at ~1 tok/s; when the warm-up predicts that the runs would take
    longer than `budget_s`, fewer tokens (at least 8) and one run are measured instead, and the result says so.
    """
    warm = decode(prompt_token_ids(8, seed=999), 8)  # warm-up: thread pools, kernel binding, allocator
    per_token = warm / 7
    if per_token * tokens * repeats > budget_s:
        repeats = 1
        tokens = max(8, min(tokens, int(budget_s / per_token)))
    best = float("inf")
    for rep in range(repeats):
        best = min(best, decode(prompt_token_ids(prompt_len, seed=1 + 10 * rep), tokens))
    return {"decode_tok_s": (tokens - 1) / best, "decode_tokens": tokens, "decode_repeats": repeats}


def cumulo_decode(llm: object) -> Decode:
    from cumulo.contracts import SamplingParams  # noqa: PLC0415

    def decode(prompt: list[int], n: int) -> float:
        out = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
        if len(out.token_ids) != n:
            raise RuntimeError(f"asked for {n} tokens with ignore_eos, got {len(out.token_ids)}")
        return out.finished_time - out.first_token_time

    return decode


def weight_bytes(module: object) -> dict[str, float]:
    """Bytes and element counts of the served weights, as held in memory.

    Linear layers: packed codes + scales (PackedLinear) or the dense matrix. Everything else: parameters only
    (the rotary tables are buffers and not weights). SmolLM2 ties lm_head to the embedding, so the embedding
    is counted once, and it is read whole per token (by lm_head); an untied model would be overcounted by it.
    """
    from torch import nn  # noqa: PLC0415

    from cumulo.formats.linear import PackedLinear  # noqa: PLC0415

    seen: set[int] = set()
    linear_bytes = linear_elems = other_bytes = other_elems = 0
    for name, mod in module.named_modules():
        is_linear = isinstance(mod, PackedLinear | nn.Linear) and not name.endswith("lm_head")
        if isinstance(mod, PackedLinear):
            tensors = [t for t in (mod.codes, mod.scales, mod.tensor_scale) if t is not None]
            if id(mod.codes) not in seen:
                seen.add(id(mod.codes))
                linear_bytes += sum(t.numel() * t.element_size() for t in tensors)
                linear_elems += mod.out_features * mod.in_features
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if is_linear and p.dim() == 2:
                linear_bytes += p.numel() * p.element_size()
                linear_elems += p.numel()
            else:
                other_bytes += p.numel() * p.element_size()
                other_elems += p.numel()
    return {
        "linear_bytes": linear_bytes,
        "linear_weights": linear_elems,
        "bytes_per_token": linear_bytes + other_bytes,
        "weights": linear_elems + other_elems,
    }


def perplexity_of(module: object, tokenizer: object, args: argparse.Namespace) -> dict[str, object]:
    """The served module's sliding-window perplexity on the first `ppl_tokens` tokens of the default corpus."""
    from cumulo.evaluation.corpus import python_docs  # noqa: PLC0415
    from cumulo.evaluation.perplexity import perplexity  # noqa: PLC0415

    corpus = python_docs()
    ids = tokenizer.encode(corpus.text)[: args.ppl_tokens]
    r = perplexity(module, ids, context=args.context, stride=args.stride, device="cpu", progress=False)
    return {"perplexity": r.perplexity, "nll": r.nll, "ppl_tokens": r.tokens, "ppl_windows": r.windows,
            "ppl_seconds": r.seconds, "source": corpus.source, "source_sha256": corpus.sha256}  # fmt: skip


def run_cumulo(args: argparse.Namespace) -> dict[str, object]:
    import torch  # noqa: PLC0415

    from cumulo.engine.llm import LLM  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    # A small, equal KV cache for every format: the default (up to 4 GiB) would say nothing about the weights.
    llm = LLM(args.model, device="cpu", dtype=args.dtype, format=args.format, threads=args.threads,
              kv_cache_gib=args.kv_cache_gib, max_model_len=args.max_model_len)  # fmt: skip
    result: dict[str, object] = {"load_seconds": time.perf_counter() - start, "rss_after_load_mib": rss_mib()}
    module = llm.engine.runner.model
    result.update(weight_bytes(module))
    result.update(
        best_decode_tok_s(cumulo_decode(llm), args.prompt, args.tokens, args.repeats, args.budget_s)
    )
    result["peak_rss_mib"] = vm_hwm_mib(os.getpid())
    result["rss_after_decode_mib"] = rss_mib()
    if args.ppl_tokens > 1:
        result.update(perplexity_of(module, llm.tokenizer, args))
    return result


def run_llama(args: argparse.Namespace) -> dict[str, object]:
    from bench.engine.workers import llama_cpp_python_generate  # noqa: PLC0415 - llama_cpp lives there

    generate = llama_cpp_python_generate(Path(args.model), args.threads, args.max_model_len)

    def decode(prompt: list[int], n: int) -> float:
        _, decode_s = generate([prompt], n)
        return decode_s

    result: dict[str, object] = {"rss_after_load_mib": rss_mib()}
    result.update(best_decode_tok_s(decode, args.prompt, args.tokens, args.repeats, args.budget_s))
    result["peak_rss_mib"] = vm_hwm_mib(os.getpid())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.formats.worker", description=__doc__.splitlines()[0]
    )
    parser.add_argument("system", choices=["cumulo", "llama"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--format", help="convert on load (`--format F`) instead of serving a converted checkpoint"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before the timed decode")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per decode run")
    parser.add_argument("--repeats", type=int, default=3, help="decode runs; the best is kept")
    parser.add_argument("--budget-s", type=float, default=60.0, help="cap on the decode runs' predicted time")
    parser.add_argument("--ppl-tokens", type=int, default=0, help="score this many corpus tokens (0: skip)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--kv-cache-gib", type=float, default=0.0625)
    parser.add_argument("--max-model-len", type=int, default=640)
    args = parser.parse_args(argv)
    try:
        result = run_cumulo(args) if args.system == "cumulo" else run_llama(args)
    except Exception as exc:  # noqa: BLE001 - the driver turns a failure into a row, not a crash
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
