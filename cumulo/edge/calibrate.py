"""Error-compensating int8 weight rounding for the vision net's 1x1 convs (GPTQ), from calibration photos.

Round-to-nearest minimises each weight's own error; what the net sees is a layer's output error. A 1x1 conv is a
linear layer over pixels, so GPTQ (arXiv 2210.17323) applies as written: H = X^T X over the conv's input pixels
on a few calibration photos, columns rounded in order (largest diagonal first), each column's rounding error
moved onto the columns not yet rounded through the Cholesky factor of H^-1. It runs once, offline, where the
package is built, and writes what round-to-nearest writes: int8 codes [N, K] on the same per-channel scales
(amax / 127) and an fp32 bias, so `Int8Pointwise` and its kernels do not change.

The layers go in network order and each one's H comes from the net with every earlier layer already quantized
(weights and activations), so a layer also absorbs what the layers before it lost. `mxint8` runs GPTQ into
Cumulo's MXINT8 blocks (`cumulo.formats.gptq`, what the package holds) and then re-expresses that weight per
channel by round-to-nearest, as `int8_weight` does.

The calibration photos are disjoint from the bench's (`cumulo.edge.photos.NAMES`): other images that ship in
installed wheels (scikit-image's and Matplotlib's sample data), so the agreement measured on the bench's crops
is not fitted to them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cumulo.edge.photos import photo_set
from cumulo.edge.pointwise import (
    INT8_MAX,
    Int8Pointwise,
    corrected_bias,
    per_channel_int8,
    quantize_vision_net,
)
from cumulo.errors import FormatError, InvalidRequest
from cumulo.formats.gptq import LAZY_BATCH, gptq_quantize, hessian_inverse_factor

# Photos bundled with installed wheels and not in the bench's set: a portrait, a stereo pair of a motorcycle, a
# product box, microscopy. (scikit-image's "clock_motion" is left out: the bench has the same clock.)
CALIBRATION_PHOTOS = (
    "grace_hopper",
    "motorcycle_left",
    "motorcycle_right",
    "minduka",
    "cell",
    "microaneurysms",
)


def calibration_photo(name: str) -> torch.Tensor:
    """One calibration image as uint8 [h, w, 3]."""
    try:
        from skimage import data
    except ImportError:
        raise InvalidRequest("calibration needs scikit-image: pip install scikit-image") from None
    if name in ("grace_hopper", "minduka"):
        import matplotlib.cbook
        import numpy as np
        from PIL import Image

        file = {"grace_hopper": "grace_hopper.jpg", "minduka": "Minduka_Present_Blue_Pack.png"}[name]
        with Image.open(matplotlib.cbook.get_sample_data(file, asfileobj=False)) as image:
            array = np.asarray(image.convert("RGB")).copy()
    elif name.startswith("motorcycle_"):
        array = data.stereo_motorcycle()[0 if name.endswith("left") else 1]
    elif name in ("cell", "microaneurysms"):
        array = getattr(data, name)()
    else:
        raise InvalidRequest(f"no calibration photo {name!r}; known: {', '.join(CALIBRATION_PHOTOS)}")
    image = torch.from_numpy(array.copy())
    if image.dim() == 2:
        image = image[..., None].expand(-1, -1, 3)
    return image[..., :3].to(torch.uint8)


def calibration_set(crops_per_photo: int = 8, seed: int = 1) -> torch.Tensor:
    """[len(CALIBRATION_PHOTOS) * crops_per_photo, 3, 224, 224] seeded crops of the calibration photos."""
    return photo_set(crops_per_photo, seed, CALIBRATION_PHOTOS, calibration_photo)


def gptq_int8(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float and H [K, K] -> (int8 codes [N, K], fp32 scales [N]): per-channel symmetric int8 on
    round-to-nearest's scales (`per_channel_int8`), with GPTQ's rounding. act_order: columns by descending
    H diagonal (the inputs with the most energy first, while the most columns remain to absorb their error)."""
    w = weight.detach().float().clone()
    n, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise FormatError(f"Hessian shape {tuple(hessian.shape)} does not match K = {k}")
    _, scale = per_channel_int8(w)
    perm = (
        torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if act_order else torch.arange(k)
    )
    w = w[:, perm]
    u = hessian_inverse_factor(hessian[perm][:, perm], damp)  # [K, K] upper
    codes = torch.empty((n, k))
    for i1 in range(0, k, LAZY_BATCH):
        i2 = min(i1 + LAZY_BATCH, k)
        batch = w[:, i1:i2].clone()  # [N, B], updated in place as its columns are rounded
        errors = torch.zeros_like(batch)
        for i in range(i2 - i1):
            x = batch[:, i]
            q = (x / scale).round().clamp(-INT8_MAX, INT8_MAX)  # [N]
            codes[:, i1 + i] = q
            err = (x - q * scale) / u[i1 + i, i1 + i]
            batch[:, i + 1 :] -= err[:, None] * u[i1 + i, i1 + i + 1 : i2][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.to(torch.int8), scale


class _Stop(Exception):
    """Raised by the capture hook once it has a layer's inputs: the rest of the forward is not needed."""


def _layer_input(net: nn.Module, name: str, chunk: torch.Tensor, relu6: bool) -> torch.Tensor:
    """Layer `name`'s input [pixels, K] float64 when `net` runs `chunk` (the forward stops there)."""
    captured: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0]
        rows = x if x.dim() == 2 else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        captured.append((rows.clamp(0.0, 6.0) if relu6 else rows).double())
        raise _Stop

    handle = net.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            net(chunk)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


@dataclass
class LayerStatistics:
    """What calibration knows of one layer's inputs (float64): X^T X [K, K], the mean [K] and the row count."""

    gram: torch.Tensor
    mean: torch.Tensor
    rows: int


def input_statistics(net: nn.Module, name: str, images: torch.Tensor, batch: int = 16) -> LayerStatistics:
    """The statistics of layer `name`'s inputs (as its GEMM quantizes them) in `net` over `images`."""
    module = net.get_submodule(name)
    assert isinstance(module, Int8Pointwise)
    k = module.in_channels
    gram, total, count = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), 0
    for chunk in images.split(batch):
        rows = _layer_input(net, name, chunk, module.relu6_input)  # [P, K]
        gram += rows.T @ rows
        total += rows.sum(0)
        count += rows.shape[0]
    return LayerStatistics(gram, total / max(count, 1), count)


def _pixels_per_image(net: nn.Module, name: str, images: torch.Tensor) -> int:
    """How many rows one image gives layer `name` (its map's pixels; 1 for the classifier)."""
    module = net.get_submodule(name)
    rows = _layer_input(net, name, images[:1], getattr(module, "relu6_input", False))
    return rows.shape[0]


def _pointwise_layers(net: nn.Module) -> Iterator[tuple[str, Int8Pointwise]]:
    for name, module in net.named_modules():
        if isinstance(module, Int8Pointwise):
            yield name, module


def calibrate(
    qnet: nn.Module,
    base: nn.Module,
    images: torch.Tensor,
    damp: float = 0.01,
    act_order: bool = True,
    bias: str = "data",
    rows_per_input: int = 16,
) -> nn.Module:
    """Replace the codes (and bias) of every `Int8Pointwise` of `qnet` (`quantize_vision_net(base, ...)` in int8
    or mxint8) by GPTQ's, layer by layer in network order, on calibration `images` [n, 3, 224, 224].

    bias: "data" corrects each bias for its rounded weight with the calibration photos' mean input, "bn" with the
    batch-norm-derived mean (`vision.input_means`, as round-to-nearest does), "none" keeps the folded bias.

    A layer with fewer than `rows_per_input` calibration pixels per input channel keeps round-to-nearest: its
    X^T X is (nearly) singular and GPTQ fits the calibration photos instead of the layer (the classifier sees one
    row per image; a 7x7 map with 1,152 inputs needs 376 crops)."""
    means = getattr(base, "input_means", {})
    threads = torch.get_num_threads()
    for name, module in list(_pointwise_layers(qnet)):
        layer = base.get_submodule(name)
        weight = layer.weight.detach().flatten(1).float()  # [N, K]
        folded = layer.bias.detach().float() if layer.bias is not None else torch.zeros(weight.shape[0])
        if images.shape[0] * _pixels_per_image(qnet, name, images) < rows_per_input * weight.shape[1]:
            continue  # round-to-nearest, as quantize_vision_net wrote it
        stats = input_statistics(qnet, name, images)
        gram = stats.gram.float()
        torch.set_num_threads(1)  # GPTQ's column loop is small vector ops; one thread is fastest
        try:
            if module.format == "int8":
                codes, scale = gptq_int8(weight, gram, damp, act_order)
            else:
                mx = gptq_quantize(weight, gram, module.format, name=f"{name}.weight", damp=damp)
                codes, scale = per_channel_int8(mx.dequantize(torch.float32))
        finally:
            torch.set_num_threads(threads)
        rounded = codes.float() * scale[:, None]
        source = {"data": stats.mean.float(), "bn": means.get(name), "none": None}[bias]
        module.codes = codes
        module.scale = scale
        module.bias = corrected_bias(folded, rounded, weight, source)
    return qnet


def quantize_calibrated(net: nn.Module, format: str, images: torch.Tensor | None = None) -> nn.Module:
    """`quantize_vision_net(copy of net, format)` with GPTQ rounding calibrated on `images` (default: the
    calibration photos, `calibration_set()`); `net` is left as it is."""
    images = calibration_set() if images is None else images
    qnet = quantize_vision_net(copy.deepcopy(net), format)
    return calibrate(qnet, net, images.contiguous(memory_format=torch.channels_last))
