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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cumulo.errors import InvalidRequest
from cumulo.finetune.api import ValidationReport
from cumulo.models.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 100
DEFAULT_MAX_SEQ_LEN = 1024  # packed sequence length when a job names none (capped by the model's context)


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


def read_lines(
    path: Path, parse: Callable[[Any, int], tuple[Any, str | None]]
) -> tuple[list[Any], list[tuple[int, str]]]:
    """Every line of a JSONL file through `parse(record, line) -> (item, problem)`: the items of the good
    lines and (line, problem) for every bad one (at most MAX_REPORTED_ERRORS). Empty lines and bad JSON are
    problems too; no line is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [], [(1, "the file is not UTF-8 text")]
    except OSError as exc:
        raise InvalidRequest(f"cannot read training file {path}: {exc.strerror}") from None
    items, errors = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        item, problem = None, None
        if not raw.strip():
            problem = "empty line"
        else:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
            else:
                item, problem = parse(record, number)
        if problem is None:
            items.append(item)
        elif len(errors) < MAX_REPORTED_ERRORS:
            errors.append((number, problem))
    if not items and not errors:
        errors.append((1, "the file has no examples"))
    return items, errors


def read_examples(
    path: Path, tokenizer: Tokenizer, max_seq_len: int
) -> tuple[list[Example], list[tuple[int, str]]]:
    """Every good example of the file and (line, problem) for every bad one (at most MAX_REPORTED_ERRORS)."""

    def parse(record: Any, number: int) -> tuple[Example | None, str | None]:
        problem = check_messages(record)
        if problem is not None:
            return None, problem
        try:
            example = tokenize(tokenizer, record["messages"], number)
        except InvalidRequest as exc:
            return None, str(exc)
        if len(example) > max_seq_len:
            return None, f"too long: {len(example)} tokens, the limit is {max_seq_len}"
        if sum(example.loss_mask) == 0:
            return None, "no assistant tokens left after tokenization"
        return example, None

    return read_lines(path, parse)


def validate_file(path: Path, model: str | Path, max_seq_len: int | None = None) -> ValidationReport:
    tokenizer, context = load_tokenizer(model)
    examples, errors = read_examples(path, tokenizer, min(max_seq_len or DEFAULT_MAX_SEQ_LEN, context))
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


def assign(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit in the given order: bins of item indices, each item in the first bin with room, else a new
    one (an item longer than `capacity` gets a bin of its own)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        for i, free in enumerate(room):
            if length <= free:
                bins[i].append(index)
                room[i] -= length
                break
        else:
            bins.append([index])
            room.append(capacity - length)
    return bins


def pack(examples: list[Example], max_seq_len: int) -> list[PackedSequence]:
    """First-fit in the given order: each example goes to the first sequence with room, else a new one."""
    return [
        packed_sequence([examples[i] for i in b]) for b in assign([len(e) for e in examples], max_seq_len)
    ]


def packed_sequence(examples: list[Example]) -> PackedSequence:
    """The examples end to end as one sequence; segment s is examples[s]."""
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
