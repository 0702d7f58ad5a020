"""Placement: what fits (weights plus the cache the engine will allocate), which format each chip runs, replicas
spread over nodes, goodput under the SLO, corrections from measured speed, and the first-fit baseline."""

from __future__ import annotations

import pytest
import torch

from cumulo.chips.predict import predict
from cumulo.cluster.placement import (
    Corrections,
    DeploymentSpec,
    NodeSpec,
    PlacementError,
    binpack,
    place,
)
from cumulo.engine.kv_sizing import plan_kv_cache
from cumulo.engine.llm_engine import EngineConfig
from cumulo.errors import InvalidRequest
from cumulo.platform.cpu import CpuPlatform
from tests.support.tiny import tiny_config

LLAMA = "llama-3.1-8b"


def test_the_cache_placed_is_the_cache_the_engine_allocates_for_those_bytes() -> None:
    cfg = tiny_config(max_position_embeddings=4096, name="tiny")
    (p,) = place(
        DeploymentSpec(cfg, prompt_tokens=100, output_tokens=28), [NodeSpec("n", "cpu-avx2-2core", 1, 0.01)]
    )
    assert (p.chip, p.format) == ("cpu-avx2-2core", "fp32")  # fp32 computes, and caches, in fp32
    engine = plan_kv_cache(cfg, torch.float32, EngineConfig(kv_cache_gib=p.kv_cache_gib), CpuPlatform())
    block_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * engine.block_size * 4
    assert engine.num_blocks * block_bytes == p.kv_cache_bytes == round(p.kv_gb * 1e9)
    assert (engine.max_model_len, engine.block_size) == (p.max_model_len, p.kv_block_size)
    assert p.weights_gb + p.kv_gb <= 0.01
    assert p.max_sequences == min(engine.num_blocks // (128 // 16), EngineConfig().max_num_seqs)


def test_a_model_that_fits_nowhere_says_which_node_lacked_what() -> None:
    nodes = [NodeSpec("small-gpu", "rtx-4090", 1, 8.0), NodeSpec("laptop", "cpu-avx2-2core", 1, 16.0)]
    with pytest.raises(PlacementError) as err:
        place(DeploymentSpec(LLAMA), nodes)
    msg = str(err.value)
    assert "small-gpu (rtx-4090, fp8): weights 9.1 GB" in msg and "do not fit in 8.0 GB free" in msg
    assert "laptop (cpu-avx2-2core, fp32): weights 32.1 GB" in msg
    with pytest.raises(PlacementError, match="no node has chip 'ascend-910b'"):
        place(DeploymentSpec(LLAMA, chip="ascend-910b"), nodes)


def test_memory_already_used_on_a_node_is_not_offered_again() -> None:
    nodes = [NodeSpec("a", "h100-sxm", 1, 80.0), NodeSpec("b", "a100", 1, 80.0)]
    assert place(DeploymentSpec(LLAMA), nodes)[0].node == "a"
    assert place(DeploymentSpec(LLAMA), nodes, used={"a": 75.0})[0].node == "b"


def test_each_chip_gets_a_format_it_runs_natively() -> None:
    nodes = [NodeSpec("hopper", "h100-sxm", 1, 80.0), NodeSpec("ascend", "ascend-910b", 1, 64.0)]
    on = {p.node: p for p in place(DeploymentSpec(LLAMA, replicas=2), nodes)}
    assert on["hopper"].format == "fp8"
    assert on["ascend"].format == "int8" and "ascend-910b has no fp8: int8 chosen" in on["ascend"].reason
    (cpu,) = place(DeploymentSpec(LLAMA), [NodeSpec("cpu", "cpu-avx512-32core", 1, 200.0)])
    assert cpu.format == "bf16"  # its fastest native format
    (asked,) = place(DeploymentSpec(LLAMA, format="fp8"), [nodes[1]])
    assert asked.format == "fp8" and "emulated: ascend-910b has no native fp8" in asked.reason


def test_replicas_go_to_different_nodes_and_share_only_when_nothing_else_fits() -> None:
    nodes = [NodeSpec(f"n{i}", "a100", 1, 80.0) for i in range(3)]
    spread = place(DeploymentSpec(LLAMA, replicas=3, ttft_slo_ms=500), nodes)
    assert sorted(p.node for p in spread) == ["n0", "n1", "n2"]
    assert not any("shares" in p.reason for p in spread)
    crowded = place(DeploymentSpec(LLAMA, replicas=3, ttft_slo_ms=500), nodes[:2])
    assert len({p.node for p in crowded}) == 2
    assert "no other node fits" in crowded[2].reason and f"shares node {crowded[2].node}" in crowded[2].reason
    again = place(DeploymentSpec(LLAMA, ttft_slo_ms=500), nodes, hosting=("n0", "n1"))
    assert again[0].node == "n2"  # re-placing a lost replica avoids the nodes that still run one
    with pytest.raises(PlacementError, match="replica 2 of 2 .*the replicas before it took the room"):
        place(DeploymentSpec(LLAMA, replicas=2), [NodeSpec("one", "a100", 1, 12.0)])


def test_binpack_fills_the_first_node_that_fits_in_the_checkpoints_format() -> None:
    nodes = [NodeSpec("cpu", "cpu-avx512-32core", 1, 250.0), NodeSpec("gpu", "h100-sxm", 1, 80.0)]
    packed = binpack(DeploymentSpec(LLAMA, replicas=2, ttft_slo_ms=500), nodes)
    assert [(p.node, p.format) for p in packed] == [("cpu", "bf16"), ("cpu", "bf16")]
    placed = place(DeploymentSpec(LLAMA, replicas=2, ttft_slo_ms=500), nodes)
    assert {p.node for p in placed} == {"cpu", "gpu"}
    total = sum(p.predicted_goodput_tok_s for p in placed)
    assert total > sum(p.predicted_goodput_tok_s for p in packed)


def _meets(p, ttft_ms: float | None, tpot_ms: float | None, batch: int) -> bool:
    first = predict(LLAMA, p.format, p.chip, batch, 512)
    full = predict(LLAMA, p.format, p.chip, batch, 640)
    return (ttft_ms is None or first.ttft_s * 1e3 <= ttft_ms) and (
        tpot_ms is None or full.tpot_s * 1e3 <= tpot_ms
    )


def test_goodput_is_the_largest_batch_that_meets_the_slo_and_the_best_node_under_it_wins() -> None:
    nodes = [NodeSpec("roomy", "h20", 1, 90.0), NodeSpec("quick", "a100", 1, 30.0)]
    # Without an SLO the H20's memory holds the larger batch; a tight TTFT needs the A100's faster prefill.
    (free,) = place(DeploymentSpec(LLAMA), nodes)
    (tight,) = place(DeploymentSpec(LLAMA, ttft_slo_ms=100, tpot_slo_ms=20), nodes)
    assert (free.node, tight.node) == ("roomy", "quick")
    assert tight.predicted_ttft_ms <= 100 and tight.predicted_tpot_ms <= 20
    assert _meets(tight, 100, 20, tight.max_sequences) and not _meets(tight, 100, 20, tight.max_sequences + 1)
    assert tight.predicted_goodput_tok_s == pytest.approx(tight.max_sequences / tight.predicted_tpot_ms * 1e3)
    for chip in ("h20", "a100"):  # the winner beats each node alone
        (alone,) = place(DeploymentSpec(LLAMA, ttft_slo_ms=100, tpot_slo_ms=20, chip=chip), nodes)
        assert tight.predicted_goodput_tok_s >= alone.predicted_goodput_tok_s
    # The cache is sized for the batch the SLO allows, leaving the rest of the node to others.
    assert tight.kv_gb < free.kv_gb


def test_no_node_meeting_the_slo_is_said_and_scores_zero_goodput() -> None:
    (p,) = place(DeploymentSpec(LLAMA, ttft_slo_ms=1), [NodeSpec("cpu", "cpu-avx512-32core", 1, 200.0)])
    assert p.predicted_goodput_tok_s == 0 and "no fitting node meets the SLO" in p.reason


def test_measured_speed_moves_a_replica_off_a_chip_slower_than_predicted() -> None:
    nodes = [NodeSpec("h100", "h100-sxm", 1, 80.0), NodeSpec("h20", "h20", 1, 90.0)]
    dep = DeploymentSpec(LLAMA, format="fp8", ttft_slo_ms=300)
    assert place(dep, nodes)[0].node == "h100"
    corrections = Corrections(alpha=0.5)
    corrections.record(LLAMA, "h100-sxm", "fp8", measured=100.0, predicted=400.0)
    assert corrections.factor(LLAMA, "h100-sxm", "fp8") == 0.25
    assert corrections.record(LLAMA, "h100-sxm", "fp8", measured=200.0, predicted=400.0) == 0.375  # EWMA
    assert corrections.factor(LLAMA, "h20", "fp8") == 1.0
    assert place(dep, nodes, corrections=corrections)[0].node == "h20"


def test_a_model_too_large_for_one_device_is_split_over_the_fewest_devices_of_one_node() -> None:
    big = DeploymentSpec("llama-3.1-70b", format="bf16")  # 141 GB of weights
    (p,) = place(big, [NodeSpec("dgx", "h100-sxm", 8, 80.0)])
    assert p.devices == 2 and "split over 2 devices" in p.reason
    with pytest.raises(PlacementError, match="no chip-to-chip bandwidth .* not over nodes"):
        place(big, [NodeSpec("cpus", "cpu-avx2-2core", 8, 24.0)])


def test_a_checkpoint_stored_in_a_compact_format_is_placed_and_loaded_as_stored(tmp_path) -> None:
    """A converted checkpoint's bytes are its stored format's, not bf16's: placement sizes it so, says so, its
    replica loads it without converting, and another compact format for it is refused in one line."""
    from cumulo.cli.main import main
    from cumulo.cluster.controller import LiveNode, engine_options_for
    from tests.support.pipeline import write_llama_dir

    source = write_llama_dir(tmp_path / "source", layers=4, vocab=64)
    out = tmp_path / "fp8"
    assert main(["convert", str(source), "-f", "ue8m0-fp8", "-o", str(out)]) == 0
    nodes = [NodeSpec("cpu", "cpu-avx2-2core", 1, 4.0)]
    spec = lambda model, **kw: DeploymentSpec(model, prompt_tokens=64, output_tokens=32, **kw)  # noqa: E731
    (plain,) = place(spec(str(source)), nodes)
    (packed,) = place(spec(str(out)), nodes)
    assert packed.format == "ue8m0-fp8" and "as stored" in packed.reason
    assert plain.format != "ue8m0-fp8" and packed.weights_gb < plain.weights_gb
    node = LiveNode("id", "cpu", "cpu-avx2-2core", 1, 4.0, 2, 2.0, {"cumulo-kind": "cpu"})
    assert "format" not in engine_options_for(packed, node, stored="ue8m0-fp8")  # loads the packed weights
    assert engine_options_for(packed, node)["format"] == "ue8m0-fp8"  # a plain source is converted
    (as_bf16,) = place(spec(str(out), format="bf16"), nodes)  # a dtype for what is not packed
    assert as_bf16.format == "bf16"
    with pytest.raises(InvalidRequest, match="stored in ue8m0-fp8: deploy it as stored"):
        place(spec(str(out), format="mxfp4"), nodes)
