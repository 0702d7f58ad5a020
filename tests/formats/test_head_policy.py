"""The output-head policy (`cumulo convert --head`, `QuantPolicy.from_patterns(head=...)`): a checkpoint holds the
head in bf16 or packed like the body, a tied embedding is then stored once, and the loader serves what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cumulo.cli.main import main
from cumulo.errors import FormatError
from cumulo.formats.checkpoint import load_packed_state_dict
from cumulo.formats.linear import PackedLinear, QuantPolicy, quantize_model
from cumulo.formats.packed import PackedWeight
from cumulo.formats.quantize import quantize
from cumulo.models.attention import AttentionContext
from cumulo.models.loader import load
from cumulo.models.registry import build_model
from tests.support.checkpoints import hf_model, save_word_tokenizer

FAMILIES = ["ue8m0-fp8", "fp8", "mxfp8", "mxfp4", "nvfp4", "hif8", "mxfp6"]


def _write(path: Path, tied: bool) -> Path:
    torch.manual_seed(0)
    model = hf_model(
        "llama", 160, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
        tie_word_embeddings=tied,
    )  # fmt: skip
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    save_word_tokenizer(path, 160)
    return path


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("tied"), tied=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("untied"), tied=False)


def _logits(directory: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    loaded = load(str(directory), dtype=torch.float32)
    module = build_model(loaded.config, loaded.weights, torch.float32)
    ids = torch.tensor([1, 5, 9, 33, 70, 2])
    with torch.inference_mode():
        hidden = module(ids, torch.arange(ids.numel()), AttentionContext(kv_cache=None))
        return module, module.compute_logits(hidden)


def _bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


@pytest.mark.parametrize("fmt", ["ue8m0-fp8", "mxfp4"])
def test_head_body_stores_a_tied_matrix_once_packed_and_the_loader_serves_it(
    tied: Path, tmp_path: Path, fmt: str
) -> None:
    bf16, body = tmp_path / "bf16", tmp_path / "body"
    assert main(["convert", str(tied), "-f", fmt, "-o", str(bf16), "--head", "bf16"]) == 0
    assert main(["convert", str(tied), "-f", fmt, "-o", str(body), "--head", "body"]) == 0
    kept, _ = load_packed_state_dict(bf16)
    assert kept["model.embed_tokens.weight"].dtype == torch.bfloat16 and "lm_head.weight" not in kept
    weights, _ = load_packed_state_dict(body)
    head = weights["lm_head.weight"]
    assert isinstance(head, PackedWeight) and head.format == fmt and head.shape == (160, 64)
    assert "model.embed_tokens.weight" not in weights  # one copy of the tied matrix, the packed one
    assert json.loads((body / "config.json").read_text())["tie_word_embeddings"] is True
    # 160 x 64 in bf16 is 20 kB; packed it is a half (8-bit) or a quarter (4-bit) of that
    assert _bytes(body) < _bytes(bf16) - 160 * 64 * (0.9 if fmt == "ue8m0-fp8" else 1.4)
    module, logits = _logits(body)
    assert isinstance(module.lm_head, PackedLinear)
    # the embedding table is the head's own dequantized rows, exactly
    assert torch.equal(module.model.embed_tokens.weight, head.dequantize(torch.float32))
    # and the logits are the packed head's product with the final hidden states
    _, dense_logits = _logits(bf16)
    assert not torch.equal(logits, dense_logits)
    assert torch.isfinite(logits).all()


def test_head_body_on_an_untied_model_packs_the_head_and_keeps_the_embedding(
    untied: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(untied), "-f", "mxfp8", "-o", str(out), "--head", "body"]) == 0
    weights, _ = load_packed_state_dict(out)
    assert isinstance(weights["lm_head.weight"], PackedWeight)
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    module, logits = _logits(out)
    assert isinstance(module.lm_head, PackedLinear) and torch.isfinite(logits).all()
    source = load(str(untied)).weights["model.embed_tokens.weight"]
    assert torch.equal(module.model.embed_tokens.weight, source.to(torch.bfloat16).float())


def test_head_body_converted_checkpoint_generates(tied: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(tied), "-f", "ue8m0-fp8", "-o", str(out), "--head", "body"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "hello", "--max-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"] is not None


def test_head_body_with_calibration_writes_the_same_layout(tied: Path, tmp_path: Path) -> None:
    rtn, gptq = tmp_path / "rtn", tmp_path / "gptq"
    assert main(["convert", str(tied), "-f", "mxfp8", "-o", str(rtn), "--head", "body"]) == 0
    args = ["convert", str(tied), "-f", "mxfp8", "-o", str(gptq), "--head", "body", "--calibrate", "300"]
    assert main(args) == 0
    a, _ = load_packed_state_dict(rtn)
    b, _ = load_packed_state_dict(gptq)
    assert a.keys() == b.keys()
    assert a["lm_head.weight"].scales.shape == b["lm_head.weight"].scales.shape
    assert not torch.equal(
        a["lm_head.weight"].codes, b["lm_head.weight"].codes
    )  # the head was calibrated too


def test_quantize_model_head_policy(tied: Path) -> None:
    loaded = load(str(tied), dtype=torch.float32)
    for head, packed in (("bf16", False), ("body", True)):
        module = build_model(loaded.config, dict(loaded.weights), torch.float32)
        quantize_model(module, "ue8m0-fp8", QuantPolicy.from_patterns(head=head))
        assert isinstance(module.lm_head, PackedLinear) is packed
        assert isinstance(module.model.embed_tokens, torch.nn.Embedding)  # lookups stay a plain table
    with pytest.raises(FormatError, match="head policy"):
        QuantPolicy.from_patterns(head="fp4")


@pytest.mark.parametrize("fmt", FAMILIES)
def test_dequantize_rows_equals_the_rows_of_dequantize(fmt: str) -> None:
    w = torch.randn(300, 96, generator=torch.Generator().manual_seed(1))
    packed = quantize(w, fmt)
    rows = torch.tensor([0, 299, 128, 5, 5, 130])
    assert torch.equal(packed.dequantize_rows(rows), packed.dequantize()[rows])


def test_packed_head_refines_its_top_logits_in_fp32() -> None:
    """bf16 inputs: the kernel's 16-bit logits, except each row's top 8, which are exact fp32 products."""
    g = torch.Generator().manual_seed(2)
    head = PackedLinear(quantize(torch.randn(200, 64, generator=g), "ue8m0-fp8"))
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    logits = head.fp32_logits(x)
    assert logits is not None and logits.dtype == torch.float32
    exact = x.float() @ head.packed.dequantize().T
    top = head(x).float().topk(8, dim=-1).indices  # the 16-bit top 8 are the ones refined
    assert torch.allclose(logits.gather(1, top), exact.gather(1, top), rtol=1e-6, atol=1e-5)
    assert head.fp32_logits(x.float()) is None  # fp32 inputs: the kernel's outputs are already fp32


def test_serving_with_head_body_converts_the_head_as_convert_writes_it(tied: Path, tmp_path: Path) -> None:
    """`serve --format F --head body` (EngineConfig.head) packs the head on load with the same codes that
    `cumulo convert --head body` stores, and both generate the same greedy tokens."""
    from cumulo.contracts import SamplingParams
    from cumulo.engine.llm import LLM

    out = tmp_path / "body"
    assert main(["convert", str(tied), "-f", "ue8m0-fp8", "-o", str(out), "--head", "body"]) == 0
    stored, _ = load_packed_state_dict(out)
    options = {"device": "cpu", "dtype": "float32", "kv_cache_gib": 0.01}
    on_load = LLM(str(tied), format="ue8m0-fp8", head="body", **options)
    default = LLM(str(tied), format="ue8m0-fp8", **options)
    head = on_load.engine.runner.model.lm_head
    assert isinstance(head, PackedLinear) and torch.equal(head.codes, stored["lm_head.weight"].codes)
    assert not isinstance(default.engine.runner.model.lm_head, PackedLinear)  # bf16 stays the default
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = [[1, 5, 9, 33, 70]]
    assert [c.token_ids for c in on_load.generate(prompt, params)] == [
        c.token_ids for c in LLM(str(out), **options).generate(prompt, params)
    ]


def test_head_without_a_format_is_a_one_line_error(tied: Path, capsys) -> None:
    assert (
        main(
            [
                "eval",
                "ppl",
                str(tied),
                "--head",
                "body",
                "--max-tokens",
                "16",
                "--context",
                "8",
                "--stride",
                "4",
            ]
        )
        != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--head applies to a conversion" in err[0]


def test_eval_reports_the_head_it_scored(tied: Path, capsys) -> None:
    args = [
        "eval",
        "ppl",
        str(tied),
        "--format",
        "mxfp8",
        "--max-tokens",
        "24",
        "--context",
        "8",
        "--stride",
        "4",
    ]
    for head in ("bf16", "body"):
        assert main([*args, "--head", head, "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["head"] == head
