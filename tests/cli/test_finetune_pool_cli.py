"""Switching fine-tuning onto the pool from the command line: `cumulo serve --finetune-pool` (or
CUMULO_FINETUNE_POOL=1) starts workers with `--pool`, only with --cluster; `cumulo finetune worker --pool` that
cannot reach a pool, or is given no CPUs, says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cumulo.cli.main import main
from cumulo.service.finetune.lifespan import worker_command
from cumulo.service.settings import Settings


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_the_pool_setting_starts_workers_that_train_on_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "--pool" not in worker_command(Settings(data_dir=tmp_path))
    monkeypatch.setenv("CUMULO_FINETUNE_POOL", "1")
    monkeypatch.setenv("CUMULO_FINETUNE_POOL_CPUS", "2")
    command = worker_command(Settings.from_env(data_dir=tmp_path))
    assert command[-3:] == ["--pool", "--pool-cpus", "2"]


def test_the_pool_needs_a_cluster_and_a_reachable_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data-dir", str(tmp_path), "serve", "--finetune-pool"]) == 1
    assert "needs --cluster" in one_line_error(capsys)
    assert main(["--data-dir", str(tmp_path), "finetune", "worker", "--pool", "--once"]) == 1
    assert "no pool found" in one_line_error(capsys)
    # a process of its own: this one may be connected to a test pool already (Ray connects once per process)
    command = [sys.executable, "-m", "cumulo.cli.main", "--data-dir", str(tmp_path), "finetune", "worker"]
    done = subprocess.run(
        [*command, "--pool", "127.0.0.1:9", "--once"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "cannot reach the pool at 127.0.0.1:9" in line
    assert main(["finetune", "worker", "--pool", "127.0.0.1:9", "--pool-cpus", "0"]) == 1
    assert "--pool-cpus must be at least 1" in one_line_error(capsys)
