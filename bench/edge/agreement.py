"""python -m bench.edge.agreement: where EfficientNet-Lite0 in int8 (or another format) parts from fp32, on the
same 120 crops and metric as `python -m bench.edge` (logit error relative to fp32, top-1 agreement).

`--per-layer N`: the first N 1x1 convs (or the classifier) one at a time in the format, the rest fp32 (about
30 s a layer on a loaded 2-core machine). `--keep a,b c`: the whole net in the format except the named layers
in fp32, one line per comma-separated set. `--gptq`: the whole net also with GPTQ rounding
(`cumulo.edge.calibrate`, calibrated on photos that are not in the set). `--crops N --seed S`: another crop set of
the same photos (`--crops 24 --seed 1`: 480 crops). `--split`: the int8 net with fp32 activations (weights alone)
and with fp32 weights (activations alone), the whole net cast to bf16 and to fp16 (what 8 and 11 mantissa bits
keep), and the agreement by fp32's top-2 logit margin: how close to a tie the crops are that each path flips.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from cumulo.edge.calibrate import quantize_calibrated
from cumulo.edge.photos import photo_set
from cumulo.edge.pointwise import (
    RELU6_STEP,
    DensePointwise,
    Int8Pointwise,
    corrected_bias,
    per_channel_int8,
    pointwise,
    quantize_vision_net,
)
from cumulo.edge.vision import load_pretrained


def _swap(net: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, layer)


class SplitPointwise(nn.Module):
    """A 1x1 conv (or the classifier) with only one side of the int8 GEMM rounded: `weights` rounds the weight
    as `Int8Pointwise` does (per channel, bias corrected) and keeps fp32 activations; `activations` keeps the
    fp32 weight and rounds the input to the codes the int8 path sends (u8 at 6/255 for ReLU6 inputs, else int8
    at a per-pixel step)."""

    def __init__(self, layer: nn.Module, name: str, side: str, input_mean: torch.Tensor | None) -> None:
        super().__init__()
        w, b = layer.weight.detach().flatten(1).float(), layer.bias.detach().float()  # [N, K], [N]
        if side == "weights":
            codes, scale = per_channel_int8(w)
            rounded = codes.float() * scale[:, None]
            w, b = rounded, corrected_bias(b, rounded, w, input_mean)
        self.weight, self.bias, self.side = w, b, side
        self.relu6_input = name.endswith("project")  # as `pointwise` decides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # [pixels, K]
        if self.side == "activations" and self.relu6_input:
            rows = Int8Pointwise._relu6_levels(rows) * RELU6_STEP
        elif self.side == "activations":
            step = rows.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127.0  # [pixels, 1]
            rows = torch.round(rows / step) * step
        y = F.linear(rows, self.weight, self.bias)  # [pixels, N]
        return y if x.dim() == 2 else y.view(x.shape[0], *x.shape[2:], -1).permute(0, 3, 1, 2)


def split_net(base: nn.Module, side: str) -> nn.Module:
    """`base` (fp32) with every 1x1 conv and the classifier as `SplitPointwise` of `side`."""
    net = copy.deepcopy(base)
    for name, layer in list(base.named_modules()):
        if isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1)):
            _swap(net, name, SplitPointwise(layer, name, side, base.input_means.get(name)))
    return net


MARGIN_BINS = (0.0, 0.05, 0.2, 1.0, float("inf"))


def by_margin(out: torch.Tensor, ref: torch.Tensor) -> str:
    """Agreement per bin of fp32's top-2 logit margin: 'margin [lo, hi): agreed/crops'."""
    top2 = ref.topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    agree = out.argmax(-1) == ref.argmax(-1)
    parts = []
    for lo, hi in zip(MARGIN_BINS, MARGIN_BINS[1:], strict=False):
        inside = (margin >= lo) & (margin < hi)
        parts.append(f"[{lo:g}, {hi:g}): {int(agree[inside].sum())}/{int(inside.sum())}")
    return "  ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--format", default="int8")
    parser.add_argument("--per-layer", type=int, default=0, metavar="N")
    parser.add_argument("--keep", nargs="*", default=[], metavar="LAYERS")
    parser.add_argument("--gptq", action="store_true", help="also the whole net with GPTQ rounding")
    parser.add_argument(
        "--crops", type=int, default=6, help="crops per photo (6 with seed 0: the bench's 120)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split", action="store_true", help="weights alone, activations alone, and agreement by fp32 margin"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_pretrained()
    images = photo_set(args.crops, args.seed).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = quantize_vision_net(copy.deepcopy(base), "fp32")(images)

    def score(net: nn.Module) -> str:
        with torch.inference_mode():
            out = net(images)
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
        return f"{float((out - ref).norm() / ref.norm()):.4f} {float(agree):.3f}"

    print(
        f"{args.format} whole net: {score(quantize_vision_net(copy.deepcopy(base), args.format))}", flush=True
    )
    if args.split:
        with torch.inference_mode():
            whole = quantize_vision_net(copy.deepcopy(base), args.format)(images)
        print(f"  by fp32 top-2 logit margin: {by_margin(whole, ref)}", flush=True)
        for side in ("weights", "activations"):
            net = split_net(base, side)
            with torch.inference_mode():
                out = net(images)
            print(f"int8 {side} alone: {score(net)}; {by_margin(out, ref)}", flush=True)
        for dtype in (torch.bfloat16, torch.float16):
            cast = copy.deepcopy(base).to(dtype)
            with torch.inference_mode():
                out = torch.cat([cast(part.to(dtype)).float() for part in images.split(40)])
            agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
            error = (out - ref).norm() / ref.norm()
            print(f"whole net in {dtype}: {float(error):.4f} {float(agree):.3f}; {by_margin(out, ref)}")
    if args.gptq:
        print(f"{args.format} whole net, GPTQ: {score(quantize_calibrated(base, args.format))}", flush=True)
    names = [
        n
        for n, m in base.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    ]
    for name in names[: args.per_layer]:
        net = quantize_vision_net(copy.deepcopy(base), "fp32")
        _swap(net, name, pointwise(base.get_submodule(name), args.format, name, base.input_means.get(name)))
        print(f"only {name}: {score(net)}", flush=True)
    for keep in args.keep:
        net = quantize_vision_net(copy.deepcopy(base), args.format)
        for name in keep.split(","):
            layer = base.get_submodule(name)
            _swap(net, name, DensePointwise(layer.weight, layer.bias))
        print(f"all but {keep} in fp32: {score(net)}", flush=True)


if __name__ == "__main__":
    main()
