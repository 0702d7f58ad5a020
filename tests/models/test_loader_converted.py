"""A checkpoint written by `cumulo convert MODEL --format F -o DIR` loads, and is served, under DIR's name
(the loader's promise for a directory), not under the name of one of its tensors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cumulo.cli.main import main
from cumulo.engine.async_engine import build_engine
from cumulo.models.loader import load


@pytest.mark.parametrize("fmt", ["ue8m0-fp8", "mxfp4"])
def test_a_converted_checkpoint_is_named_after_its_directory(
    tmp_path: Path, write_tiny_llama, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_tiny_llama(tmp_path / "tiny-llama", vocab=64, hidden=64, intermediate=128)
    out = tmp_path / f"tiny-llama-{fmt}"
    assert main(["convert", str(source), "--format", fmt, "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out

    loaded = load(out)
    assert loaded.format == f"safetensors:{fmt}"  # the packed checkpoint itself was read
    assert loaded.name == out.name
    # `cumulo serve` keys its engines by engine.info.name: the directory's name is what clients ask for
    engine = build_engine(str(out), device="cpu", kv_cache_gib=0.01)
    try:
        assert engine.info.name == out.name
    finally:
        engine.shutdown()
