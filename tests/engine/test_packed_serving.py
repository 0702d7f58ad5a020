"""Serving compact-format models: a converted checkpoint loads with its linears still packed (no dense copy),
computes what its dequantized weights compute, and `--format` on load swaps the linears the same way."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from cumulo.cli.main import main as cli
from cumulo.contracts import SamplingParams
from cumulo.engine.factory import create_engine
from cumulo.engine.llm import LLM
from cumulo.engine.llm_engine import EngineConfig
from cumulo.formats.linear import PackedLinear
from cumulo.formats.packed import PackedWeight
from cumulo.models.attention import AttentionContext
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
    [out] = LLM(engine).generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


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


def _q_and_gate(weights: dict) -> list[torch.Tensor]:
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight")
    return [w.codes if isinstance(w, PackedWeight) else w for w in (weights[n] for n in names)]


@pytest.mark.parametrize("fmt", ["ue8m0-fp8", None])
def test_consuming_build_frees_the_joined_parts_and_serves_the_same(tiny_hf_dir, tmp_path, fmt):
    """build_model(consume=True), as the engine calls it, drops each q/k/v and gate/up part once joined: no
    reference to a part outlives the build (so the parts and the joined copies are never all held at once)."""
    path = tiny_hf_dir
    if fmt is not None:
        path = tmp_path / fmt
        assert cli(["convert", str(tiny_hf_dir), "--format", fmt, "-o", str(path)]) == 0
    loaded, again = load(str(path)), load(str(path))
    parts = [weakref.ref(t) for t in _q_and_gate(loaded.weights)]
    served = build_model(loaded.config, loaded.weights, consume=True)
    assert loaded.weights == {}
    gc.collect()
    assert all(p() is None for p in parts)
    reference = build_model(again.config, again.weights)
    assert all(t is not None for t in _q_and_gate(again.weights))  # without consume the input is untouched
    ids = torch.arange(3, 40)
    with torch.no_grad():
        assert torch.equal(_logits(served, ids), _logits(reference, ids))


def test_building_a_model_imports_no_compiler_stack(tiny_hf_dir):
    """Module constructors initialise their parameters; on the meta device that is skipped, because meta
    `normal_` would import torch's decompositions (sympy, dynamo, inductor: ~70 MiB resident) for nothing."""
    code = (
        "import sys\n"
        "from cumulo.models.loader import load\n"
        "from cumulo.models.registry import build_model\n"
        "loaded = load(sys.argv[1])\n"
        "build_model(loaded.config, loaded.weights, consume=True)\n"
        "print([m for m in ('sympy', 'torch._dynamo', 'torch._inductor') if m in sys.modules])\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_hf_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
