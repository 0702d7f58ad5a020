"""The providers `cumulo serve` gives the console's operator pages (cli/console_ops.py): the whole chip catalog
with the performance model's own predictions, a reason where there is none, and only preset model names."""

from __future__ import annotations

import json

import pytest

from cumulo.chips.catalog import load_catalog
from cumulo.chips.predict import predict
from cumulo.cli.console_ops import chips_report, install, this_machine
from cumulo.errors import CumuloError, InvalidRequest
from cumulo.service.console.ops import ChipQuery


def test_every_catalog_chip_comes_with_its_prediction_or_the_reason_there_is_none():
    report = chips_report(ChipQuery("llama-3.1-8b", "fp8", 4, 1024))
    rows = {row["id"]: row for row in report["data"]}
    assert list(rows) == load_catalog().ids()
    for chip_id, row in rows.items():
        try:
            expected = predict("llama-3.1-8b", "fp8", chip_id, 4, 1024)
        except CumuloError as exc:
            assert row["prediction"] is None and row["error"] == str(exc)
            continue
        assert row["error"] is None
        assert row["prediction"]["decode_tok_s"] == expected.decode_tok_s
        assert row["prediction"]["usd_per_million_tokens"] == expected.usd_per_million_tokens
    json.dumps(report, allow_nan=False)  # what the route returns must be plain JSON
    assert "llama-3.1-8b" in report["models"] and "fp8" in report["formats"]


def test_only_preset_models_and_known_formats_are_predicted():
    with pytest.raises(InvalidRequest, match="unknown model"):
        chips_report(ChipQuery("/etc/some-model-dir", "bf16", 1, 128))  # never a path the caller names
    with pytest.raises(CumuloError):
        chips_report(ChipQuery("llama-3.1-8b", "no-such-format", 1, 128))


def test_install_gives_the_app_both_providers_and_this_machine_is_one_live_node():
    class App:
        class state:  # noqa: N801
            pass

    install(App)
    assert App.state.ops_chips is chips_report and App.state.ops_nodes is this_machine
    (node,) = this_machine()
    assert node["alive"] and node["chip"] in load_catalog().ids() and node["cpus"] >= 1
    pool = [{"name": "n2"}]
    install(App, nodes=lambda: pool)
    assert App.state.ops_nodes() == pool
