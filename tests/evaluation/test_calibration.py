"""Calibration for GPTQ: its text is disjoint from the scored text, its windows are seeded, and fused engine
modules hand their inputs' statistics to each checkpoint part."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cumulo.errors import InvalidRequest
from cumulo.evaluation.calibration import Calibration, collect_hessians, sample_windows
from cumulo.evaluation.corpus import calibration_docs, python_docs


def test_calibration_text_shares_no_paragraph_with_the_scored_half() -> None:
    paragraphs = python_docs().text.split("\n\n")
    scored_half = set(paragraphs[: len(paragraphs) // 2])
    calibration = calibration_docs().text.split("\n\n")
    assert calibration and not scored_half.intersection(calibration)
    # eval ppl's default 4096 tokens lie inside the first half: it holds far more characters than they take
    assert sum(len(p) for p in scored_half) > 4 * 4096 * 2


def test_sample_windows_are_seeded_inside_the_text_and_cover_the_request() -> None:
    a, b, c = (sample_windows(10_000, 2048, 512, seed) for seed in (0, 0, 1))
    assert a == b and a != c
    assert len(a) == 4 and all(0 <= s < e <= 10_000 and e - s == 512 for s, e in a)
    assert sample_windows(700, 5000, 512, 0) == [(0, 512), (512, 700)]  # short text: all of it, once
    with pytest.raises(InvalidRequest, match="at least 2 tokens"):
        sample_windows(700, 1, 512, 0)


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(4, 6, bias=False)
        self.o_proj = nn.Linear(6, 4, bias=False)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx: object) -> torch.Tensor:
        x = nn.functional.one_hot(ids, 4).float()
        return self.o_proj(self.qkv_proj(x))


def test_collect_hessians_sums_x_transpose_x_of_the_targets_only() -> None:
    model = _TwoLinears()
    ids = [0, 1, 1, 3, 2]
    cal = collect_hessians(model, ids, [(0, 3), (3, 5)], {"qkv_proj"}, progress=False)
    x = nn.functional.one_hot(torch.tensor(ids), 4).float()
    assert set(cal.hessians) == {"qkv_proj"} and cal.tokens == 5 and cal.windows == 2
    assert torch.equal(cal.hessians["qkv_proj"], x.T @ x)
    assert not model.qkv_proj._forward_hooks  # hooks removed afterwards


def test_checkpoint_parts_find_their_fused_modules_statistics() -> None:
    h = torch.eye(3)
    cal = Calibration({"model.layers.0.self_attn.qkv_proj": h, "model.layers.0.mlp.down_proj": 2 * h}, 8, 1)
    assert cal.hessian_for("model.layers.0.self_attn.k_proj.weight") is h
    assert torch.equal(cal.hessian_for("model.layers.0.mlp.down_proj.weight"), 2 * h)
    assert cal.hessian_for("model.layers.0.mlp.up_proj.weight") is None


def _quantized_copies(
    fmt: str, sequential: bool, std: float = 0.3
) -> tuple[nn.Module, nn.Module, dict, list[int]]:
    """A tiny random Llama and a copy quantized to `fmt` with GPTQ, calibrated one-pass or layer by layer."""
    import copy

    from cumulo.evaluation.calibration import quantize_sequentially
    from cumulo.formats.gptq import gptq_quantize
    from tests.support.tiny import tiny_config, tiny_model

    config = tiny_config("llama", vocab_size=64, num_hidden_layers=4, max_position_embeddings=256)
    reference = tiny_model(config, weight_std=std)
    model = copy.deepcopy(reference)
    ids = torch.randint(0, 64, (512,), generator=torch.Generator().manual_seed(2)).tolist()
    spans = sample_windows(len(ids), 256, 64, 0)
    targets = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    packed: dict = {}

    def quantize_layer(prefix: str, hessians: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, h in hessians.items():
            weight = model.get_parameter(name + ".weight").detach()
            packed[name] = gptq_quantize(weight, h, fmt, name=name)
            out[name + ".weight"] = packed[name].dequantize()
        return out

    if sequential:
        cal = quantize_sequentially(model, ids, spans, targets, quantize_layer, progress=False)
        packed["hessians"] = cal.hessians
    else:
        cal = collect_hessians(model, ids, spans, targets, progress=False)
        with torch.no_grad():
            for name, value in quantize_layer("", cal.hessians).items():
                model.get_parameter(name).copy_(value)
    return reference, model, packed, ids


def _error_on_actual_inputs(reference: nn.Module, model: nn.Module, ids: list[int]) -> tuple[float, dict]:
    """Sum over the linears of ||X (W - Q)^T||^2 / ||X W^T||^2, X being the inputs each linear receives in the
    quantized `model` itself: the output error a layer's user sees once every layer is quantized."""
    spans = sample_windows(len(ids), 256, 64, 0)
    targets = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    actual = collect_hessians(model, ids, spans, targets, progress=False).hessians
    total = 0.0
    for name, h in actual.items():
        w = reference.get_parameter(name + ".weight").detach()
        d = w - model.get_parameter(name + ".weight").detach()
        total += float(torch.trace(d @ h @ d.T) / torch.trace(w @ h @ w.T))
    return total, actual


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "ue8m0-fp8", "mxfp8"])
def test_sequential_calibration_errs_no_more_than_one_pass_in_the_same_layout(fmt: str) -> None:
    """Layer by layer, each linear's GPTQ works on the inputs the quantized earlier layers give it, so on the
    inputs it sees in the finished model its output error is no larger than one-pass calibration's; the
    weights keep round-to-nearest's layout, and the first layer (same inputs either way) gets the same codes."""
    from cumulo.formats.quantize import quantize

    reference, one_pass, packed_one, ids = _quantized_copies(fmt, sequential=False, std=0.15)
    _, sequential, packed_seq, _ = _quantized_copies(fmt, sequential=True, std=0.15)
    packed_seq.pop("hessians")
    assert set(packed_one) == set(packed_seq) and len(packed_seq) == 4 * 4  # qkv, o, gate_up, down per layer
    for name, p in packed_seq.items():
        rtn = quantize(reference.get_parameter(name + ".weight").detach(), fmt)
        assert (p.shape, p.codes.shape, p.codes.dtype) == (rtn.shape, rtn.codes.shape, rtn.codes.dtype)
        assert (p.scales.shape, p.scales.dtype) == (rtn.scales.shape, rtn.scales.dtype)
    error_one, _ = _error_on_actual_inputs(reference, one_pass, ids)
    error_seq, _ = _error_on_actual_inputs(reference, sequential, ids)
    assert 0 < error_seq <= error_one, (error_seq, error_one)
    first = "model.layers.0.self_attn.qkv_proj"
    assert torch.equal(packed_one[first].codes, packed_seq[first].codes)
    last = "model.layers.3.mlp.down_proj"
    assert not torch.equal(packed_one[last].codes, packed_seq[last].codes)


def test_sequential_statistics_are_those_of_the_quantized_models_own_inputs() -> None:
    """What each layer was calibrated on is what the finished quantized model feeds it (the one-pass statistics
    are not, past the first layer): the layers ran in order on already quantized weights."""
    from cumulo.evaluation.calibration import quantize_sequentially

    reference, model, _, ids = _quantized_copies("mxfp4", sequential=False, std=0.15)
    targets = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    spans = sample_windows(len(ids), 256, 64, 0)
    seen = quantize_sequentially(reference, ids, spans, targets, lambda prefix, h: {}, progress=False)
    unchanged = collect_hessians(reference, ids, spans, targets, progress=False)
    assert set(seen.hessians) == targets and seen.tokens == 256 and seen.windows == 4
    for name in targets:  # a quantizer that changes nothing: sequential = one pass
        assert torch.allclose(seen.hessians[name], unchanged.hessians[name], rtol=1e-4, atol=1e-3), name
    _, sequential, packed, _ = _quantized_copies("mxfp4", sequential=True, std=0.15)
    _, actual = _error_on_actual_inputs(reference, sequential, ids)
    # What GPTQ was given while quantizing = what the finished model feeds each layer. Within a layer the
    # statistics are taken before any of its own linears are quantized, so this holds exactly for the layer's
    # input projection (qkv_proj), whose input depends only on the earlier layers.
    for name in [t for t in targets if t.endswith("qkv_proj")]:
        assert torch.allclose(packed["hessians"][name], actual[name], rtol=1e-4, atol=1e-3), name
    later = "model.layers.2.self_attn.qkv_proj"
    assert not torch.allclose(packed["hessians"][later], unchanged.hessians[later], rtol=1e-3, atol=1e-2)


def test_convert_sequential_writes_one_pass_layout_and_differs_past_the_first_layer(
    tmp_path, write_tiny_llama
) -> None:
    """`cumulo convert --calibrate --sequential` end to end: the checkpoint has one-pass's tensors, names,
    shapes and dtypes (q/k/v still sharing NVFP4's tensor scale), layer 0 is rounded identically, and a later
    layer differently (its inputs went through quantized layers)."""
    from safetensors.torch import load_file

    from cumulo.cli.main import main

    model = write_tiny_llama(tmp_path / "m", vocab=160, hidden=64, intermediate=128)
    outs = {}
    for mode in ("one", "seq"):
        extra = ["--sequential"] if mode == "seq" else []
        assert (
            main(
                [
                    "convert",
                    str(model),
                    "-f",
                    "nvfp4",
                    "-o",
                    str(tmp_path / mode),
                    "--calibrate",
                    "300",
                    *extra,
                ]
            )
            == 0
        )
        outs[mode] = {
            k: v for f in sorted((tmp_path / mode).glob("*.safetensors")) for k, v in load_file(f).items()
        }
    one, seq = outs["one"], outs["seq"]
    assert one.keys() == seq.keys()
    assert all((one[k].shape, one[k].dtype) == (seq[k].shape, seq[k].dtype) for k in one)
    scale2 = [seq[f"model.layers.1.self_attn.{p}_proj.weight_scale_2"] for p in "qkv"]
    assert torch.equal(scale2[0], scale2[1]) and torch.equal(scale2[0], scale2[2])
    first, later = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(one[first].view(torch.uint8), seq[first].view(torch.uint8))
    assert not torch.equal(one[later].view(torch.uint8), seq[later].view(torch.uint8))
