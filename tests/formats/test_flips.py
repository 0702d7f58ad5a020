"""Greedy flips after GPTQ (cumulo.formats.flips.flip_quantize): same scales and layout as GPTQ, valid codes
that survive a save and load, and a lower layer output error than GPTQ on correlated inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cumulo.formats import codec, packing
from cumulo.formats.checkpoint import load_packed_state_dict, save_packed_state_dict
from cumulo.formats.flips import flip_quantize
from cumulo.formats.gptq import gptq_quantize
from cumulo.formats.packed import PackedWeight
from tests.support.calibration import correlated_layer, output_error

FORMATS = ["ue8m0-fp8", "mxfp8"]


def _layer() -> tuple[torch.Tensor, torch.Tensor]:
    return correlated_layer(150, 192, 512)  # N, K not multiples of 128


@pytest.mark.parametrize("fmt", FORMATS)
def test_flips_lower_output_error_against_gptq(fmt: str) -> None:
    w, x = _layer()
    gptq = gptq_quantize(w, x.T @ x, fmt)
    flipped = flip_quantize(w, x.T @ x, fmt, rounds=128)
    assert output_error(flipped, w, x) < 0.9 * output_error(gptq, w, x)
    assert torch.equal(flipped.scales, gptq.scales)
    assert flipped.codes.shape == gptq.codes.shape and flipped.codes.dtype == gptq.codes.dtype


@pytest.mark.parametrize("fmt", FORMATS)
def test_flipped_codes_are_valid_and_round_trip(tmp_path: Path, fmt: str) -> None:
    w, x = _layer()
    flipped = flip_quantize(w, x.T @ x, fmt, rounds=32)
    elem = flipped.scheme.element
    assert elem is not None
    codes = packing.unpack(flipped.codes, elem.bits, w.shape[1])
    values = codec.decode(elem, codes)
    assert bool(torch.isfinite(values).all())
    assert torch.equal(codec.decode(elem, codec.encode(elem, values)), values)
    name = "model.layers.0.self_attn.q_proj.weight"
    save_packed_state_dict({name: flipped}, tmp_path, fmt)
    loaded, got = load_packed_state_dict(tmp_path)
    assert got == fmt
    after = loaded[name]
    assert isinstance(after, PackedWeight)
    assert torch.equal(after.dequantize(), flipped.dequantize())
