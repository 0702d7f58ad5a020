"""Placement of a model no single node holds: split over the fewest nodes that hold it together, layers in
proportion to each node's predicted speed, every stage with the same KV blocks; the controller then starts a
split replica (stage nodes, weights, blocks) instead of failing, and says why."""

from __future__ import annotations

import pytest

from cumulo.chips.predict import predict
from cumulo.cluster.controller import Wanted
from cumulo.cluster.placement import DeploymentSpec, NodeSpec, PlacementError, place
from tests.support.controller_fakes import Rig, node
from tests.support.pipeline import write_llama_dir
from tests.support.tiny import tiny_config

CFG = tiny_config("llama", num_hidden_layers=12, hidden_size=256, intermediate_size=1024, vocab_size=4096)
DEP = DeploymentSpec(CFG, format="fp32", prompt_tokens=128, output_tokens=64)


def weights_gb(chip: str) -> float:
    return predict(CFG, "fp32", chip, 1, 192, 1).weights_gb


def test_a_model_no_node_holds_is_split_over_the_fewest_nodes_that_hold_it() -> None:
    w = weights_gb("cpu-avx2-2core")
    nodes = [NodeSpec(n, "cpu-avx2-2core", 1, 0.6 * w) for n in ("a", "b", "c")]
    (p,) = place(DEP, nodes)
    assert [s.node for s in p.stages] == ["a", "b"]  # two are enough: the third stays free
    assert [s.layers for s in p.stages] == [(0, 6), (6, 12)]  # same chip, same speed: equal shares
    assert p.node == "a" and p.kv_blocks * 16 >= 192
    assert all(s.gb <= 0.6 * w for s in p.stages)
    assert "split over 2 nodes" in p.reason and "a layers 0-5, b layers 6-11" in p.reason
    with pytest.raises(PlacementError, match="nor do the nodes together hold it"):
        place(DEP, nodes[:1])


def test_a_faster_node_gets_more_layers() -> None:
    w = weights_gb("cpu-avx2-2core")
    nodes = [
        NodeSpec("slow", "cpu-avx2-2core", 1, 0.9 * w),
        NodeSpec("fast", "cpu-avx512-32core", 1, 0.9 * w),
    ]
    (p,) = place(DEP, nodes)
    by_node = {s.node: s.layers[1] - s.layers[0] for s in p.stages}
    assert by_node["fast"] > by_node["slow"] and sum(by_node.values()) == 12
    assert "predicted speed" in p.reason


def test_the_controller_starts_a_split_replica_over_the_placed_nodes(tmp_path) -> None:
    path = str(write_llama_dir(tmp_path / "llama4"))
    nodes = [node("a", memory_gb=0.001), node("b", memory_gb=0.001)]
    rig = Rig([Wanted("m", path, 1, format="fp32")], nodes, "m")
    try:
        rig.reconcile()
        (row,) = rig.rows()
        assert row["state"] == "ready", row["error"]
        assert "split over 2 nodes" in row["reason"]
        options = rig.launcher.started[0].options
        assert options["stage_nodes"] == ["id-a", "id-b"] and options["num_cpus"] == 0
        assert options["stage_weights"] == (2.0, 2.0) and options["kv_cache_blocks"] >= 1
    finally:
        rig.launcher.stop_all()


def test_a_placement_over_devices_of_one_node_starts_one_stage_per_device() -> None:
    from dataclasses import replace as with_fields

    from cumulo.cluster.controller import LiveNode, split_options

    (one,) = place(DEP, [NodeSpec("gpu", "h100-sxm", 1, 80.0)])
    gpu = LiveNode("id-gpu", "gpu", "h100-sxm", 4, 80.0, 32, 32.0, {"cumulo-kind": "cuda"})
    assert split_options(one, [gpu]) == {}  # one device: an ordinary replica
    options = split_options(with_fields(one, devices=2), [gpu])
    assert options == {"stage_nodes": ["id-gpu", "id-gpu"], "stage_devices": ["cuda:0", "cuda:1"],
                       "kv_cache_blocks": one.kv_blocks}  # fmt: skip
    assert one.kv_blocks * 16 * 2 * 12 * CFG.num_key_value_heads * CFG.head_dim * 4 == one.kv_cache_bytes


def test_a_checkpoint_stored_in_a_compact_format_splits_in_that_format(tmp_path) -> None:
    """Two nodes that together hold the fp8 checkpoint and its cache, not one alone: the split is sized and run in the stored
    format (its stages load the packed weights as stored)."""
    from cumulo.cli.main import main
    from cumulo.models.loader import load_config

    source = write_llama_dir(tmp_path / "source", layers=4, vocab=64)
    out = tmp_path / "fp8"
    assert main(["convert", str(source), "-f", "ue8m0-fp8", "-o", str(out)]) == 0
    dep = DeploymentSpec(str(out), prompt_tokens=64, output_tokens=32)
    w = predict(load_config(out), "ue8m0-fp8", "cpu-avx2-2core", 1, 96, 1).weights_gb
    (p,) = place(dep, [NodeSpec(n, "cpu-avx2-2core", 1, 1.5 * w) for n in ("a", "b")])
    assert p.format == "ue8m0-fp8" and [s.node for s in p.stages] == ["a", "b"]
