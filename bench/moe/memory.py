"""Where a served MoE's resident memory goes, step by step: what `python -m bench.moe` reports as one ratio,
taken apart.

    python -m bench.moe.memory --model bench/.anchors/models/<file>.gguf [--threads 1] [--batches 1,8,16]

After loading and after each decode batch it prints (MiB, all after malloc_trim): RSS, its anonymous and
file-backed parts, glibc's heap in use and its mmapped blocks (mallinfo2), the bytes of the served tensors
and of the KV cache pages touched, and Python's own allocations (tracemalloc). Memory does not depend on the
machine's load, so these figures repeat.
"""

from __future__ import annotations

import argparse
import ctypes
import tracemalloc

from bench.common import prompt_token_ids
from bench.moe.worker import resident_bytes, rss_mib, tensor_bytes, trimmed_rss_mib

MIB = 1 << 20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]  # fmt: skip


def heap_mib() -> tuple[float, float]:
    """(bytes malloc'd and in use on the heap, bytes in mmapped blocks), in MiB, as glibc counts them."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks / MIB, info.hblkhd / MIB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.moe.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--format", default="ue8m0-fp8")
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    from cumulo.contracts import SamplingParams  # noqa: PLC0415
    from cumulo.engine.llm import LLM  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    base = trimmed_rss_mib()
    llm = LLM(args.model, device="cpu", format=args.format, threads=args.threads)
    weights = sum(tensor_bytes(llm.engine.runner.model).values()) / MIB
    kv = llm.engine.kv_cache
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kv.k + kv.v + kv.latent}
    tracemalloc.start()

    def report(when: str) -> None:
        rss = trimmed_rss_mib() - base
        in_use, mapped = heap_mib()
        touched = sum(resident_bytes(a, n) for a, n in storages.items()) / MIB
        py = tracemalloc.get_traced_memory()[0] / MIB
        print(f"{when:>14}: RSS {rss:7.1f} (anon {rss_mib('RssAnon'):7.1f}, file {rss_mib('RssFile'):6.1f}) "
              f"heap in use {in_use:7.1f} mmapped {mapped:7.1f}; weights {weights:6.1f} + KV touched {touched:5.1f}"
              f" = {weights + touched:6.1f}; ratio {rss / (weights + touched):.3f}; Python since load {py:5.1f}")  # fmt: skip

    report("after load")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [prompt_token_ids(args.prompt, seed=7 * batch + i) for i in range(batch)]
        llm.generate(prompts, SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True))
        report(f"after batch {batch}")


if __name__ == "__main__":
    main()
