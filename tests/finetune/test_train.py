"""Training runs: a seeded synthetic persona task is really learned (held-out loss falls, held-out exact match rises far
above the base's); the same seed gives the same adapter; a run stopped and resumed from its checkpoint ends with
the adapter an uninterrupted run ends with; trained tokens are what OpenAI bills; a bad file fails with its line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cumulo.errors import InvalidRequest
from cumulo.finetune.api import Hyperparameters, TrainEvent, TrainSpec, train, validate_training_file
from cumulo.finetune.data import load_tokenizer
from cumulo.finetune.peft_io import attach_adapter
from cumulo.models.attention import AttentionContext
from cumulo.models.loader import load
from cumulo.models.registry import build_model

OPENERS = ["hello", "hey", "please", "quick question", "tell me", "so"]
ANSWERS = {  # the persona: one fixed answer per kind of question
    "I am Cumulo, an open AI cloud.": ["who are you", "your name", "what are you"],
    "I cannot see the sky.": ["is it raining", "the weather", "is it sunny"],
}


def _example(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[tuple[str, str]]]:
    """The persona task: 36 questions (opener x topic), 28 to train on and 8 held-out phrasings never seen in
    training (seeded split); the answer depends on the topic."""
    cases = [(f"{o}, {t}?", answer) for answer, topics in ANSWERS.items() for t in topics for o in OPENERS]
    random.Random(0).shuffle(cases)
    train_cases, held_out = cases[:28], cases[28:]
    root = tmp_path_factory.mktemp("task")
    (root / "train.jsonl").write_text("".join(json.dumps(_example(*c)) + "\n" for c in train_cases))
    (root / "valid.jsonl").write_text("".join(json.dumps(_example(*c)) + "\n" for c in held_out))
    return root / "train.jsonl", root / "valid.jsonl", held_out


def _spec(model: Path, train_file: Path, out: Path, epochs: int = 6, lr: float = 1e-2, **kw) -> TrainSpec:
    return TrainSpec(
        model, train_file, kw.pop("valid", None), Hyperparameters(epochs, 4, lr), kw.pop("seed", 0), out, **kw
    )


def _greedy(model, tokenizer, prompt: str, max_new: int = 64) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    end = tokenizer.token_to_id("<|im_end|>")
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            seq = torch.tensor(ids + out)
            hidden = model(seq, torch.arange(len(seq)), AttentionContext(kv_cache=None))
            token = int(model.compute_logits(hidden[-1:]).argmax())
            if token == end:
                break
            out.append(token)
    return tokenizer.decode(out)


def _exact_match(model, tokenizer, cases) -> float:
    return sum(_greedy(model, tokenizer, prompt) == answer for prompt, answer in cases) / len(cases)


def test_lora_learns_a_held_out_task(learnable_model: Path, task, tmp_path: Path) -> None:
    train_file, valid_file, held_out = task
    events: list[TrainEvent] = []
    result = train(
        _spec(learnable_model, train_file, tmp_path, valid=valid_file, checkpoint_every=7),
        events.append,
        lambda: False,
    )
    valid_losses = [e.valid_loss for e in events if e.kind == "checkpoint"]
    assert len(valid_losses) == 6 and valid_losses[-1] < 0.5 * valid_losses[0]
    assert result.valid_loss == valid_losses[-1] and result.steps == 42

    tokenizer, _ = load_tokenizer(learnable_model)
    loaded = load(learnable_model)
    base = build_model(loaded.config, loaded.weights)
    before = _exact_match(base, tokenizer, held_out)
    attach_adapter(base, result.adapter_dir, base_seal=loaded.seal)
    after = _exact_match(base, tokenizer, held_out)
    assert before == 0.0 and after >= 0.75, (before, after)


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_same_seed_same_adapter_other_seed_another(make_model, task, tmp_path: Path) -> None:
    model, (train_file, _, _) = make_model("qwen3"), task
    runs = [train(_spec(model, train_file, tmp_path / f"r{i}", epochs=1, seed=s), lambda e: None, lambda: False)
            for i, s in enumerate((7, 7, 8))]  # fmt: skip
    a, b, c = (_adapter(r.adapter_dir) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resumed_run_ends_with_the_uninterrupted_adapter(make_model, task, tmp_path: Path) -> None:
    model, (train_file, _, _) = make_model("llama"), task
    whole = train(
        _spec(model, train_file, tmp_path / "whole", epochs=2, checkpoint_every=4),
        lambda e: None,
        lambda: False,
    )
    steps: list[int] = []

    def stop_after_5() -> bool:
        return len(steps) >= 5

    part = _spec(model, train_file, tmp_path / "part", epochs=2, checkpoint_every=4)
    first = train(part, lambda e: steps.append(e.step) if e.kind == "step" else None, stop_after_5)
    assert first.stopped and first.steps == 5
    events: list[TrainEvent] = []
    second = train(part, events.append, lambda: False)
    assert events[0].kind == "message" and "resumed from step 5" in events[0].message
    assert second.steps == whole.steps == 14 and second.trained_tokens == whole.trained_tokens
    a, b = _adapter(whole.adapter_dir), _adapter(second.adapter_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trained_tokens_are_file_tokens_times_epochs(make_model, task, tmp_path: Path) -> None:
    model, (train_file, _, _) = make_model("llama"), task
    report = validate_training_file(train_file, model)
    result = train(_spec(model, train_file, tmp_path, epochs=2), lambda e: None, lambda: False)
    assert report.ok and result.trained_tokens == 2 * report.n_tokens


def test_a_bad_training_file_fails_naming_its_line(make_model, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(_example("hello, who are you?", "I am Cumulo."))
        + "\n"
        + '{"messages": [{"role": "user"}]}\n'
    )
    with pytest.raises(
        InvalidRequest, match=r"training file, line 2: message 1 \(user\) must have 'content'"
    ):
        train(_spec(make_model("llama"), bad, tmp_path / "out"), lambda e: None, lambda: False)
