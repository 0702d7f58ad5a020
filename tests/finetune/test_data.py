"""Training files: every bad line is reported with its number and problem; the loss mask covers exactly the
weight-1 assistant turns (content and end of turn); packed examples never see each other."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cumulo.finetune.api import validate_training_file
from cumulo.finetune.data import Example, load_tokenizer, pack, tokenize
from cumulo.models.attention import AttentionContext
from cumulo.models.loader import load
from cumulo.models.registry import build_model
from tests.support.checkpoints import hf_model


def _chat(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


GOOD = _chat(("user", "Hello world!"), ("assistant", "The quick brown fox."))


def test_bad_lines_are_reported_by_number_and_problem(make_model, tmp_path: Path) -> None:
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps({"prompt": "x"}),
        json.dumps(_chat(("user", "hi"), ("robot", "beep"))),
        json.dumps(_chat(("user", "hi"), ("assistant", "  "))),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "weight": 2}]}),
        json.dumps(_chat(("user", "The quick brown fox jumps over the lazy dog. " * 20), ("assistant", "ok"))),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "weight": 0}]}),
        "",
        json.dumps(GOOD),
    ]  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = validate_training_file(path, make_model("llama"), max_seq_len=128)
    problems = dict(report.errors)
    assert sorted(problems) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "not valid JSON" in problems[2]
    assert "'messages'" in problems[3]
    assert "unknown role 'robot'" in problems[4]
    assert "empty assistant message" in problems[5]
    assert "'weight' must be 0 or 1" in problems[6]
    assert "too long" in problems[7] and "128" in problems[7]
    assert "no assistant message to learn from" in problems[8]
    assert problems[9] == "empty line"
    assert report.n_examples == 2 and not report.ok
    assert (
        report.first_error().startswith("line 2: not valid JSON") and "(and 7 more)" in report.first_error()
    )


def test_only_weight_one_assistant_tokens_are_trained(make_model) -> None:
    tokenizer, _ = load_tokenizer(make_model("llama"))
    messages = [
        {"role": "system", "content": "Emoji 🙂"},
        {"role": "user", "content": "Hello world!"},
        {"role": "assistant", "content": "The quick brown fox.", "weight": 0},
        {"role": "user", "content": "numbers"},
        {"role": "assistant", "content": "12345 and symbols"},
    ]
    example = tokenize(tokenizer, messages, 1)
    trained = [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m]
    assert tokenizer.decode(trained, skip_special_tokens=False).strip() == "12345 and symbols<|im_end|>"
    report_counts = sum(example.loss_mask)
    assert report_counts == len(trained) and len(example) > report_counts


def test_packed_examples_do_not_attend_to_each_other(make_model) -> None:
    """The logits of an example packed after two others equal its logits alone (gemma3: windows too)."""
    loaded = load(make_model("gemma3"))
    model = build_model(loaded.config, loaded.weights)
    g = torch.Generator().manual_seed(5)
    examples = [
        Example(i, torch.randint(0, 320, (n,), generator=g).tolist(), [1] * n)
        for i, n in enumerate((7, 12, 20))
    ]
    (seq,) = pack(examples, 64)
    assert seq.n_tokens == 39 and seq.positions[7:19].tolist() == list(range(12))
    with torch.no_grad():
        packed = model(
            seq.input_ids, seq.positions, AttentionContext(kv_cache=None, segment_ids=seq.segment_ids)
        )
        for start, e in ((0, examples[0]), (7, examples[1]), (19, examples[2])):
            alone = model(torch.tensor(e.input_ids), torch.arange(len(e)), AttentionContext(kv_cache=None))
            torch.testing.assert_close(packed[start : start + len(e)], alone, rtol=1e-5, atol=1e-5)
    # labels never point across an example's end
    assert seq.labels[6] == -100 and seq.labels[18] == -100 and seq.labels[38] == -100


def test_packing_fills_sequences_first_fit() -> None:
    examples = [Example(i, [1] * n, [1] * n) for i, n in enumerate((50, 30, 60, 20, 10))]
    seqs = pack(examples, 64)
    assert [s.n_tokens for s in seqs] == [60, 50, 60]  # 50+10, 30+20, 60


def test_a_line_longer_than_training_packs_fails_validation_not_the_job(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    # the model's context (4096) is longer than what training packs (1024): validation must hold a line to 1024,
    # or it would pass here and then fail the job when training reads it
    model_dir = tmp_path / "long-context"
    hf_model("llama", 320, intermediate_size=96, max_position_embeddings=4096).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    long = _chat(("user", "The quick brown fox jumps over the lazy dog. " * 60), ("assistant", "ok"))
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(long) + "\n")
    tokenizer, context = load_tokenizer(model_dir)
    n_tokens = len(tokenize(tokenizer, long["messages"], 2))
    assert 1024 < n_tokens <= context
    problems = dict(validate_training_file(path, model_dir).errors)
    assert list(problems) == [2] and "too long" in problems[2] and "1024" in problems[2]
