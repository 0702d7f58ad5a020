"""Chat training data: validate an OpenAI fine-tuning JSONL file, tokenize it with the model's own chat template
and a loss mask on assistant tokens, and pack short examples into sequences.

Each line is `{"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]}`
(`weight` only on assistant messages; default 1). The whole conversation is rendered once with the template the
model serves with; an assistant message's tokens are found by rendering the conversation up to it (with the
generation prompt) and through it, and marking the tokens whose characters fall between the two: its content
and its end-of-turn token, so the model learns to stop. A bad line is reported with its number, never skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cumulo.errors import InvalidRequest
from cumulo.finetune.api import ValidationReport
from cumulo.models.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 100


@dataclass
class Example:
    line: int  # 1-based line of the file
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is one the model learns to produce (weight-1 assistant tokens)

    def __len__(self) -> int:
        return len(self.input_ids)


def load_tokenizer(model: str | Path) -> tuple[Tokenizer, int]:
    """The model's tokenizer and context length, without reading its weights."""
    from cumulo.models import hf, loader

    path, _ = loader.resolve(model)
    if hf.is_model_dir(path):
        from cumulo.models.tokenizer import from_directory

        raw = hf.read_config_json(path)
        config = hf.config_from_json(raw, path)
        return from_directory(path, raw), config.max_position_embeddings
    from cumulo.models.chat import DEFAULT_TEMPLATES
    from cumulo.models.gguf import read_gguf
    from cumulo.models.tokenizer import from_gguf_metadata

    gguf = path if path.is_file() else sorted(path.glob("*.gguf"))[0] if path.is_dir() else path
    contents = read_gguf(gguf, weights=False)
    tokenizer = from_gguf_metadata(contents.metadata)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_TEMPLATES.get(contents.config.architecture)
    return tokenizer, contents.config.max_position_embeddings


def check_messages(record: Any) -> str | None:
    """The first problem with one parsed line, or None."""
    if not isinstance(record, dict):
        return "each line must be a JSON object with a 'messages' list"
    for key in ("tools", "functions"):
        if record.get(key):
            return f"'{key}' is not supported yet"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing or empty 'messages' list"
    trainable = False
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"message {i} is not an object"
        role = message.get("role")
        if role not in ROLES:
            return f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})"
        content = message.get("content")
        if not isinstance(content, str):
            return f"message {i} ({role}) must have 'content' as a string"
        if "weight" in message:
            if role != "assistant":
                return f"message {i} ({role}): 'weight' is only allowed on assistant messages"
            if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                return f"message {i}: 'weight' must be 0 or 1, got {message['weight']!r}"
        if role == "assistant":
            if not content.strip():
                return f"message {i}: empty assistant message"
            trainable = trainable or message.get("weight", 1) == 1
    if not trainable:
        return "no assistant message to learn from (every one is missing or has weight 0)"
    return None


def tokenize(tokenizer: Tokenizer, messages: list[dict[str, Any]], line: int) -> Example:
    """Render with the model's template and mark the trained tokens; InvalidRequest when the template
    cannot take these messages or rewrites earlier turns (so no span can be found)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = tokenizer.apply_chat_template(plain, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before = tokenizer.apply_chat_template(plain[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(plain[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise InvalidRequest(
                "the model's chat template rewrites earlier turns; cannot mark assistant tokens"
            )
        spans.append((len(before), len(through)))
    encoding = tokenizer.backend.encode(full, add_special_tokens=False)
    ids = list(encoding.ids)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in encoding.offsets]
    return Example(line, ids, mask)


def read_examples(
    path: Path, tokenizer: Tokenizer, max_seq_len: int
) -> tuple[list[Example], list[tuple[int, str]]]:
    """Every good example of the file and (line, problem) for every bad one (at most MAX_REPORTED_ERRORS)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [], [(1, "the file is not UTF-8 text")]
    except OSError as exc:
        raise InvalidRequest(f"cannot read training file {path}: {exc.strerror}") from None
    examples, errors = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        problem = None
        if not raw.strip():
            problem = "empty line"
        else:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                record, problem = None, f"not valid JSON ({exc.msg} at column {exc.colno})"
            problem = problem or check_messages(record)
        if problem is None:
            try:
                example = tokenize(tokenizer, record["messages"], number)
            except InvalidRequest as exc:
                problem = str(exc)
            else:
                if len(example) > max_seq_len:
                    problem = f"too long: {len(example)} tokens, the limit is {max_seq_len}"
                elif sum(example.loss_mask) == 0:
                    problem = "no assistant tokens left after tokenization"
                else:
                    examples.append(example)
        if problem is not None and len(errors) < MAX_REPORTED_ERRORS:
            errors.append((number, problem))
    if not examples and not errors:
        errors.append((1, "the file has no examples"))
    return examples, errors


def validate_file(path: Path, model: str | Path, max_seq_len: int | None = None) -> ValidationReport:
    tokenizer, context = load_tokenizer(model)
    examples, errors = read_examples(path, tokenizer, max_seq_len or context)
    return ValidationReport(
        n_examples=len(examples),
        n_tokens=sum(len(e) for e in examples),
        n_train_tokens=sum(sum(e.loss_mask) for e in examples),
        errors=errors,
    )


# -- packing -------------------------------------------------------------------------------------------------
@dataclass
class PackedSequence:
    """Several examples end to end, attending only within themselves (AttentionContext.segment_ids)."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] restarting at 0 in each example
    segment_ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T] the next token where it is trained, else -100 (never across examples)
    n_tokens: int


def pack(examples: list[Example], max_seq_len: int) -> list[PackedSequence]:
    """First-fit in the given order: each example goes to the first sequence with room, else a new one."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for example in examples:
        for i, free in enumerate(room):
            if len(example) <= free:
                bins[i].append(example)
                room[i] -= len(example)
                break
        else:
            bins.append([example])
            room.append(max_seq_len - len(example))
    return [_packed(b) for b in bins]


def _packed(examples: list[Example]) -> PackedSequence:
    ids, positions, segments, labels = [], [], [], []
    for s, e in enumerate(examples):
        ids += e.input_ids
        positions += range(len(e))
        segments += [s] * len(e)
        # token t predicts t + 1: trained when t + 1 is an assistant token of the same example
        labels += [e.input_ids[t + 1] if e.loss_mask[t + 1] else -100 for t in range(len(e) - 1)] + [-100]
    return PackedSequence(
        torch.tensor(ids), torch.tensor(positions), torch.tensor(segments), torch.tensor(labels), len(ids)
    )
