"""`cumulo eval ppl --format F --dtype bf16` scores the model `cumulo serve --format F` serves: both build it
with `build_for_use` (quantized from fp32 weights, then cast), so every weight is the same bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig
from cumulo.evaluation import perplexity as evaluation


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, write_tiny_llama) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("eval-llama"), vocab=256, hidden=128, intermediate=256)


@pytest.mark.parametrize("fmt", ["ue8m0-fp8", "mxfp4"])
def test_eval_scores_the_same_weights_serve_serves(
    tiny_dir: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{(7 * i) % 256}" for i in range(40)))
    scored: list[torch.nn.Module] = []
    real = evaluation.perplexity

    def spy(module: torch.nn.Module, *args: object, **kwargs: object) -> evaluation.PerplexityResult:
        scored.append(module)
        return real(module, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluation, "perplexity", spy)
    report = evaluation.run_perplexity(
        str(tiny_dir), format=fmt, dtype="bf16", device="cpu", context=16, stride=8, max_tokens=32,
        text_file=str(text), progress=False,
    )  # fmt: skip
    engine = create_engine(
        str(tiny_dir), EngineConfig(device="cpu", dtype="bf16", format=fmt, kv_cache_gib=0.01)
    )
    [evaluated], served = scored, engine.runner.model

    want, got = served.state_dict(), evaluated.state_dict()
    assert sorted(got) == sorted(want)
    assert any(name.endswith(".codes") for name in want)  # the linears really are packed
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(_bits(got[name]), _bits(tensor)), name
    assert [type(m) for m in evaluated.modules()] == [type(m) for m in served.modules()]
    # and so both score the text the same
    ids = engine.tokenizer.encode(text.read_text())[:32]
    again = real(served, ids, context=16, stride=8, progress=False)
    assert report.dtype == "bfloat16" and report.format == fmt
    assert report.perplexity == again.perplexity
