"""Many LoRA adapters served at once over one base (#14): every row of a mixed batch (base and two adapters,
prefill chunks beside decodes) equals PEFT on transformers for that row's own adapter (fp32, 1e-4); an adapter
served unmerged answers as PEFT's merged model does; the adapter cache evicts and rereads without changing an
answer; the prefix cache never hands one adapter's KV blocks to another; bad adapters refuse their request."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers

from cumulo.contracts import AdapterRef, SamplingParams
from cumulo.engine.factory import create_engine
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.errors import InvalidModel, SealMismatch
from tests.support.checkpoints import hf_model, random_lora_b, save_bpe_tokenizer

ADAPTERS = {  # name -> (LoraConfig arguments, seed of its random B)
    "one": (dict(r=4, lora_alpha=8), 3),
    "two": (dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]), 4),
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lora-base")
    model = hf_model("llama", 320, intermediate_size=96, max_position_embeddings=256)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    save_bpe_tokenizer(directory)
    return directory


def _hf(base_dir: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(
    base_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (a directory PEFT itself saved, the PeftModel that is its reference)."""
    out = {}
    for name, (kwargs, seed) in ADAPTERS.items():
        config = peft.LoraConfig(**{"target_modules": ALL, **kwargs})
        model = peft.get_peft_model(_hf(base_dir), config)
        random_lora_b(model, seed, 0.2)
        directory = tmp_path_factory.mktemp(f"adapter-{name}")
        model.save_pretrained(directory)
        out[name] = (directory, model.eval())
    return out


def _engine(base_dir: Path, **options: object) -> LLMEngine:
    config = dict(device="cpu", dtype="float32", kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=16)
    return create_engine(str(base_dir), EngineConfig(**{**config, **options}))  # type: ignore[arg-type]


def _ref(name: str, adapters) -> AdapterRef:
    return AdapterRef(name=name, path=str(adapters[name][0]))


def _record_rows(engine: LLMEngine) -> list[tuple[str, list[int], torch.Tensor]]:
    """Wrap the runner so every logits row is kept with its request and the tokens it was computed over."""
    rows: list[tuple[str, list[int], torch.Tensor]] = []
    execute = engine.runner.execute

    def recording(batch):
        logits = execute(batch)
        known = [(s.request_id, s.token_ids[: s.num_computed_tokens + 1]) for s in batch.decodes]
        known += [
            (s.request_id, list(s.token_ids))
            for s, n in batch.prefills
            if s.num_computed_tokens + n == s.num_tokens
        ]
        assert len(known) == logits.shape[0]
        rows.extend((rid, ids, row) for (rid, ids), row in zip(known, logits, strict=True))
        return logits

    engine.runner.execute = recording  # type: ignore[method-assign]
    return rows


def _run(engine: LLMEngine, requests: list[tuple[str, list[int], AdapterRef | None]], max_tokens: int = 5):
    """Greedy, all at once; {request id: (tokens, chosen-token logprobs, cached prompt tokens)}."""
    for rid, prompt, ref in requests:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0, adapter=ref
        )
        engine.add_request(prompt, params, rid)
    out: dict[str, tuple[list[int], list[float], int]] = {rid: ([], [], 0) for rid, _, _ in requests}
    while engine.has_unfinished_requests():
        for o in engine.step():
            ids, lps, _ = out[o.request_id]
            out[o.request_id] = (
                ids + o.new_token_ids,
                lps + [lp.logprob for lp in o.new_logprobs],
                o.num_cached_tokens,
            )
    return out


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_mixed_batch_rows_equal_peft_for_their_own_adapter(base_dir: Path, adapters) -> None:
    engine = _engine(base_dir)
    rows = _record_rows(engine)
    requests = [
        ("base-a", _prompt(1, 9), None),
        ("one-a", _prompt(2, 13), _ref("one", adapters)),
        ("two-a", _prompt(3, 6), _ref("two", adapters)),
        ("one-b", _prompt(4, 21), _ref("one", adapters)),
        ("base-b", _prompt(5, 3), None),
        ("two-b", _prompt(2, 13), _ref("two", adapters)),  # one-a's prompt: same tokens, another adapter
    ]
    out = _run(engine, requests)
    reference = {"base": _hf(base_dir), "one": adapters["one"][1], "two": adapters["two"][1]}
    assert {rid for rid, _, _ in rows} == {rid for rid, _, _ in requests}
    assert len(rows) == 6 * 5
    for rid, ids, row in rows:
        with torch.no_grad():
            expected = reference[rid.split("-")[0]](torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4)
    assert out["one-a"][0] != out["two-b"][0]  # the adapters really differ on the same prompt
    assert engine.adapters.loads == 2


def test_each_row_equals_its_single_adapter_run(base_dir: Path, adapters) -> None:
    alone = {}
    for rid, seed, ref in (
        ("base", 1, None),
        ("one", 2, _ref("one", adapters)),
        ("two", 3, _ref("two", adapters)),
    ):
        alone.update(_run(_engine(base_dir), [(rid, _prompt(seed, 11), ref)]))
    mixed = _run(
        _engine(base_dir),
        [
            ("two", _prompt(3, 11), _ref("two", adapters)),
            ("base", _prompt(1, 11), None),
            ("one", _prompt(2, 11), _ref("one", adapters)),
        ],
    )
    for rid in alone:
        assert mixed[rid][0] == alone[rid][0]
        torch.testing.assert_close(
            torch.tensor(mixed[rid][1]), torch.tensor(alone[rid][1]), rtol=1e-4, atol=1e-4
        )


def test_unmerged_adapter_answers_as_the_merged_model(base_dir: Path, adapters, tmp_path: Path) -> None:
    directory, _ = adapters["one"]
    merged = peft.PeftModel.from_pretrained(_hf(base_dir), directory).merge_and_unload()
    merged.save_pretrained(tmp_path, safe_serialization=True)
    save_bpe_tokenizer(tmp_path)
    prompt = _prompt(7, 10)
    unmerged = _run(_engine(base_dir), [("x", prompt, _ref("one", adapters))], max_tokens=8)["x"]
    as_merged = _run(_engine(tmp_path), [("x", prompt, None)], max_tokens=8)["x"]
    assert unmerged[0] == as_merged[0]
    torch.testing.assert_close(torch.tensor(unmerged[1]), torch.tensor(as_merged[1]), rtol=1e-4, atol=1e-4)


def test_eviction_and_reload_keep_outputs_equal(base_dir: Path, adapters) -> None:
    engine = _engine(base_dir, max_adapters=1)
    prompt = _prompt(8, 12)
    first = {name: _run(engine, [(name, prompt, _ref(name, adapters))])[name][:2] for name in ("one", "two")}
    assert engine.adapters.loads == 2 and _ref("one", adapters) not in engine.adapters  # "two" evicted "one"
    again = _run(engine, [("one", prompt, _ref("one", adapters)), ("two", prompt, _ref("two", adapters))])
    assert engine.adapters.loads == 4  # both read again (each evicting the other), and both still running
    for name in ("one", "two"):
        assert again[name][0] == first[name][0]
        torch.testing.assert_close(torch.tensor(again[name][1]), torch.tensor(first[name][1]), rtol=0, atol=0)


def test_prefix_cache_is_never_shared_across_adapters(base_dir: Path, adapters) -> None:
    engine = _engine(base_dir)
    prompt = _prompt(9, 17)  # four full blocks of 4
    cached = {}
    for rid, ref in (
        ("base", None),
        ("one", _ref("one", adapters)),
        ("two", _ref("two", adapters)),
        ("one-again", _ref("one", adapters)),
        ("base-again", None),
    ):
        cached[rid] = _run(engine, [(rid, prompt, ref)])[rid]
    assert cached["one"][2] == 0 and cached["two"][2] == 0  # the base's blocks were there, and not used
    assert cached["one-again"][2] == 16 and cached["base-again"][2] == 16
    assert cached["one-again"][0] == cached["one"][0] and cached["base-again"][0] == cached["base"][0]


def test_bad_adapters_refuse_only_their_request(base_dir: Path, adapters, tmp_path: Path) -> None:
    engine = _engine(base_dir)
    with pytest.raises(InvalidModel, match="not a PEFT LoRA adapter"):
        engine.add_request([5, 6, 7], SamplingParams(adapter=AdapterRef("gone", str(tmp_path / "nope"))))
    sealed = tmp_path / "sealed"
    sealed.mkdir()
    for f in Path(adapters["one"][0]).iterdir():
        (sealed / f.name).write_bytes(f.read_bytes())
    (sealed / "cumulo_adapter.json").write_text(json.dumps({"base_model": "x", "base_seal": "sha256:other"}))
    with pytest.raises(SealMismatch, match="trained on base sha256:other"):
        engine.add_request([5, 6, 7], SamplingParams(adapter=AdapterRef("sealed", str(sealed))))
    config = json.loads((sealed / "adapter_config.json").read_text())
    (sealed / "cumulo_adapter.json").unlink()
    (sealed / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["lm_head"]}))
    with pytest.raises(InvalidModel, match="target_modules"):
        engine.add_request([5, 6, 7], SamplingParams(adapter=AdapterRef("head", str(sealed))))
    assert not engine.has_unfinished_requests()
    assert _run(engine, [("ok", [5, 6, 7], None)])["ok"][0]
