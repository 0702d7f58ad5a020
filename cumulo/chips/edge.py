"""Edge targets: will a vision model fit a device, and how many frames per second and joules per frame.

A vision model is described by plain numbers (`VisionWorkload`: parameters, multiply-adds, the largest live
activations) so the chip layer needs nothing from the model code. Fit: weights in the deployed format plus the
two largest consecutive activation maps (a layer's input and output, 8 bits on an int8 device) must fit the
device's memory (`memory_gb`; the IMX500's ~8 MB holds model and activations). Speed: a roofline over the
catalog's int8 (or fp32) rate times an efficiency, plus the per-op overhead; energy: board power / frames per
second. The IMX500's rate is already an achieved one (MobileNet V1 in 3.1 ms), so its efficiency is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from cumulo.chips.catalog import Chip, get_chip
from cumulo.errors import InvalidRequest

# Bytes per weight as deployed (scales included for a large matrix: per-channel int8 ~1, MXINT8 8 + 8/32 bits).
BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 1.0, "mxint8": 1.03125, "fp8": 1.0}
# Share of a CPU's peak that depthwise-heavy nets reach (assumed; bench/edge measures the local CPU's share).
CPU_EFFICIENCY = 0.25


class DoesNotFit(InvalidRequest):
    """The model (weights + activations) is larger than the device's memory."""


@dataclass(frozen=True, slots=True)
class VisionWorkload:
    name: str
    params: int
    macs: int  # multiply-adds per frame
    peak_activations: int  # elements of the largest (input + output) pair of one layer
    ops: int  # layers run per frame (for the per-op overhead)
    operators: frozenset[str] = frozenset()  # what the net is made of, e.g. conv2d, relu, linear


@dataclass(frozen=True, slots=True)
class EdgePrediction:
    chip: str
    format: str
    footprint_mb: float
    memory_mb: float
    frames_per_s: float
    joules_per_frame: float | None


def footprint_bytes(w: VisionWorkload, format: str) -> float:
    if format not in BYTES_PER_WEIGHT:
        raise InvalidRequest(
            f"no edge footprint for format {format!r} (one of {', '.join(BYTES_PER_WEIGHT)})"
        )
    activation_bytes = 4 if format == "fp32" else 1
    return w.params * BYTES_PER_WEIGHT[format] + w.peak_activations * activation_bytes


def check_fits(w: VisionWorkload, chip: Chip | str, format: str) -> float:
    """The footprint in bytes; a model that does not fit is a `DoesNotFit` with one line saying by how much."""
    chip = get_chip(chip)
    need, have = footprint_bytes(w, format), (chip.memory_gb or 0.0) * 1e9
    if need > have:
        raise DoesNotFit(
            f"{w.name} in {format} needs {need / 1e6:.1f} MB (weights + activations); "
            f"{chip.id} has {have / 1e6:.1f} MB"
        )
    return need


# The operators a target's toolchain can run; a target not named here (a CPU) runs any. The IMX500's set is the
# plain CNN layers Sony's converter documents for the sensor's DSP (convolutions, fully connected, ReLU/ReLU6,
# pooling, add, softmax); assumed from its documentation, not checked against a sensor here.
OPERATORS = {
    "imx500": frozenset(
        {
            "conv2d", "depthwise_conv2d", "linear", "relu", "relu6", "max_pool2d", "avg_pool2d",
            "add", "flatten", "pad", "softmax",
        }
    ),
}  # fmt: skip


# What a format computes in on a device: MXINT8's blocks become per-channel int8 on export (a second rounding).
COMPUTES_IN = {"mxint8": "int8"}


def check_deploy(w: VisionWorkload, chip: Chip | str, format: str) -> float:
    """Can `chip` run `w` in `format` at all: the format (a sensor runs only its native ones), the operators,
    then the memory (`check_fits`). The footprint in bytes, or a `DoesNotFit` with one line saying why."""
    chip = get_chip(chip)
    if chip.kind == "sensor" and COMPUTES_IN.get(format, format) not in chip.native:
        raise DoesNotFit(f"{chip.id} runs {', '.join(chip.native)} only; {w.name} would run in {format}")
    missing = sorted(w.operators - OPERATORS[chip.id]) if chip.id in OPERATORS else []
    if missing:
        raise DoesNotFit(f"{chip.id} cannot run {w.name}: no support for {', '.join(missing)}")
    return check_fits(w, chip, format)


def predict_edge(w: VisionWorkload, chip: Chip | str, format: str = "int8") -> EdgePrediction:
    """Frames/s and J/frame of `w` on `chip` in `format`, after the fit check."""
    chip = get_chip(chip)
    need = check_fits(w, chip, format)
    rate = chip.get("int8_tops") if format != "fp32" and "int8" in chip.native else None
    rate = rate or chip.get("fp32_tflops")
    if not rate:
        raise InvalidRequest(f"{chip.id} has no int8 or fp32 rate in the catalog")
    efficiency = 1.0 if chip.kind == "sensor" else CPU_EFFICIENCY
    seconds = 2 * w.macs / (rate * 1e12 * efficiency) + w.ops * (chip.get("op_latency_us") or 0.0) * 1e-6
    fps = 1.0 / seconds
    power = chip.power_w
    return EdgePrediction(
        chip.id, format, need / 1e6, (chip.memory_gb or 0) * 1e3, fps, power / fps if power else None
    )
