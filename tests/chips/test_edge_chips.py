"""Edge targets in the catalog: a model that does not fit a device's memory is refused in one line, one that
fits gets frames/s and joules per frame, and the int8 rate is what makes the small CPU faster."""

from __future__ import annotations

import pytest

from cumulo.chips.catalog import get_chip
from cumulo.chips.edge import DoesNotFit, VisionWorkload, check_fits, predict_edge

# EfficientNet-Lite0's figures (cumulo.edge.vision.workload computes them from the net; tests/edge checks that).
LITE0 = VisionWorkload("efficientnet-lite0", 4_631_000, 385_187_552, 1_526_880, 50)
RESNET50 = VisionWorkload("resnet-50", 25_557_032, 4_100_000_000, 1_605_632, 54)


def test_edge_targets_have_sourced_rates_memory_and_power() -> None:
    for chip_id in ("imx500", "rpi5"):
        chip = get_chip(chip_id)
        assert chip.get("int8_tops") and chip.memory_gb and chip.power_w
        assert all(f.source for f in chip.figures.values())


def test_a_model_too_big_for_the_sensor_is_refused_with_one_line() -> None:
    assert check_fits(LITE0, "imx500", "int8") < 8e6
    with pytest.raises(DoesNotFit, match=r"resnet-50 in int8 needs 27\.2 MB .* imx500 has 8\.0 MB"):
        predict_edge(RESNET50, "imx500", "int8")
    with pytest.raises(DoesNotFit, match="efficientnet-lite0 in fp32"):
        check_fits(LITE0, "imx500", "fp32")


def test_predictions_give_frames_per_second_and_joules_per_frame() -> None:
    sensor, pi_int8, pi_fp32 = (
        predict_edge(LITE0, "imx500"),
        predict_edge(LITE0, "rpi5", "int8"),
        predict_edge(LITE0, "rpi5", "fp32"),
    )
    # MobileNet V1 (569 M multiply-adds) takes 3.1 ms on the sensor; Lite0 has fewer, so it is faster.
    assert sensor.frames_per_s > 1 / 3.1e-3
    assert pi_int8.frames_per_s > 2 * pi_fp32.frames_per_s  # SDOT's 4x lanes, less the per-op overhead
    assert sensor.joules_per_frame is not None and pi_int8.joules_per_frame is not None
    assert sensor.joules_per_frame < pi_int8.joules_per_frame / 10  # the point of computing in the sensor
    assert pi_int8.joules_per_frame == pytest.approx(7.0 / pi_int8.frames_per_s)
