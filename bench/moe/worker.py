"""Child process of bench.moe: one system's measurement, in a fresh process so its memory is its own.

    python -m bench.moe.worker baseline                       # torch + Cumulo's engine imported, no model
    python -m bench.moe.worker cumulo --model GGUF [--format ue8m0-fp8] [--dtype auto] --batches 1,8,16

`cumulo` reports decode tok/s per batch size (tokens after each sequence's first, over the time from the last
first token to the last finished one), the bytes of every stored tensor as served (for the active-bytes roof),
the KV cache's bytes, and resident memory. The last stdout line is the JSON result (bench.common.print_result).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.common import print_result, prompt_token_ids, vm_hwm_mib


def rss_mib(key: str = "VmRSS") -> float:
    """Resident memory now (VmRSS), or its anonymous (RssAnon: heap, tensors) or file-backed (RssFile) part."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {key} in /proc/self/status")


def trimmed_rss_mib() -> float:
    """RSS after glibc hands freed heap back to the OS (malloc_trim): what the load's transients leave behind
    only because the allocator keeps them, told apart from memory still in use."""
    import ctypes  # noqa: PLC0415

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mib()


def _runtime(threads: int) -> None:
    """Imports and wakes what every run pays for before a model exists: torch, its thread pool, the engine."""
    import torch  # noqa: PLC0415

    import cumulo.engine.llm  # noqa: F401, PLC0415

    torch.set_num_threads(threads)
    torch.ones(256, 256) @ torch.ones(256, 256)  # starts the OpenMP pool and the BLAS


def resident_bytes(address: int, nbytes: int) -> int:
    """Bytes of [address, address + nbytes) that are in RAM (mincore): the KV cache is allocated untouched on
    CPUs, so only the blocks a run wrote to are resident, and those are what the memory target counts."""
    import ctypes  # noqa: PLC0415

    page = os.sysconf("SC_PAGE_SIZE")
    start = address - address % page
    pages = (address + nbytes - start + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec) * page


def tensor_bytes(module: object) -> dict[str, int]:
    """Bytes of each stored tensor of the served module, by Hugging Face name, each storage counted once (a tied
    lm_head is the embedding). A PackedLinear counts its codes, scales and tensor scale."""
    from cumulo.formats.linear import PackedLinear  # noqa: PLC0415

    seen: set[int] = set()
    out: dict[str, int] = {}
    for name, mod in module.named_modules():
        tensors = []
        if isinstance(mod, PackedLinear):
            tensors = [t for t in (mod.codes, mod.scales, mod.tensor_scale) if t is not None]
        tensors += list(mod.parameters(recurse=False))  # not other buffers: rotary tables are not weights
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key in seen or t.numel() == 0:
                continue
            seen.add(key)
            out[f"{name}.{len(out)}"] = t.untyped_storage().nbytes()
    return out


def run_cumulo(args: argparse.Namespace) -> dict[str, object]:
    _runtime(args.threads)
    from cumulo.contracts import SamplingParams  # noqa: PLC0415
    from cumulo.engine.llm import LLM  # noqa: PLC0415

    before_load = rss_mib()
    start = time.perf_counter()
    llm = LLM(args.model, device="cpu", dtype=args.dtype, format=args.format, threads=args.threads,
              kv_cache_gib=args.kv_cache_gib, max_model_len=args.max_model_len)  # fmt: skip
    result: dict[str, object] = {"load_s": time.perf_counter() - start, "rss_before_load_mib": before_load}
    module = llm.engine.runner.model
    result["dtype"] = str(next(module.parameters()).dtype).removeprefix("torch.")
    result["tensor_bytes"] = tensor_bytes(module)
    kv = llm.engine.kv_cache
    kv_tensors = kv.k + kv.v + kv.latent
    kv_storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kv_tensors}
    result["kv_allocated_bytes"] = sum(kv_storages.values())
    result["rss_after_load_mib"] = rss_mib()

    def decode(batch: int, n: int, seed: int) -> float:
        prompts = [prompt_token_ids(args.prompt, seed=seed + i) for i in range(batch)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        if any(len(o.token_ids) != n for o in outs):
            raise RuntimeError(
                f"asked for {n} tokens with ignore_eos, got {[len(o.token_ids) for o in outs]}"
            )
        span = max(o.finished_time for o in outs) - max(o.first_token_time for o in outs)
        return batch * (n - 1) / span

    decode(1, 4, seed=999)  # warm-up: kernels bound, pools started, allocator primed
    result["decode_tok_s"] = {
        str(b): max(decode(b, args.tokens, seed=100 * rep + 1000 * b) for rep in range(args.repeats))
        for b in (int(x) for x in args.batches.split(","))
    }
    result["rss_after_decode_mib"] = rss_mib()
    result["kv_touched_bytes"] = sum(resident_bytes(a, n) for a, n in kv_storages.items())
    result["rss_anon_mib"], result["rss_file_mib"] = rss_mib("RssAnon"), rss_mib("RssFile")
    result["peak_rss_mib"] = vm_hwm_mib(os.getpid())
    result["rss_after_trim_mib"] = trimmed_rss_mib()
    return result


def run_baseline(args: argparse.Namespace) -> dict[str, object]:
    _runtime(args.threads)
    return {
        "rss_mib": rss_mib(),
        "peak_rss_mib": vm_hwm_mib(os.getpid()),
        "rss_after_trim_mib": trimmed_rss_mib(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.moe.worker", description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=["cumulo", "baseline"])
    parser.add_argument("--model")
    parser.add_argument("--format", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-gib", type=float, default=0.0625)
    parser.add_argument("--max-model-len", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        result = run_cumulo(args) if args.system == "cumulo" else run_baseline(args)
    except Exception as exc:  # noqa: BLE001 - the driver turns a failure into a row, not a crash
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
