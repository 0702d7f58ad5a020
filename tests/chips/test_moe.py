"""Mixture-of-experts in the performance model: active vs total, MLA's cache, expert parallelism, published
serving figures (CloudMatrix-Infer on Ascend 910C, DeepSeek's own H800 service) within 25%."""

from __future__ import annotations

import pytest

from cumulo.chips.catalog import get_chip
from cumulo.chips.expert_parallel import (
    EPLayout,
    alltoall_plan,
    distinct,
    nodes_per_token,
    touched_share,
    weight_bytes_per_chip,
)
from cumulo.chips.predict import predict
from cumulo.chips.presets import PRESETS
from cumulo.cli.main import main
from cumulo.errors import InvalidRequest


def test_presets_count_total_and_active_parameters_as_their_makers_state():
    ds, qw = PRESETS["deepseek-v3"], PRESETS["qwen3-30b-a3b"]
    assert ds.total_params == pytest.approx(671e9, rel=0.01)
    assert ds.active_params + ds.embed_params == pytest.approx(
        37e9, rel=0.03
    )  # the makers count the embedding
    assert qw.total_params == pytest.approx(30.5e9, rel=0.01)
    assert qw.active_params + qw.embed_params == pytest.approx(3.3e9, rel=0.03)
    assert (ds.moe_layers, ds.num_experts, ds.experts_per_token) == (58, 256, 8)


def test_mla_caches_the_latent_and_rope_part_not_expanded_keys_and_values():
    assert PRESETS["deepseek-v3"].kv_elems_per_token == 61 * (512 + 64)
    assert PRESETS["qwen3-30b-a3b"].kv_elems_per_token == 48 * 2 * 4 * 128  # GQA: 4 KV heads


def test_distinct_experts_touched_grow_with_tokens_and_saturate():
    shape = PRESETS["deepseek-v3"]
    shares = [touched_share(shape, t) for t in (1, 8, 64, 512, 4096)]
    assert shares[0] == pytest.approx(8 / 256)
    assert all(b > a for a, b in zip(shares, shares[1:], strict=False))
    assert shares[-1] > 0.999


def test_expert_parallelism_splits_experts_but_replicates_the_dense_part():
    shape = PRESETS["deepseek-v3"]
    one = weight_bytes_per_chip(shape, EPLayout(32), 1.0, 2.0)
    many = weight_bytes_per_chip(shape, EPLayout(256), 1.0, 2.0)
    dense = (shape.dense_params - shape.head_params) + 2 * shape.head_params
    assert many < one and many > dense
    assert one - dense == pytest.approx(256 / 32 * shape.expert_size)


def test_the_whole_model_must_fit_even_though_a_token_reads_only_its_experts():
    p = predict("deepseek-v3", "fp8", "h800", batch=8, context=1024, n_chips=8, parallel="ep")
    assert not p.fits and p.max_sequences == 0 and p.notes  # 671 GB of weights on 8 x 80 GB
    q = predict("deepseek-v3", "fp8", "h800", batch=8, context=1024, n_chips=32, parallel="ep")
    assert q.fits and q.active_params < q.total_params / 10


def test_more_tokens_per_chip_cost_more_all_to_all_time():
    kw = {"context": 4096, "n_chips": 144, "parallel": "ep"}
    low = predict("deepseek-v3", "fp8", "h800", batch=144 * 16, **kw)
    high = predict("deepseek-v3", "fp8", "h800", batch=144 * 128, **kw)
    assert high.tpot_s > 2 * low.tpot_s and high.decode_tok_s > 2 * low.decode_tok_s


def test_node_limited_routing_caps_the_nodes_a_token_crosses_the_network_to():
    ds, qw = PRESETS["deepseek-v3"], PRESETS["qwen3-30b-a3b"]
    assert (ds.expert_groups, ds.groups_per_token) == (8, 4)  # DeepSeek-V3 config.json n_group, topk_group
    assert nodes_per_token(ds, 4) == pytest.approx(distinct(4, 8))  # 4 nodes: all eligible
    assert nodes_per_token(ds, 8) <= 4 < distinct(8, 8)  # one group per node: at most 4 nodes (V3 report)
    assert nodes_per_token(qw, 8) == pytest.approx(distinct(8, 8))  # no group limit
    assert nodes_per_token(ds, 4) < ds.experts_per_token


def test_prefill_sends_a_token_once_per_node_and_decode_once_per_expert_on_h800():
    ds, h800 = PRESETS["deepseek-v3"], get_chip("h800")
    kw = {"interconnect_efficiency": 0.7, "latency_s": 0.0}
    pre = alltoall_plan(h800, ds, 32, prefill=True, **kw)
    dec = alltoall_plan(h800, ds, 32, prefill=False, **kw)
    assert (pre.kernel, dec.kernel) == ("high-throughput", "low-latency")
    assert pre.seconds_per_token_byte() < dec.seconds_per_token_byte() / 2
    assert pre.compute_share < 1.0 == dec.compute_share  # normal kernels hold SMs, low-latency ones do not
    one_node = alltoall_plan(h800, ds, 8, prefill=True, **kw)  # NVLink only
    assert len(one_node.links) == 1 and one_node.seconds_per_token_byte() < pre.seconds_per_token_byte()


def test_expert_parallelism_refuses_a_dense_model():
    with pytest.raises(InvalidRequest):
        predict("llama-3.1-8b", "bf16", "h100-sxm", n_chips=8, parallel="ep")


# Published serving figures and their conditions (sources and derivations in docs/chips.md).
CLOUDMATRIX_DECODE = [  # (batch per NPU, mean KV length, published decode tok/s per NPU)
    (128, 1024 + 512, 2733),
    (112, 2048 + 128, 2360),
    (96, 4096 + 128, 1943),
    (24, 4096 + 128, 974),
    (8, 4096 + 128, 538),
]


@pytest.mark.parametrize(("batch", "kv", "published"), CLOUDMATRIX_DECODE)
def test_cloudmatrix_infer_decode_per_npu_within_25_percent(batch, kv, published):
    p = predict(
        "deepseek-v3", "int8", "ascend-910c", batch=batch * 160, context=kv, n_chips=160, parallel="ep",
        redundant_experts=32, mtp_tokens=1, mtp_acceptance=0.7,
    )  # fmt: skip
    assert p.fits
    assert 0.75 <= p.decode_tok_s / 160 / published <= 1.25


def test_cloudmatrix_infer_prefill_per_npu_within_25_percent():
    p = predict("deepseek-v3", "int8", "ascend-910c", batch=4 * 16, context=4096, n_chips=16, parallel="ep")
    assert 0.75 <= p.prefill_tok_s / 16 / 6688 <= 1.25


def test_deepseek_h800_decode_per_node_within_25_percent():
    # 14.8k output tok/s per 8-GPU node, EP144, FP8, mean KV 4,989, 20-22 tok/s per user (TPOT ~47.6 ms).
    p = predict(
        "deepseek-v3", "fp8", "h800", batch=88 * 144, context=4989, n_chips=144, parallel="ep",
        redundant_experts=32, mtp_tokens=1, mtp_acceptance=0.85,
    )  # fmt: skip
    assert 0.75 <= p.decode_tok_s / 144 * 8 / 14_800 <= 1.25
    assert p.tpot_s < 0.050


def test_deepseek_h800_prefill_per_node_is_an_upper_bound_on_the_published_day_average():
    # Published: 73.7k input tok/s per node incl. 56.3% cache hits = 32.2k computed; EP32 on 4 nodes (32
    # redundant experts), 16K tokens per GPU as 4 x 4K prompts (DeepSeek's profile-data setting). The physical
    # model over-predicts (docs/chips.md: not within 25%); this guards the direction and the size of the gap.
    p = predict(
        "deepseek-v3",
        "fp8",
        "h800",
        batch=4 * 32,
        context=4096,
        n_chips=32,
        parallel="ep",
        redundant_experts=32,
    )
    assert 1.0 <= p.prefill_tok_s / 32 * 8 / 32_200 <= 1.75


def test_cli_predict_shows_active_and_total_parameters(capsys):
    assert main(["chips", "predict", "qwen3-30b-a3b", "--chip", "h100-sxm", "--format", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "3.0B active of 30.5B" in out
