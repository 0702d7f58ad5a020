"""The shipped catalog: every chip the brief names is present and every figure says where it came from."""

from __future__ import annotations

import pytest

from cumulo.chips.catalog import FIGURE_KEYS, PROVENANCES, load_catalog, parse_catalog
from cumulo.errors import ChipNotFound, CumuloError

REQUIRED = [
    "h100-sxm",
    "h800",
    "h20",
    "a100",
    "a800",
    "l20",
    "rtx-4090",
    "rtx-5090",
    "rtx-5090d",
    "rtx-pro-6000",
    "gb200-nvl72",
    "ascend-910b",
    "ascend-910c",
    "cloudmatrix-384",
    "ascend-950pr",
    "mlu370-x8",
    "mtt-s4000",
    "br104",
    "mi300x",
    "gaudi3",
    "imx500",
    "cpu-avx2-2core",
]


def test_catalog_has_every_chip_the_brief_names():
    ids = load_catalog(include_local=False).ids()
    assert [c for c in REQUIRED if c not in ids] == []


def test_every_figure_has_a_known_source_and_a_provenance_tag():
    cat = load_catalog(include_local=False)
    for chip in cat.chips.values():
        assert chip.figures, chip.id
        for key, fig in chip.figures.items():
            assert key in FIGURE_KEYS
            assert fig.provenance in PROVENANCES, (chip.id, key)
            assert fig.provenance != "measured", (chip.id, key)  # only calibration measures
            assert fig.source in cat.sources, (chip.id, key)
            assert cat.sources[fig.source].title, fig.source
            if fig.provenance == "derived":
                assert fig.note, f"{chip.id}.{key}: a derived figure must say how it was derived"


def test_headline_figures_match_the_datasheets():
    cat = load_catalog(include_local=False)
    h100 = cat.get("h100-sxm")
    assert (h100.get("bf16_tflops"), h100.memory_bandwidth_gbs, h100.power_w) == (989.4, 3350, 700)
    assert cat.get("h20").memory_bandwidth_gbs == 4000
    assert cat.get("gb200-nvl72").units == 72 and cat.get("cloudmatrix-384").units == 384


def test_unknown_chip_raises_chip_not_found_with_one_line():
    with pytest.raises(ChipNotFound) as info:
        load_catalog(include_local=False).get("h9000")
    assert "\n" not in str(info.value) and "h9000" in str(info.value)


def test_figure_citing_a_missing_source_is_refused():
    data = {
        "sources": {},
        "chips": {
            "x": {
                "name": "X",
                "vendor": "v",
                "year": 2024,
                "power_w": {"value": 1, "provenance": "reported", "source": "nope"},
            }
        },
    }
    with pytest.raises(CumuloError, match="unknown source"):
        parse_catalog(data)


def test_figure_with_an_unknown_provenance_is_refused():
    data = {
        "sources": {"s": {"title": "t"}},
        "chips": {
            "x": {
                "name": "X",
                "vendor": "v",
                "year": 2024,
                "power_w": {"value": 1, "provenance": "rumour", "source": "s"},
            }
        },
    }
    with pytest.raises(CumuloError, match="provenance"):
        parse_catalog(data)


def test_per_format_curves_are_accepted_only_as_measurements():
    sources = {"s": {"title": "t"}}
    raw = {"value": 0.01, "provenance": "measured", "source": "s"}
    chip = {"name": "X", "vendor": "v", "year": 2024, "mxfp4_m4_tflops": raw}
    assert parse_catalog({"sources": sources, "chips": {"x": chip}}).get("x").get("mxfp4_m4_tflops") == 0.01
    chip["mxfp4_m4_tflops"] = {**raw, "provenance": "reported"}
    with pytest.raises(CumuloError, match="measured"):
        parse_catalog({"sources": sources, "chips": {"x": chip}})
