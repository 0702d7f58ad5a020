"""What a model asks of a device, in the plain numbers the chip layer's fit check takes (`VisionWorkload`):
parameters, multiply-adds per frame, the largest live activation pair, layers run and the operators used,
measured by running the net once on a blank input. `check_package_fits` is the one fit check of a package
against a class of device (`cumulo.chips.edge.check_deploy`): `cumulo edge deploy --device-class` and
`POST /v1/edge/rollouts` run it before a rollout, and the agent (`--device-class`) before it installs a model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cumulo.chips.edge import VisionWorkload, check_deploy
from cumulo.edge import model


def measure(net: nn.Module, example: torch.Tensor, name: str, operators: frozenset[str]) -> VisionWorkload:
    """Counts the conv and linear layers of one forward pass over `example` (one frame or one crop)."""
    macs, peak, ops = 0, 0, 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs, peak, ops
        ops += 1
        peak = max(peak, inputs[0].numel() + output.numel())
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.inference_mode():
            net(example)
    finally:
        for handle in handles:
            handle.remove()
    params = sum(p.numel() for p in net.parameters())
    return VisionWorkload(name, params, macs, peak, ops, operators)


def package_workload(path: str | Path) -> tuple[VisionWorkload, str]:
    """The workload of a shelf model package (per slot crop, the unit the device runs) and the format it names."""
    net, _labels, format = model.read_package(path)
    crop = torch.zeros(1, 3, 24, 24, dtype=torch.uint8)
    return measure(net, crop, f"{model.ARCH} ({Path(path).name})", model.OPERATORS), format


def check_package_fits(path: str | Path, device_class: str, *formats: str | None) -> float:
    """The package at `path` against the class of device (a chip id of the catalog) in each of `formats` (None,
    or none given: the format the package names). The largest footprint in bytes, or a one-line `DoesNotFit`
    (or InvalidRequest: an unknown class, a format with no footprint, InvalidModel: not a package)."""
    workload, named = package_workload(path)
    return max(check_deploy(workload, device_class, f or named) for f in dict.fromkeys(formats or (None,)))
