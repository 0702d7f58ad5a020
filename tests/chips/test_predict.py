"""The roofline: formats, batch, memory fit, parallelism and MoE behave as the physics says."""

from __future__ import annotations

import pytest

from cumulo.chips.catalog import Chip, Figure
from cumulo.chips.predict import predict
from cumulo.chips.presets import PRESETS, resolve_model
from cumulo.errors import FormatError, InvalidRequest, ModelNotFound
from cumulo.models.config import ModelConfig


def test_fp8_decodes_faster_than_bf16_on_a_bandwidth_bound_chip():
    bf16 = predict("llama-3.1-8b", "bf16", "h100-sxm", batch=1, context=1024)
    fp8 = predict("llama-3.1-8b", "fp8", "h100-sxm", batch=1, context=1024)
    assert bf16.bound == fp8.bound == "memory"
    assert fp8.decode_tok_s > 1.6 * bf16.decode_tok_s


def test_batch_raises_decode_throughput_until_compute_bound():
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    preds = [predict("llama-3.1-8b", "bf16", "h100-sxm", batch=b, context=16) for b in batches]
    rates = [p.decode_tok_s for p in preds]
    memory_bound = [p for p in preds if p.bound == "memory"]
    assert len(memory_bound) >= 5 and preds[-1].bound == "compute"
    for a, b in zip(rates, rates[1:], strict=False):
        assert b >= a * 0.999
    assert rates[-1] / rates[-2] < 1.05  # the plateau: more batch buys nothing once compute-bound
    assert rates[4] > 10 * rates[0]  # and a lot before it


def test_h20_beats_h100_on_decode_but_not_prefill():
    h20 = predict("llama-3.1-8b", "fp8", "h20", batch=1, context=1024)
    h100 = predict("llama-3.1-8b", "fp8", "h100-sxm", batch=1, context=1024)
    assert h20.decode_tok_s > h100.decode_tok_s  # 4.0 vs 3.35 TB/s
    assert h20.prefill_tok_s < 0.2 * h100.prefill_tok_s  # 296 vs 1979 TFLOPS


def test_format_the_chip_lacks_is_emulated_at_compact_traffic():
    fp4 = predict("llama-3.1-8b", "nvfp4", "h100-sxm", batch=1)
    fp8 = predict("llama-3.1-8b", "fp8", "h100-sxm", batch=1)
    assert not fp4.native and fp4.compute_dtype == "fp8"  # FP4 values are exact in E4M3
    assert fp4.decode_tok_s > fp8.decode_tok_s  # fewer bytes per weight
    assert fp4.prefill_tok_s == pytest.approx(fp8.prefill_tok_s, rel=0.02)  # same matmul rate


def test_dequantizing_at_load_costs_the_bandwidth_of_the_compute_dtype():
    fused = predict("llama-3.1-8b", "q4_0", "cpu-avx2-2core", batch=1, emulation="fused")
    at_load = predict("llama-3.1-8b", "q4_0", "cpu-avx2-2core", batch=1, emulation="dequant-at-load")
    assert at_load.decode_tok_s < fused.decode_tok_s
    assert at_load.weights_gb > 3 * fused.weights_gb


def test_model_too_big_for_memory_fits_zero_sequences():
    p = predict("qwen2.5-72b", "bf16", "rtx-4090", batch=1)
    assert p.max_sequences == 0 and not p.fits and p.notes


def test_longer_context_fits_fewer_sequences():
    short = predict("llama-3.1-8b", "bf16", "h100-sxm", context=1024)
    long = predict("llama-3.1-8b", "bf16", "h100-sxm", context=8192)
    assert long.max_sequences < short.max_sequences


def test_tensor_parallel_cuts_tpot_and_pipeline_parallel_keeps_memory_bound_throughput():
    one = predict("qwen2.5-72b", "fp8", "h100-sxm", batch=8, context=1024)
    tp = predict("qwen2.5-72b", "fp8", "h100-sxm", batch=8, context=1024, n_chips=4, parallel="tp")
    pp = predict("qwen2.5-72b", "fp8", "h100-sxm", batch=8, context=1024, n_chips=4, parallel="pp")
    assert tp.tpot_s < 0.5 * one.tpot_s
    assert pp.decode_tok_s == pytest.approx(one.decode_tok_s, rel=0.25)
    assert tp.max_sequences > 4 * one.max_sequences


def test_deepseek_v3_counts_active_experts_and_touches_more_as_batch_grows():
    shape = PRESETS["deepseek-v3"]
    assert shape.weights_read(1) == pytest.approx(shape.active_params)  # 37B with the embedding
    assert shape.weights_read(256) > 0.9 * shape.total_params


def test_energy_and_cost_per_token_fall_with_batch():
    small = predict("llama-3.1-8b", "fp8", "h100-sxm", batch=1)
    big = predict("llama-3.1-8b", "fp8", "h100-sxm", batch=64)
    assert big.joules_per_token < small.joules_per_token
    assert big.usd_per_million_tokens < small.usd_per_million_tokens


def test_a_model_config_is_accepted_and_counted():
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    shape = resolve_model(cfg)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    assert shape.total_params == 2 * per_layer + 2 * 1000 * 64
    assert predict(cfg, "bf16", "h100-sxm").decode_tok_s > 0


def test_unknown_model_format_and_unusable_chip_are_clear_errors():
    with pytest.raises(ModelNotFound):
        predict("no-such-model-xyz", "bf16", "h100-sxm")
    with pytest.raises(FormatError):
        predict("llama-3.1-8b", "fp3", "h100-sxm")
    with pytest.raises(InvalidRequest):
        predict("llama-3.1-8b", "int8", "imx500")


def _host(m1_tflops: float) -> Chip:
    figs = {
        key: Figure(value, "measured", "local-calibration")
        for key, value in {
            "fp32_tflops": 0.1,
            "memory_bandwidth_gbs": 20.0,
            "memory_gb": 16.0,
            "fp32_m1_tflops": m1_tflops,
            "fp32_m4_tflops": 0.02,
            "fp32_m16_tflops": 0.05,
            "fp32_m64_tflops": 0.08,
        }.items()
    }
    return Chip("host", "Host", "local", 2026, "cpu", ("fp32",), figs, achieved=True)


def test_a_calibrated_hosts_measured_skinny_matmul_rate_sets_decode_speed():
    fast, slow = _host(0.010), _host(0.005)
    a = predict("smollm2-135m", "fp32", fast, batch=1, context=64)
    b = predict("smollm2-135m", "fp32", slow, batch=1, context=64)
    # Weights dominate: halving the measured 1-row rate nearly halves decode speed, which a pure roofline
    # (20 GB/s, 0.1 TFLOPS for both hosts) could not show.
    assert b.decode_tok_s < 0.6 * a.decode_tok_s
    assert a.decode_tok_s < 2 * 0.010e12 / (2 * 0.134e9)


def test_a_measured_curve_for_the_format_replaces_the_modelled_dequantization_cost():
    base = _host(0.010)
    slow_packed = {
        f"mxfp4_m{m}_tflops": Figure(0.001, "measured", "local-calibration") for m in (1, 4, 16, 64)
    }
    measured = Chip(
        "host", "Host", "local", 2026, "cpu", ("fp32",), {**base.figures, **slow_packed}, achieved=True
    )
    modelled = predict("smollm2-135m", "mxfp4", base, batch=4, context=64, emulation="dequant-per-step")
    timed = predict("smollm2-135m", "mxfp4", measured, batch=4, context=64, emulation="dequant-per-step")
    assert timed.decode_tok_s < 0.5 * modelled.decode_tok_s
