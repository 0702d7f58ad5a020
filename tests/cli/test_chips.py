"""`cumulo chips ...`: JSON outputs parse and carry the keys scripts rely on; errors are one line, exit 1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cumulo.cli.main import main

pytestmark = pytest.mark.usefixtures("isolated_data_dir")  # no real calibration leaks in

PREDICT_KEYS = {
    "prefill_tok_s",
    "decode_tok_s",
    "ttft_s",
    "tpot_s",
    "max_sequences",
    "joules_per_token",
    "usd_per_million_tokens",
}


def _json(capsys, argv: list[str]):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_list_json_has_every_chip_with_its_export_class(capsys):
    rows = _json(capsys, ["chips", "list", "--json"])
    by_id = {r["id"]: r for r in rows}
    assert "h100-sxm" in by_id and "cloudmatrix-384" in by_id
    assert by_id["h20"]["export"]["rule_2023"].startswith("not 3A090")


def test_show_json_has_power_memory_bandwidth_and_sources(capsys):
    out = _json(capsys, ["chips", "show", "h100-sxm", "--json"])
    assert (out["power_w"], out["memory_gb"], out["memory_bandwidth_gbs"]) == (700, 80, 3350)
    assert out["figures"]["bf16_tflops"]["provenance"] == "vendor-published"
    assert "nvidia-h100" in out["sources"]
    assert "not legal advice" in out["export"]["disclaimer"]


def test_predict_json_has_the_required_keys(capsys):
    out = _json(
        capsys,
        [
            "chips",
            "predict",
            "llama-3.1-8b",
            "--chip",
            "h20",
            "--format",
            "fp8",
            "--batch",
            "4",
            "--context",
            "2048",
            "--json",
        ],
    )
    assert PREDICT_KEYS <= set(out)
    assert out["batch"] == 4 and out["context"] == 2048 and out["decode_tok_s"] > 0


def test_predict_several_chips_gives_a_list_and_a_png(capsys, tmp_path):
    png = tmp_path / "decode.png"
    out = _json(
        capsys,
        [
            "chips",
            "predict",
            "llama-3.1-8b",
            "--chip",
            "h100-sxm,h20",
            "--format",
            "bf16",
            "--format",
            "fp8",
            "--json",
            "--plot",
            str(png),
        ],
    )
    assert len(out) == 4 and all(PREDICT_KEYS <= set(p) for p in out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_json_gives_ratios_to_the_first_chip(capsys):
    out = _json(capsys, ["chips", "compare", "gb200-nvl72", "cloudmatrix-384", "--json"])
    assert out[1]["ratio_to_first"]["power_w"] == pytest.approx(559 / 145)
    assert out[1]["ratio_to_first"]["bf16_tflops"] == pytest.approx(300 / 180)


def test_tables_print_without_json(capsys):
    assert main(["chips", "show", "ascend-910c"]) == 0
    out = capsys.readouterr().out
    assert "not legal advice" in out and "huawei-cm384-paper" in out


def test_unknown_chip_exits_1_with_one_line(capsys):
    assert main(["chips", "show", "h9000"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "h9000" in err[0]


def test_unknown_chip_from_the_shell_exits_1_with_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cumulo.cli.main",
            "--data-dir",
            str(tmp_path),
            "chips",
            "predict",
            "llama-3.1-8b",
            "--chip",
            "nope",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_compare_plot_writes_a_png(capsys, tmp_path):
    png = tmp_path / "racks.png"
    assert main(["chips", "compare", "gb200-nvl72", "cloudmatrix-384", "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "cloudmatrix-384" in capsys.readouterr().out
