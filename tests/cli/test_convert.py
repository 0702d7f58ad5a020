"""`cumulo convert`: a tiny Hugging Face llama becomes a packed checkpoint whose weights dequantize back closely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cumulo.cli.convert import _hf_config
from cumulo.cli.main import main
from cumulo.formats.checkpoint import load_packed_state_dict
from cumulo.formats.packed import PackedWeight
from cumulo.models import hf
from cumulo.models.loader import load


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, write_tiny_llama) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab=160, hidden=64, intermediate=128)


def test_convert_writes_a_packed_checkpoint_that_dequantizes_close_to_the_source(
    tiny_llama: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(tiny_llama), "--format", "ue8m0-fp8", "-o", str(out)]) == 0
    assert "ue8m0-fp8" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    assert (out / "tokenizer.json").is_file()
    source = load(str(tiny_llama)).weights
    weights, fmt = load_packed_state_dict(out)
    assert fmt == "ue8m0-fp8"
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, PackedWeight)
    ref = source["model.layers.0.self_attn.q_proj.weight"]
    assert ((q.dequantize() - ref).norm() / ref.norm()).item() < 0.04
    embed = weights["model.embed_tokens.weight"]  # kept by the default policy, in bf16
    assert isinstance(embed, torch.Tensor) and embed.dtype == torch.bfloat16
    assert isinstance(weights["lm_head.weight"], torch.Tensor)


def test_convert_keep_patterns_replace_the_default_policy(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(tiny_llama), "-f", "mxfp4", "-o", str(out), "--keep", "*mlp*"]) == 0
    weights, _ = load_packed_state_dict(out)
    assert isinstance(weights["lm_head.weight"], PackedWeight)
    assert isinstance(weights["model.layers.1.mlp.up_proj.weight"], torch.Tensor)


def test_convert_refuses_unknown_formats_and_non_empty_outputs(
    tiny_llama: Path, tmp_path: Path, capsys
) -> None:
    assert main(["convert", str(tiny_llama), "-f", "fp5", "-o", str(tmp_path / "x")]) == 1
    assert "unknown weight format 'fp5'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["convert", str(tiny_llama), "-f", "fp8", "-o", str(tmp_path / "full")]) == 1
    assert "--force" in capsys.readouterr().err


def test_config_built_for_gguf_sources_reads_back_as_the_same_model_config(tiny_llama: Path) -> None:
    config = load(str(tiny_llama)).config
    again = hf.config_from_json(_hf_config(config), tiny_llama)
    for field in (
        "architecture",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "tie_word_embeddings",
    ):
        assert getattr(again, field) == getattr(config, field), field
