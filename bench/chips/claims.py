"""Part 1 of the perf-model check: the model's answer to each claim of the brief, next to the claim and its source."""

from __future__ import annotations

from cumulo.chips.catalog import load_catalog
from cumulo.chips.predict import predict


def _row(label: str, claim: str, model: str, source: str) -> None:
    print(f"  {label:<50} claim {claim:<20} model {model:<26} [{source}]")


def claims() -> None:
    cat = load_catalog(include_local=False)
    nvl, cm = cat.get("gb200-nvl72"), cat.get("cloudmatrix-384")
    print("CloudMatrix 384 vs GB200 NVL72 (rack totals; claim: SemiAnalysis 2025-04-16, reported)")
    for key, claim in [
        ("bf16_tflops", "~1.7x"),
        ("memory_gb", "3.6x"),
        ("memory_bandwidth_gbs", "2.1x"),
        ("power_w", "3.9x"),
    ]:
        _row(f"{key} ratio", claim, f"{cm.get(key) / nvl.get(key):.2f}x", "catalog figures")
    w_per_pf = (cm.power_w / cm.get("bf16_tflops")) / (nvl.power_w / nvl.get("bf16_tflops"))
    _row("power per BF16 FLOP", "2.3x worse", f"{w_per_pf:.2f}x worse", "derived")
    a = predict("deepseek-v3", "int8", "cloudmatrix-384", batch=384 * 96, context=4096)
    b = predict("deepseek-v3", "fp8", "gb200-nvl72", batch=72 * 96, context=4096)
    _row(
        "DeepSeek-V3 decode tok/s per rack (96 seq/chip)",
        "-",
        f"{a.decode_tok_s / b.decode_tok_s:.2f}x",
        "roofline, rack as one device",
    )
    _row(
        "DeepSeek-V3 decode tokens per joule",
        "-",
        f"{b.joules_per_token / a.joules_per_token:.2f}x",
        "CM int8 vs NVL72 fp8",
    )

    print(
        "\nAscend 910C vs H100 on DeepSeek decode (claim: '~60% of H100', an X post relayed by the press: reported)"
    )
    kw = {"batch": 64, "context": 4096, "n_chips": 16}
    h100 = predict("deepseek-v3", "fp8", "h100-sxm", **kw)
    c910 = predict("deepseek-v3", "int8", "ascend-910c", **kw)
    c910_bf16 = predict("deepseek-v3", "bf16", "ascend-910c", batch=64, context=4096, n_chips=16)
    _row(
        "decode tok/s, 16 chips TP, batch 64",
        "~0.6x",
        f"{c910.decode_tok_s / h100.decode_tok_s:.2f}x",
        "910C int8 vs H100 fp8",
    )
    _row(
        "  same, 910C in bf16 (no fp8 on 910C)",
        "~0.6x",
        f"{c910_bf16.decode_tok_s / h100.decode_tok_s:.2f}x",
        f"bf16 fits: {c910_bf16.fits}",
    )
    big = {"batch": 1024, "context": 2048, "n_chips": 16}
    h100c = predict("deepseek-v3", "fp8", "h100-sxm", **big)
    c910c = predict("deepseek-v3", "bf16", "ascend-910c", **big)
    _row(
        "  batch 1024, context 2048, 910C bf16",
        "~0.6x",
        f"{c910c.decode_tok_s / h100c.decode_tok_s:.2f}x",
        f"bounds {c910c.bound}/{h100c.bound}",
    )

    print(
        "\nH20 vs H100 (no public claim figure; the physics: bandwidth 4.0 vs 3.35 TB/s, FP8 296 vs 1979 TFLOPS)"
    )
    d20 = predict("llama-3.1-8b", "fp8", "h20", batch=1, context=2048)
    d100 = predict("llama-3.1-8b", "fp8", "h100-sxm", batch=1, context=2048)
    _row(
        "decode tok/s, llama-3.1-8b fp8, batch 1",
        "H20 faster (BW)",
        f"{d20.decode_tok_s / d100.decode_tok_s:.2f}x",
        f"bound {d20.bound}",
    )
    _row(
        "prefill tok/s, same",
        "H20 ~15% (compute)",
        f"{d20.prefill_tok_s / d100.prefill_tok_s:.2f}x",
        f"bound {d20.prefill_bound}",
    )

    print("\nCloudMatrix-Infer, DeepSeek-R1 per NPU (Huawei, arXiv 2506.12708: vendor-published)")
    dec = predict(
        "deepseek-v3", "int8", "ascend-910c", batch=160 * 96, context=4096 + 128, n_chips=160, parallel="ep",
        redundant_experts=32, mtp_tokens=1, mtp_acceptance=0.7,
    )  # fmt: skip
    pre = predict("deepseek-v3", "int8", "ascend-910c", batch=16 * 4, context=4096, n_chips=16, parallel="ep")
    _row(
        "decode tok/s per NPU (<50 ms TPOT)",
        "1,943",
        f"{dec.decode_tok_s / 160:,.0f} (TPOT {dec.tpot_s * 1e3:.0f} ms)",
        "EP320 on 160 NPUs, MTP",
    )
    _row("prefill tok/s per NPU", "6,688", f"{pre.prefill_tok_s / 16:,.0f}", "EP32 on 16 NPUs")

    print("\nDeepSeek-V3/R1 on H800, per 8-GPU node (DeepSeek Open Source Week day 6: vendor-published)")
    h_dec = predict(
        "deepseek-v3", "fp8", "h800", batch=88 * 144, context=4989, n_chips=144, parallel="ep",
        redundant_experts=32, mtp_tokens=1, mtp_acceptance=0.85,
    )  # fmt: skip
    # Day 6's mean prompt (about 4,383 tokens) with its 56.3% cache hits: ~16K computed tokens per GPU.
    h_pre = predict(
        "deepseek-v3", "fp8", "h800", batch=274, context=4383, cached_context=2468, n_chips=32, parallel="ep",
        redundant_experts=32,
    )  # fmt: skip
    _row(
        "decode tok/s per node",
        "14.8k",
        f"{h_dec.decode_tok_s / 144 * 8 / 1e3:.1f}k (TPOT {h_dec.tpot_s * 1e3:.0f} ms)",
        "EP144, MTP",
    )
    _row(
        "prefill computed tok/s per node",
        "32.2k (73.7k incl. cache hits)",
        f"{h_pre.prefill_tok_s / 32 * 8 / 1e3:.1f}k",
        f"EP32, 56.3% cached, paired micro-batches, bound {h_pre.prefill_bound}",
    )

    print("\nAscend 910B vs A100 (claim: '~80% of A100 training efficiency', Huawei 2024)")
    _row(
        "BF16 peak ratio",
        "~0.8x",
        f"{cat.get('ascend-910b').get('bf16_tflops') / cat.get('a100').get('bf16_tflops'):.2f}x",
        "910B figure reported, SKU-dependent",
    )
