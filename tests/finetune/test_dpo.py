"""DPO: the loss and its gradients equal a plain-torch computation of Rafailov et al.'s formula on the same model
(log 2 exactly with a fresh adapter, whose policy is the reference); bad preference lines are named; a seeded
synthetic preference task is learned (held-out pairs where the tuned model ranks the preferred output higher rise
far above the base's); a DPO pair counts its prompt once."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cumulo.finetune.api import Hyperparameters, TrainEvent, TrainSpec, train, validate_training_file
from cumulo.finetune.data import Example, load_tokenizer
from cumulo.finetune.dpo import PreferenceObjective
from cumulo.finetune.lora import apply_lora, lora_parameters
from cumulo.finetune.peft_io import attach_adapter
from cumulo.finetune.preference import PreferencePair, tokenize_pair
from cumulo.models.attention import AttentionContext
from cumulo.models.loader import load
from cumulo.models.registry import build_model

BETA = 0.1


def _line(prompt: str, preferred: str, rejected: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return {
        "input": {"messages": messages},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def _logp(model, example: Example) -> torch.Tensor:
    """Plain torch: the example alone (no packing), the summed log-prob of its masked tokens."""
    ids = torch.tensor(example.input_ids)
    hidden = model(ids, torch.arange(len(ids)), AttentionContext(kv_cache=None))
    logps = torch.log_softmax(model.compute_logits(hidden[:-1]).float(), dim=-1)  # [T-1, vocab]
    picked = logps.gather(1, ids[1:, None])[:, 0]  # log p(token t+1 | ..t)
    mask = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
    return picked[mask].sum()


def _reference_loss(model, wrapped, pairs: list[PreferencePair], beta: float) -> torch.Tensor:
    """Rafailov et al. eq. 7, mean over pairs; the reference is the base, obtained here by zeroing every B."""
    bs = [b for w in wrapped.values() for b in w.lora_B.values()]
    saved = [b.detach().clone() for b in bs]
    with torch.no_grad():
        for b in bs:
            b.zero_()
        ref = [(_logp(model, p.chosen), _logp(model, p.rejected)) for p in pairs]
        for b, value in zip(bs, saved, strict=True):
            b.copy_(value)
    losses = [
        -F.logsigmoid(beta * ((_logp(model, p.chosen) - rc) - (_logp(model, p.rejected) - rr)))
        for p, (rc, rr) in zip(pairs, ref, strict=True)
    ]
    return torch.stack(losses).mean()


@pytest.fixture
def tiny(make_model):
    loaded = load(make_model("llama"))
    model = build_model(loaded.config, loaded.weights)
    wrapped = apply_lora(model, 4, 8, generator=torch.Generator().manual_seed(0))
    tokenizer, _ = load_tokenizer(make_model("llama"))
    lines = [
        _line("Hello there", "The quick brown fox.", "No.", system="Be kind"),
        _line("numbers?", "12345", "twelve"),
        _line("A longer question about the weather today", "Sunny", "I do not know, sorry."),
    ]
    pairs = [tokenize_pair(tokenizer, line, i + 1) for i, line in enumerate(lines)]
    return model, wrapped, pairs


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_fresh_adapter_loss_is_log_2_and_gradients_match_autograd(tiny) -> None:
    model, wrapped, pairs = tiny
    params = lora_parameters(wrapped)
    objective = PreferenceObjective(model, wrapped, BETA, max_seq_len=128)
    loss, metrics = objective.step(pairs)  # packs the three pairs into one sequence
    assert loss == pytest.approx(math.log(2), abs=1e-7)
    assert metrics == {"reward_margin": 0.0, "reward_accuracy": 0.0}
    ours = _grads(params)
    for p in params:
        p.grad = None

    expected = _reference_loss(model, wrapped, pairs, BETA)
    assert float(expected.detach()) == pytest.approx(math.log(2), abs=1e-7)
    reference = torch.autograd.grad(expected, params, allow_unused=True)
    assert any(float(g.abs().max()) > 0 for g in ours)  # B's gradients are not zero at B = 0
    for got, want in zip(ours, reference, strict=True):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_trained_adapter_loss_rewards_and_gradients_match_autograd(tiny) -> None:
    """Away from B = 0 the policy differs from the reference: the adapter switched off must be the base."""
    model, wrapped, pairs = tiny
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in wrapped.values():
            for b in w.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=generator) * 0.3)
    params = lora_parameters(wrapped)
    objective = PreferenceObjective(model, wrapped, 0.5, max_seq_len=128)
    loss, metrics = objective.step(pairs)
    ours = _grads(params)
    for p in params:
        p.grad = None

    expected = _reference_loss(model, wrapped, pairs, 0.5)
    assert loss == pytest.approx(float(expected), rel=1e-5) and abs(loss - math.log(2)) > 1e-3
    reference = torch.autograd.grad(expected, params)
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    eval_loss, eval_metrics = objective.evaluate(pairs)
    assert eval_loss == pytest.approx(loss, rel=1e-6) and eval_metrics == pytest.approx(metrics)


def test_bad_preference_lines_are_reported_by_number_and_problem(make_model, tmp_path: Path) -> None:
    good = _line("Hello world!", "The quick brown fox.", "No.")
    two_outputs = {**good, "preferred_output": good["preferred_output"] * 2}
    user_output = {**good, "non_preferred_output": [{"role": "user", "content": "x"}]}
    ends_with_assistant = {**good, "input": {"messages": [{"role": "assistant", "content": "hi"}]}}
    lines = [
        json.dumps(good),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}),
        json.dumps({k: v for k, v in good.items() if k != "non_preferred_output"}),
        json.dumps(two_outputs),
        json.dumps(user_output),
        json.dumps(_line("hi", "   ", "no")),
        json.dumps(ends_with_assistant),
        json.dumps(_line("hi", "same", "same")),
        json.dumps({**good, "input": {**good["input"], "tools": [{"type": "function"}]}}),
        json.dumps(_line("The quick brown fox jumps over the lazy dog. " * 20, "a", "b")),
        "",
        "{not json",
        json.dumps({**good, "input": {"messages": [{"role": "robot", "content": "beep"}]}}),
        json.dumps(good),
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = validate_training_file(path, make_model("llama"), max_seq_len=128, method="dpo")
    problems = dict(report.errors)
    assert sorted(problems) == list(range(2, 14))
    assert "not 'messages'" in problems[2]
    assert "missing 'non_preferred_output'" in problems[3]
    assert "exactly one assistant message" in problems[4]
    assert "role 'assistant'" in problems[5]
    assert "empty assistant message" in problems[6]
    assert "last input message must be from the user" in problems[7]
    assert "are the same" in problems[8]
    assert "'input.tools' is not supported" in problems[9]
    assert "too long" in problems[10] and "128" in problems[10]
    assert problems[11] == "empty line"
    assert "not valid JSON" in problems[12]
    assert "unknown role 'robot'" in problems[13]
    assert report.n_examples == 2 and report.first_error().startswith("line 2: ")


def test_a_pair_counts_its_prompt_once_and_trains_only_the_outputs(make_model) -> None:
    tokenizer, _ = load_tokenizer(make_model("llama"))
    pair = tokenize_pair(tokenizer, _line("Hello world!", "The quick brown fox.", "No."), 1)
    for example, text in ((pair.chosen, "The quick brown fox."), (pair.rejected, "No.")):
        trained = [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m]
        assert tokenizer.decode(trained, skip_special_tokens=False).strip() == text + "<|im_end|>"
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello world!"}], add_generation_prompt=True
        ),
        add_special_tokens=False,
    )
    assert pair.chosen.input_ids[: len(prompt)] == prompt == pair.rejected.input_ids[: len(prompt)]
    answers = (len(pair.chosen) - len(prompt)) + (len(pair.rejected) - len(prompt))
    assert pair.n_tokens == len(prompt) + answers

    turns = _line("And now?", "Fine.", "Bad.")
    turns["input"]["messages"][:0] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
    ]
    chosen = tokenize_pair(tokenizer, turns, 2).chosen
    trained = [t for t, m in zip(chosen.input_ids, chosen.loss_mask, strict=True) if m]
    assert tokenizer.decode(trained, skip_special_tokens=False).strip() == "Fine.<|im_end|>"  # not "Hey"


# -- learning -------------------------------------------------------------------------------------------------
def _words(n: int, rng: random.Random) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6))))
    return sorted(out)


@pytest.fixture(scope="module")
def preference_task(tmp_path_factory: pytest.TempPathFactory):
    """Prefer the word in angle brackets over the word in square brackets: 32 random words to train on, 16
    held-out words never seen (seeded). The random base ranks the square brackets higher (by about 8 nats on
    the held-out words), so what the tuned model ranks right it learned from the preferences."""
    rng = random.Random(0)
    words = _words(48, rng)
    rng.shuffle(words)

    def line(word: str) -> dict:
        return _line(f"Say {word}.", f"<{word}>", f"[{word}]")

    root = tmp_path_factory.mktemp("dpo-task")
    (root / "train.jsonl").write_text("".join(json.dumps(line(w)) + "\n" for w in words[:32]))
    (root / "valid.jsonl").write_text("".join(json.dumps(line(w)) + "\n" for w in words[32:]))
    return root / "train.jsonl", root / "valid.jsonl", [line(w) for w in words[32:]]


def _accuracy(model, pairs: list[PreferencePair]) -> float:
    with torch.no_grad():
        return sum(float(_logp(model, p.chosen)) > float(_logp(model, p.rejected)) for p in pairs) / len(
            pairs
        )


def test_dpo_learns_a_held_out_preference(learnable_model: Path, preference_task, tmp_path: Path) -> None:
    train_file, valid_file, held_out_lines = preference_task
    events: list[TrainEvent] = []
    spec = TrainSpec(
        learnable_model,
        train_file,
        valid_file,
        Hyperparameters(4, 4, 1e-2, beta=BETA),
        0,
        tmp_path,
        checkpoint_every=8,
        method="dpo",
    )
    result = train(spec, events.append, lambda: False)
    assert result.steps == 32
    steps = [e for e in events if e.kind == "step"]
    assert steps[0].train_loss == pytest.approx(math.log(2), abs=1e-6)
    assert {"train_reward_margin", "train_reward_accuracy"} <= set(steps[-1].metrics)
    checkpoints = [e for e in events if e.kind == "checkpoint"]
    assert checkpoints[-1].valid_loss < 0.5 * math.log(2)
    assert checkpoints[-1].metrics["valid_reward_accuracy"] >= 0.9

    tokenizer, _ = load_tokenizer(learnable_model)
    held_out = [tokenize_pair(tokenizer, line, i) for i, line in enumerate(held_out_lines)]
    loaded = load(learnable_model)
    model = build_model(loaded.config, loaded.weights)
    before = _accuracy(model, held_out)
    attach_adapter(model, result.adapter_dir, base_seal=loaded.seal)
    after = _accuracy(model, held_out)
    assert after >= 0.9 and after >= before + 0.5, (before, after)
    # trained tokens: each pair's prompt once and both outputs, every epoch
    report = validate_training_file(train_file, learnable_model, method="dpo")
    assert result.trained_tokens == 4 * report.n_tokens
