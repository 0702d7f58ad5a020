"""Serving compact-format models: a converted checkpoint loads with its linears still packed (no dense copy),
computes what its dequantized weights compute, and `--format` on load swaps the linears the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cumulo.cli.main import main as cli
from cumulo.engine.attention import AttentionContext
from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig
from cumulo.engine.params import SamplingParams
from cumulo.formats.linear import PackedLinear
from cumulo.formats.packed import PackedWeight
from cumulo.models.loader import load
from cumulo.models.registry import build_model


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, write_tiny_llama) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab=256, hidden=128, intermediate=256)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.compute_logits(model(ids, torch.arange(len(ids)), AttentionContext(kv_cache=None)))


@pytest.mark.parametrize("fmt", ["ue8m0-fp8", "mxfp4"])
def test_converted_checkpoint_serves_packed_and_matches_its_dequantized_weights(tiny_hf_dir, tmp_path, fmt):
    out = tmp_path / fmt
    assert cli(["convert", str(tiny_hf_dir), "--format", fmt, "-o", str(out)]) == 0
    loaded = load(str(out))
    assert loaded.format == f"safetensors:{fmt}"
    packed_names = {n for n, t in loaded.weights.items() if isinstance(t, PackedWeight)}
    assert "model.layers.0.self_attn.q_proj.weight" in packed_names
    dense_equivalent = {
        n: (t.dequantize(torch.float32) if isinstance(t, PackedWeight) else t)
        for n, t in loaded.weights.items()
    }
    served = build_model(loaded.config, loaded.weights)
    reference = build_model(loaded.config, dense_equivalent)
    linears = [m for m in served.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 2 * 4  # qkv, o, gate_up, down per layer: fused and still packed
    ids = torch.arange(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(_logits(served, ids), _logits(reference, ids), rtol=1e-4, atol=1e-4)


def test_format_on_load_swaps_linears_and_generates(tiny_hf_dir):
    engine = create_engine(
        str(tiny_hf_dir), EngineConfig(device="cpu", dtype="float32", format="ue8m0-fp8", kv_cache_gib=0.01)
    )
    packed = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 8 and all(m.format == "ue8m0-fp8" for m in packed)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    assert len(outs[-1].token_ids) == 4 and outs[-1].finish_reason == "length"


def test_nvfp4_checkpoint_loads_with_fused_projections_exact(tiny_hf_dir, tmp_path):
    # NVFP4 carries a per-tensor scale: convert gives q/k/v (and gate/up) one shared scale so they fuse exactly.
    out = tmp_path / "nvfp4"
    assert cli(["convert", str(tiny_hf_dir), "--format", "nvfp4", "-o", str(out)]) == 0
    loaded = load(str(out))
    dense_equivalent = {
        n: (t.dequantize(torch.float32) if isinstance(t, PackedWeight) else t)
        for n, t in loaded.weights.items()
    }
    served = build_model(loaded.config, loaded.weights)
    reference = build_model(loaded.config, dense_equivalent)
    ids = torch.arange(3, 30)
    with torch.no_grad():
        torch.testing.assert_close(_logits(served, ids), _logits(reference, ids), rtol=1e-4, atol=1e-4)
