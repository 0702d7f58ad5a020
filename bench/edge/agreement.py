"""python -m bench.edge.agreement: where EfficientNet-Lite0 in int8 (or another format) parts from fp32, on the
same 120 crops and metric as `python -m bench.edge` (logit error relative to fp32, top-1 agreement).

`--per-layer N`: the first N 1x1 convs (or the classifier) one at a time in the format, the rest fp32 (about
30 s a layer on a loaded 2-core machine). `--keep a,b c`: the whole net in the format except the named layers
in fp32, one line per comma-separated set. `--gptq`: the whole net also with GPTQ rounding
(`cumulo.edge.calibrate`, calibrated on photos that are not in the set). `--crops N --seed S`: another crop set of
the same photos (`--crops 24 --seed 1`: 480 crops).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from cumulo.edge.calibrate import quantize_calibrated
from cumulo.edge.photos import photo_set
from cumulo.edge.pointwise import DensePointwise, pointwise, quantize_vision_net
from cumulo.edge.vision import load_pretrained


def _swap(net: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, layer)


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
