"""`cumulo chips calibrate` stores this machine as the `local` chip, which the catalog and predict then use."""

from __future__ import annotations

import json

from cumulo.chips.calibrate import calibrate
from cumulo.chips.catalog import SKINNY_ROWS, load_catalog, local_chip_path
from cumulo.chips.predict import predict
from cumulo.cli.main import main

QUICK = {"bandwidth_mb": 8, "matmul_n": 64, "min_time": 0.01, "repeats": 1}


def test_calibration_becomes_the_local_chip_with_measured_figures():
    assert "local" not in load_catalog().ids()
    record = calibrate("cpu", **QUICK)
    assert local_chip_path().exists()
    local = load_catalog().get("local")
    assert local.memory_bandwidth_gbs == record["memory_bandwidth_gbs"]["value"] > 0
    assert local.get("fp32_tflops") > 0 and local.get("fp32_m1_tflops") > 0 and local.achieved
    assert all(f.provenance == "measured" for f in local.figures.values())
    assert predict("smollm2-135m", "fp32", "local", batch=2, context=64).decode_tok_s > 0


def test_calibrate_cli_prints_json(capsys):
    assert main(["chips", "calibrate", "--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_bandwidth_gbs"]["provenance"] == "measured"


def test_format_curves_measure_the_packed_linear_at_every_row_count():
    record = calibrate("cpu", formats=("mxfp8", "not-a-format"), **QUICK)
    rates = [record[f"mxfp8_m{m}_tflops"]["value"] for m in SKINNY_ROWS]
    assert all(r > 0 for r in rates)
    assert not any(key.startswith("not-a-format") for key in record)  # a format it cannot pack is left out
