"""`cumulo adapters`: a directory peft itself saved is imported (checked, copied, its base recorded), listed,
served by the engine from its new home with PEFT's own logits, and removed; what cannot be served is refused
with one line and exit status 1, and nothing half-imported is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers

from cumulo.cli.main import main
from cumulo.contracts import AdapterRef, SamplingParams
from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig
from tests.support.checkpoints import random_lora_b, save_bpe_tokenizer, write_hf_model


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = save_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return write_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer)


@pytest.fixture(scope="module")
def peft_dir(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])
    )
    random_lora_b(model, 5, 0.2)
    directory = tmp_path_factory.mktemp("peft") / "support-bot"
    model.save_pretrained(directory)
    return directory, model.eval()


def test_import_list_serve_remove(data_dir: Path, base: Path, peft_dir, capsys) -> None:
    directory, reference = peft_dir
    assert main(["--data-dir", str(data_dir), "adapters", "import", str(directory), "--base", "tiny"]) == 0
    assert (
        "imported support-bot: LoRA r=4 alpha=8 over tiny (no base seal recorded)" in capsys.readouterr().out
    )
    assert main(["--data-dir", str(data_dir), "adapters", "list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "support-bot" and row["base"] == "tiny" and row["r"] == 4
    assert sorted(row["target_modules"]) == ["gate_proj", "q_proj", "v_proj"]

    home = data_dir / "adapters" / "support-bot"
    engine = create_engine(str(base), EngineConfig(device="cpu", dtype="float32", kv_cache_gib=0.01))
    prompt = [5, 17, 42, 9, 100, 7]
    engine.add_request(
        prompt,
        SamplingParams(
            max_tokens=1, temperature=0.0, logprobs=5, adapter=AdapterRef("support-bot", str(home))
        ),
        "r",
    )
    [out] = [o for o in engine.step() if o.request_id == "r"]
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([prompt])).logits[0, -1], -1)
    assert out.new_token_ids == [int(expected.argmax())]
    top = out.new_logprobs[0].top
    torch.testing.assert_close(
        torch.tensor([lp for _, lp in top]), expected[[t for t, _ in top]], rtol=1e-4, atol=1e-4
    )

    assert main(["--data-dir", str(data_dir), "adapters", "remove", "support-bot"]) == 0
    assert not home.exists()
    assert main(["--data-dir", str(data_dir), "adapters", "list"]) == 0
    assert "no adapters" in capsys.readouterr().out


def test_mistakes_are_one_line_errors(data_dir: Path, peft_dir, tmp_path: Path, capsys) -> None:
    directory, _ = peft_dir

    def error(*argv: str) -> str:
        assert main(["--data-dir", str(data_dir), "adapters", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("cumulo: error: ") and err.count("\n") == 1, err
        return err

    assert "not a PEFT LoRA adapter" in error("import", str(tmp_path / "missing"))
    bad = tmp_path / "prefix"
    bad.mkdir()
    for f in directory.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["embed_tokens"]}))
    assert "target_modules ['embed_tokens'] not supported" in error("import", str(bad), "--base", "tiny")
    (bad / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    assert "only LoRA adapters" in error("import", str(bad), "--base", "tiny")
    (bad / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    assert "--base" in error("import", str(bad))
    assert "use 1-128 of" in error("import", str(directory), "--name", "ft:x", "--base", "tiny")
    assert main(["--data-dir", str(data_dir), "adapters", "import", str(directory), "--base", "tiny"]) == 0
    capsys.readouterr()
    assert "already imported" in error("import", str(directory), "--base", "tiny")
    assert "no adapter named 'nope'" in error("remove", "nope")
    assert [p.name for p in (data_dir / "adapters").iterdir()] == ["support-bot"]
