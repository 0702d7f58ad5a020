"""Benchmark of decode attention: the fused CPU kernel against the engine's PyTorch path, in the same run.

    python -m bench.engine.attention [--batch 1,16,64] [--context 128,512,2048] [--dtype fp32,bf16] [--threads N]

Shapes are SmolLM2-135M's (9 heads, 3 kv heads, head_dim 64, block 16), one layer. For each batch, context and
cache dtype it times `cumulo.models.attention._decode` (the anchor: gather + matmul + mask + softmax + matmul,
with the mask prebuilt as the engine does once per step) and `paged_decode_attention`, each the best of several
rounds timed in turn, and prints the milliseconds, the kernel's speed-up and the GB/s of K/V it reads. Block
tables are shuffled so blocks are scattered as in a long-running server. Never gates CI.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import best_interleaved
from cumulo.models.attention import AttentionContext, KVCache, _decode
from cumulo.platform.kernels import available, paged_decode_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _case(batch: int, context: int, dtype: torch.dtype) -> tuple[AttentionContext, torch.Tensor]:
    blocks_per_seq = -(-context // BLOCK)
    num_blocks = batch * blocks_per_seq + 8
    cache = KVCache(1, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype, "cpu")
    cache.k[0].normal_()
    cache.v[0].normal_()
    tables = torch.randperm(num_blocks)[: batch * blocks_per_seq].view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int64)
    ctx = AttentionContext(
        kv_cache=cache, num_decode=batch, decode_block_tables=tables, decode_context_lens=lens
    )
    q = torch.randn(batch, HEADS, HEAD_DIM).to(dtype)
    return ctx, q


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine.attention", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batch", default="1,16,64")
    parser.add_argument("--context", default="128,512,2048")
    parser.add_argument("--dtype", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per case")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"threads={torch.get_num_threads()}  heads={HEADS} kv_heads={KV_HEADS} head_dim={HEAD_DIM} block={BLOCK}"
    )
    print(
        f"{'dtype':5} {'batch':>5} {'context':>7} {'torch ms':>9} {'kernel ms':>9} {'speed-up':>8} {'GB/s':>6}"
    )
    scale = HEAD_DIM**-0.5
    for dname in args.dtype.split(","):
        dtype = DTYPES[dname]
        if not available(dtype, "cpu"):
            print(f"{dname}: kernel not available here")
            continue
        for batch in map(int, args.batch.split(",")):
            for context in map(int, args.context.split(",")):
                ctx, q = _case(batch, context, dtype)
                cache = ctx.kv_cache
                assert cache is not None
                k, v = cache.k[0], cache.v[0]
                tables, lens = ctx.decode_block_tables, ctx.decode_context_lens

                def torch_path(q=q, ctx=ctx) -> object:
                    return _decode(q, ctx, 0, scale, None)

                def kernel(q=q, k=k, v=v, tables=tables, lens=lens) -> object:
                    return paged_decode_attention(q, k, v, tables, lens, scale, None)

                best = best_interleaved({"torch": torch_path, "kernel": kernel}, 3, args.budget)
                kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * k.element_size()
                print(
                    f"{dname:5} {batch:5} {context:7} {best['torch'] * 1e3:9.3f} {best['kernel'] * 1e3:9.3f} "
                    f"{best['torch'] / best['kernel']:7.1f}x {kv_bytes / best['kernel'] / 1e9:6.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
