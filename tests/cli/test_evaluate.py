"""`cumulo eval ppl`: the real SmolLM2 on a few hundred tokens of the default text, and the user errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cumulo.cli.main import main


@pytest.mark.slow
def test_eval_ppl_json_on_smollm2_gives_a_plausible_perplexity(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "ppl", str(smollm2_path), "--max-tokens", "160", "--context", "64", "--stride", "32"]
    assert main([*argv, "--json", "--device", "cpu", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert math.isfinite(report["perplexity"]) and 2.0 < report["perplexity"] < 100.0
    assert report["nll"] == pytest.approx(math.log(report["perplexity"]))
    assert report["tokens"] == 159  # with overlapping windows only the first token goes unscored
    assert report["format"] is None and report["checkpoint"] == "gguf:Q4_1"
    assert report["seal"].startswith("sha256:") and report["dtype"] == "float32"
    assert (report["context"], report["stride"], report["windows"]) == (64, 32, 4)
    assert "pydoc_data/topics.py" in report["source"] and report["source_sha256"].startswith("sha256:")
    assert report["seconds"] > 0
    assert "perplexity" in captured.err  # the progress bar goes to stderr, keeping stdout one JSON object


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--stride", "600"], "stride must be between 1 and the context"),
        (["--context", "1"], "context must be at least 2"),
        (["--max-tokens", "1"], "max_tokens must be at least 2"),
    ],
)
def test_eval_ppl_rejects_bad_window_settings_before_loading(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "ppl", "no-such-model", *options]) == 1
    assert message in capsys.readouterr().err


def test_eval_ppl_rejects_a_context_longer_than_the_model_takes(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "ppl", str(smollm2_path), "--context", "1000000", "--stride", "10"]) == 1
    assert "exceeds the model's" in capsys.readouterr().err


def test_eval_ppl_names_a_missing_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "ppl", "no-such-model"]) == 1
    assert "no-such-model" in capsys.readouterr().err


def test_eval_without_a_measure_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval"]) == 2
    assert "ppl" in capsys.readouterr().out
