"""TPP, performance density and the 3A090 readings, checked against hand computation."""

from __future__ import annotations

import pytest

from cumulo.chips.catalog import Chip, Figure, load_catalog
from cumulo.chips.export import DISCLAIMER, classify, classify_2022, classify_2023, tpp


@pytest.fixture(scope="module")
def cat():
    return load_catalog(include_local=False)


@pytest.mark.parametrize(
    ("chip_id", "hand_tpp", "rule_2022", "rule_2023"),
    [
        ("h100-sxm", 1978.9 * 8, "3A090", "3A090.a"),  # 15831
        ("a100", 624 * 8, "3A090", "3A090.a"),  # 4992
        ("h20", 296 * 8, "not 3A090", "not 3A090"),  # 2368, PD 2.91
        ("a800", 624 * 8, "not 3A090", "3A090.a"),  # NVLink 400 < 600 passed 2022 only
        ("h800", 1978.9 * 8, "not 3A090", "3A090.a"),
        ("rtx-4090", 660.6 * 8, "not 3A090", "3A090.a"),  # 5285; PCIe only, caught in 2023
        ("rtx-5090d", 2375 / 2 * 4, "not 3A090", "not 3A090"),  # 4750: just under 4800
    ],
)
def test_tpp_and_classification_match_hand_computation(cat, chip_id, hand_tpp, rule_2022, rule_2023):
    chip = cat.get(chip_id)
    assert tpp(chip)[0] == pytest.approx(hand_tpp)
    assert classify_2022(chip).startswith(rule_2022 + " ") or classify_2022(chip) == rule_2022
    assert classify_2023(chip).startswith(rule_2023)


def test_performance_density_is_tpp_over_die_area(cat):
    assert classify(cat.get("h100-sxm")).performance_density == pytest.approx(1978.9 * 8 / 814)
    assert classify(cat.get("a100")).performance_density == pytest.approx(4992 / 826)  # 6.04 >= 5.92


def _chip(tops8: float, area: float | None, datacenter: bool = True, io: float | None = None) -> Chip:
    figs = {"int8_tops": Figure(tops8, "derived", "s", "test")}
    if area:
        figs["die_area_mm2"] = Figure(area, "derived", "s", "test")
    if io:
        figs["interconnect_gbs"] = Figure(io, "derived", "s", "test")
    return Chip("t", "T", "v", 2024, "gpu", ("int8",), figs, datacenter=datacenter)


def test_density_prong_catches_a_small_dense_datacenter_chip():
    assert classify_2023(_chip(250, 300)).startswith("3A090.a")  # TPP 2000, PD 6.67


def test_grey_zone_is_3a090b_for_datacenter_parts_only():
    assert classify_2023(_chip(400, 1000)).startswith("3A090.b")  # TPP 3200, PD 3.2
    assert classify_2023(_chip(400, 1000, datacenter=False)).startswith("not 3A090")


def test_interconnect_test_decides_2022_above_the_tpp_line():
    assert classify_2022(_chip(700, 600, io=600)) == "3A090"
    assert classify_2022(_chip(700, 600, io=599)).startswith("not 3A090")


def test_rack_tpp_is_per_chip(cat):
    assert tpp(cat.get("gb200-nvl72"))[0] == pytest.approx(360000 / 72 * 8)


def test_every_classification_carries_the_disclaimer(cat):
    assert classify(cat.get("h20")).disclaimer == DISCLAIMER
    assert "not legal advice" in DISCLAIMER
