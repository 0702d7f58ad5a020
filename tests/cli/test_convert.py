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


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_convert_calibrate_writes_the_same_layout_with_other_codes_and_serves(
    tiny_llama: Path, tmp_path: Path, capsys
) -> None:
    rtn, gptq = tmp_path / "rtn", tmp_path / "gptq"
    assert main(["convert", str(tiny_llama), "-f", "nvfp4", "-o", str(rtn)]) == 0
    assert main(["convert", str(tiny_llama), "-f", "nvfp4", "-o", str(gptq), "--calibrate", "300"]) == 0
    assert "calibrated on" in capsys.readouterr().out
    a, b = _tensors(rtn), _tensors(gptq)
    assert a.keys() == b.keys()
    assert all((a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype) for k in a)
    assert json.loads((rtn / "config.json").read_text()) == json.loads((gptq / "config.json").read_text())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q].view(torch.uint8), b[q].view(torch.uint8))  # GPTQ chose other codes
    # q/k/v still share NVFP4's tensor scale, so the engine can join them exactly on load
    scale2 = [b[f"model.layers.0.self_attn.{p}_proj.weight_scale_2"] for p in "qkv"]
    assert torch.equal(scale2[0], scale2[1]) and torch.equal(scale2[0], scale2[2])
    assert main(["generate", str(gptq), "hello", "--max-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"] is not None


def test_convert_calibrate_is_deterministic(tiny_llama: Path, tmp_path: Path) -> None:
    for run in ("a", "b"):
        args = ["convert", str(tiny_llama), "-f", "mxfp4", "-o", str(tmp_path / run), "--calibrate", "200"]
        assert main([*args, "--seed", "3"]) == 0
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(
        torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a if a[k].dtype.itemsize == 1
    )


def test_convert_calibrate_reads_a_text_file(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "o"
    assert (
        main(["convert", str(tiny_llama), "-f", "ue8m0-fp8", "-o", str(out), "--calibrate", str(text)]) == 0
    )
    assert str(text) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-f", "mxfp4", "--calibrate", "1"], "at least 2 tokens"),
        (
            ["-f", "mxfp4", "--calibrate", "no/such/file.txt"],
            "neither a token count nor an existing text file",
        ),
        (["-f", "bf16", "--calibrate"], "--calibrate needs a compact format"),
        (["-f", "ue8m0-fp8", "--flips"], "add --calibrate"),
    ],
)
def test_convert_calibrate_bad_values_are_one_line_errors(
    tiny_llama: Path, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    assert main(["convert", str(tiny_llama), "-o", str(tmp_path / "x"), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()  # refused before anything was read or written


def test_convert_calibrate_act_order_and_scale_search_write_the_same_layout(
    tiny_llama: Path, tmp_path: Path
) -> None:
    rtn, gptq = tmp_path / "rtn", tmp_path / "gptq"
    assert main(["convert", str(tiny_llama), "-f", "mxfp8", "-o", str(rtn)]) == 0
    args = ["--calibrate", "300", "--act-order", "--scale-search"]
    assert main(["convert", str(tiny_llama), "-f", "mxfp8", "-o", str(gptq), *args]) == 0
    a, b = _tensors(rtn), _tensors(gptq)
    assert a.keys() == b.keys()
    assert all((a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype) for k in a)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q].view(torch.uint8), b[q].view(torch.uint8))


def test_convert_flips_refines_gptq_codes_in_the_same_layout(tiny_llama: Path, tmp_path: Path) -> None:
    gptq, flips = tmp_path / "gptq", tmp_path / "flips"
    args = ["-f", "ue8m0-fp8", "--calibrate", "300"]
    assert main(["convert", str(tiny_llama), "-o", str(gptq), *args]) == 0
    assert main(["convert", str(tiny_llama), "-o", str(flips), *args, "--flips"]) == 0
    a, b = _tensors(gptq), _tensors(flips)
    assert a.keys() == b.keys()
    assert all((a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype) for k in a)
    scales = [k for k in a if k.endswith("weight_scale_inv")]
    assert scales and all(torch.equal(a[k], b[k]) for k in scales)  # GPTQ's block scales kept
    codes = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(a[codes].view(torch.uint8), b[codes].view(torch.uint8))  # some codes moved
