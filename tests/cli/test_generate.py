"""`cumulo generate` as a user runs it: JSON output with the promised fields, and one-line errors with a
non-zero exit for the mistakes people make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def cumulo(*args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if data_dir is not None:
        env["CUMULO_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "cumulo.cli.main", *args], capture_output=True, text=True, env=env, timeout=300
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cumulo: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_generate_json_gives_text_tokens_and_timings(smollm2_path: Path) -> None:
    proc = cumulo("generate", str(smollm2_path), "The capital of France is", "--max-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == 8 or out["finish_reason"] == "stop"
    assert out["prompt_token_ids"] and isinstance(out["text"], str) and out["text"]
    assert out["seal"].startswith("sha256:")
    assert out["timings"]["ttft_s"] > 0 and out["timings"]["total_s"] >= out["timings"]["ttft_s"]


@pytest.mark.slow
def test_generate_same_seed_prints_the_same_text(smollm2_path: Path) -> None:
    args = ("generate", str(smollm2_path), "Write a word:", "--max-tokens", "6", "--temperature", "1.0")
    first = cumulo(*args, "--seed", "7", "--json")
    second = cumulo(*args, "--seed", "7", "--json")
    assert json.loads(first.stdout)["token_ids"] == json.loads(second.stdout)["token_ids"]


@pytest.mark.slow
def test_prompt_longer_than_the_context_is_one_line_error(smollm2_path: Path) -> None:
    proc = cumulo("generate", str(smollm2_path), "word " * 50, "--max-model-len", "16")
    assert_one_line_error(proc, "context")


def test_unknown_model_is_one_line_error(tmp_path: Path) -> None:
    assert_one_line_error(cumulo("generate", "no-such-model", "hi", data_dir=tmp_path), "no-such-model")


def test_a_file_that_is_not_a_model_is_one_line_error(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("these are not weights")
    assert_one_line_error(cumulo("generate", str(bogus), "hi", data_dir=tmp_path))


def test_unavailable_device_is_one_line_error(tmp_path: Path) -> None:
    assert_one_line_error(cumulo("generate", "x", "hi", "--device", "quantum", data_dir=tmp_path))


@pytest.mark.slow
def test_chat_streams_a_reply_per_turn_and_quits_on_empty_line(smollm2_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cumulo.cli.main",
            "chat",
            str(smollm2_path),
            "--max-tokens",
            "8",
            "--seed",
            "1",
        ],
        input="Hello!\nWhat is 2+2?\n\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if "assistant> " in line]
    assert len(replies) == 2
    assert all(len(r.split("assistant> ", 1)[1].strip()) > 0 for r in replies)
