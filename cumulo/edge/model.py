"""The on-device model: a small CNN that names what stands in each shelf slot, held in INT8/MXINT8.

It is trained on the scene generator (seeded, seconds on a CPU) because no retail-shelf data set ships on PyPI;
a pretrained vision model from a PyPI wheel is a later step. Weights are quantized with Cumulo's own codecs
(`cumulo.formats`): linear layers become `PackedLinear`, conv layers `PackedConv2d` (the [out, in*kh*kw] matrix
packed the same way), so the device holds codes and scales, not fp32.

A model package is one safetensors file of fp32 weights with its metadata (architecture, labels, the format to
run in); the fleet ships it by URL and sha256, the device quantizes it on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cumulo.edge import scenes
from cumulo.errors import InvalidModel
from cumulo.formats import PackedWeight, get_scheme, quantize
from cumulo.formats.linear import QuantPolicy, quantize_model

ARCH = "cumulo-shelf-cnn-v1"


class ShelfNet(nn.Module):
    """[n, 3, 24, 24] uint8 slot crops -> [n, classes] logits."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = crops.float() / 255.0 - 0.5  # [n, 3, 24, 24]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [n, 8, 12, 12]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [n, 16, 6, 6]
        x = F.relu(self.fc1(x.flatten(1)))  # [n, 32]
        return self.fc2(x)  # [n, classes]


class PackedConv2d(nn.Module):
    """A Conv2d whose weight is held packed as the matrix [out, in * kh * kw] and unpacked for each call (the
    reference path; a fused kernel is a later step)."""

    def __init__(self, conv: nn.Conv2d, format: str, name: str) -> None:
        super().__init__()
        self.format = format
        self.kernel_shape = tuple(conv.weight.shape)  # [out, in, kh, kw]
        self.stride, self.padding = conv.stride, conv.padding
        packed = quantize(conv.weight.detach().flatten(1), format, name=name)
        self.shape = packed.shape
        self.block_override = packed.block_override
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("tensor_scale", packed.tensor_scale)
        self.bias = (
            nn.Parameter(conv.bias.detach().clone(), requires_grad=False) if conv.bias is not None else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = PackedWeight(
            self.format, self.codes, self.scales, self.shape, self.tensor_scale, self.block_override
        )
        weight = packed.dequantize(x.dtype).view(self.kernel_shape)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


def quantize_shelf_net(net: ShelfNet, format: str) -> ShelfNet:
    """Swap every conv and linear layer for its packed form, in place; `fp32` leaves the net as it is."""
    if format == "fp32":
        return net
    get_scheme(format)  # an unknown name is a FormatError before anything changes
    for name in ("conv1", "conv2"):
        setattr(net, name, PackedConv2d(getattr(net, name), format, f"{name}.weight"))
    return quantize_model(net, format, QuantPolicy(keep=()))


def train_shelf_net(seed: int = 0, per_class: int = 200, epochs: int = 3) -> ShelfNet:
    """Train on generated slot crops; seeded, so the same seed gives the same weights (a few seconds on CPU)."""
    torch.manual_seed(seed)
    images, labels = scenes.slot_dataset(seed, per_class)
    net = ShelfNet(len(scenes.product_labels()))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(net(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def save_package(net: ShelfNet, path: str | Path, format: str = "mxint8") -> Path:
    """Write a model package: fp32 weights plus the metadata the device needs to run them."""
    path = Path(path)
    meta = {"arch": ARCH, "labels": json.dumps(scenes.product_labels()), "format": format}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return path


@dataclass
class ShelfModel:
    """A loaded package, ready to classify the slots of a frame."""

    net: ShelfNet
    labels: list[str]
    format: str

    @torch.inference_mode()
    def classify(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class index [n], probability [n]) for uint8 crops [n, 3, 24, 24]."""
        probs = self.net(crops).float().softmax(-1)
        score, index = probs.max(-1)
        return index, score


OPERATORS = frozenset({"conv2d", "relu", "max_pool2d", "flatten", "linear", "softmax"})


def read_package(path: str | Path) -> tuple[ShelfNet, list[str], str]:
    """The fp32 net, its labels and the format the package names. Anything that is not a package of this
    architecture is an InvalidModel with one line saying why."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for a damaged file
        raise InvalidModel(f"{path.name} is not a model package: {str(error)[:120]}") from None
    if meta.get("arch") != ARCH:
        raise InvalidModel(f"{path.name}: unknown architecture {meta.get('arch')!r}, expected {ARCH!r}")
    labels = json.loads(meta.get("labels", "[]"))
    net = ShelfNet(len(labels))
    try:
        net.load_state_dict(tensors)
    except RuntimeError as error:
        raise InvalidModel(
            f"{path.name}: weights do not fit {ARCH}: {str(error).splitlines()[0][:120]}"
        ) from None
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise InvalidModel(f"{path.name}: weights are not finite")
    return net.eval(), labels, meta.get("format", "mxint8")


def load_package(path: str | Path, format: str | None = None) -> ShelfModel:
    """Load a package and quantize it to `format` (default: the one it names)."""
    net, labels, named = read_package(path)
    chosen = format or named
    return ShelfModel(quantize_shelf_net(net, chosen), labels, chosen)
