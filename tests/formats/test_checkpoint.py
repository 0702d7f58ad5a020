"""Packed checkpoints: DeepSeek-V3's block-FP8 layout byte for byte, Cumulo's layout for the rest, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cumulo.errors import FormatError, InvalidModel
from cumulo.formats.checkpoint import (
    iter_safetensors,
    load_packed_state_dict,
    safetensors_metadata,
    save_packed_state_dict,
)
from cumulo.formats.packed import PackedWeight
from cumulo.formats.quantize import quantize
from cumulo.formats.schemes import SCHEMES


def _state(fmt: str) -> dict[str, torch.Tensor | PackedWeight]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(50, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": quantize(torch.randn(200, 300, generator=g), fmt),
        "model.layers.0.input_layernorm.weight": torch.ones(64),
    }


def test_ue8m0_fp8_checkpoint_has_deepseek_v3_layout_and_config(tmp_path: Path) -> None:
    save_packed_state_dict(_state("ue8m0-fp8"), tmp_path, "ue8m0-fp8", config={"model_type": "llama"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    qcfg = cfg["quantization_config"]
    assert {
        k: qcfg[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt")
    } == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
    }
    assert qcfg["modules_to_not_convert"] == ["model.embed_tokens"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale_inv")
    assert w.dtype == torch.float8_e4m3fn and w.shape == (200, 300)
    assert s.dtype == torch.float32 and s.shape == (2, 3)
    # DeepSeek's dequantization (fp8_cast_bf16.py / weight_dequant): weight times scale_inv per 128x128 tile.
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    packed = _state("ue8m0-fp8")["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(packed, PackedWeight)
    assert torch.equal(w.float() * full, packed.dequantize())


@pytest.mark.parametrize("fmt", list(SCHEMES))
def test_every_format_round_trips_through_save_and_load(tmp_path: Path, fmt: str) -> None:
    state = _state(fmt)
    save_packed_state_dict(state, tmp_path, fmt)
    loaded, got_format = load_packed_state_dict(tmp_path)
    assert got_format == fmt
    assert set(loaded) == set(state)
    before, after = (
        state["model.layers.0.self_attn.q_proj.weight"],
        loaded["model.layers.0.self_attn.q_proj.weight"],
    )
    assert isinstance(before, PackedWeight)
    if fmt == "bf16":
        assert isinstance(after, torch.Tensor) and torch.equal(after, before.codes)
    else:
        assert isinstance(after, PackedWeight) and after.shape == (200, 300)
        assert torch.equal(after.dequantize(), before.dequantize())
    assert torch.equal(loaded["model.layers.0.input_layernorm.weight"], torch.ones(64))


def test_reader_accepts_a_checkpoint_written_the_deepseek_way(tmp_path: Path) -> None:
    weight = (torch.randn(130, 256) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[0.5, 2.0], [0.25, 1.0]])
    save_file(
        {
            "model.layers.0.mlp.up_proj.weight": weight,
            "model.layers.0.mlp.up_proj.weight_scale_inv": scale_inv,
        },
        str(tmp_path / "model.safetensors"),
    )
    qcfg = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qcfg}))
    loaded, fmt = load_packed_state_dict(tmp_path)
    assert fmt == "fp8-block"
    packed = loaded["model.layers.0.mlp.up_proj.weight"]
    assert isinstance(packed, PackedWeight)
    expected = weight.float() * scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:130, :256]
    assert torch.equal(packed.dequantize(), expected)


def test_large_state_is_sharded_with_an_index(tmp_path: Path) -> None:
    save_packed_state_dict(_state("mxfp4"), tmp_path, "mxfp4", shard_bytes=10_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    loaded, _ = load_packed_state_dict(tmp_path)
    assert isinstance(loaded["model.layers.0.self_attn.q_proj.weight"], PackedWeight)


def test_mixing_formats_in_one_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="packed as mxfp4"):
        save_packed_state_dict(_state("mxfp4"), tmp_path, "nvfp4")


def test_unsupported_fp8_block_size_is_a_clear_error(tmp_path: Path) -> None:
    save_file({"a.weight": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    qcfg = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qcfg}))
    with pytest.raises(FormatError, match="128x128"):
        load_packed_state_dict(tmp_path)


def test_joined_weights_are_refused_by_the_writer(tmp_path: Path) -> None:
    from cumulo.formats.packed import concat_rows

    joined = concat_rows(
        [quantize(torch.randn(64, 128), "ue8m0-fp8"), quantize(torch.randn(64, 128), "ue8m0-fp8")]
    )
    with pytest.raises(FormatError, match="save the parts"):
        save_packed_state_dict({"a.weight": joined}, tmp_path, "ue8m0-fp8")


def test_loaded_tensors_own_their_memory(tmp_path: Path) -> None:
    """Each loaded tensor has a buffer of its own, not a view of one mapping of the whole file (which would keep
    every page read through it resident, joined q/k/v and gate/up parts included, while any tensor lives)."""
    save_packed_state_dict(_state("ue8m0-fp8"), tmp_path, "ue8m0-fp8")
    loaded, _ = load_packed_state_dict(tmp_path)
    tensors = []
    for value in loaded.values():
        if isinstance(value, PackedWeight):
            tensors += [t for t in (value.codes, value.scales, value.tensor_scale) if t is not None]
        else:
            tensors.append(value)
    assert len(tensors) == 4
    for t in tensors:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)


def test_reader_matches_safetensors_for_every_dtype(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "f8": torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn),
        "i64": torch.arange(-5, 5),
        "u8": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    got = dict(iter_safetensors(path))
    assert got.keys() == tensors.keys()
    for key, want in tensors.items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        assert torch.equal(got[key].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), key
    assert safetensors_metadata(path) == {"k": "v"}
    assert set(dict(iter_safetensors(path, wanted=lambda n: n.startswith("f")))) == {"f32", "f16", "f8"}


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_file_is_an_invalid_model(tmp_path: Path, damage: str) -> None:
    save_packed_state_dict(_state("ue8m0-fp8"), tmp_path, "ue8m0-fp8")
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        data[: len(data) - 100] if damage == "truncated" else data[:8] + b"{not json" + data[17:]
    )
    with pytest.raises(InvalidModel, match="model.safetensors"):
        load_packed_state_dict(tmp_path)
