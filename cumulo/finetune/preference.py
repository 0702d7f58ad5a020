"""Preference data for DPO: validate OpenAI's preference JSONL and tokenize each line into a chosen and a
rejected sequence, both rendered with the model's own chat template, with the loss mask on the completion.

Each line is `{"input": {"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool},
"preferred_output": [{"role": "assistant", "content": "..."}], "non_preferred_output": [...]}` (OpenAI's DPO
guide: one-turn examples, each output one assistant message that follows the input). The input is checked as an
SFT conversation is, ends with a user turn and trains none of its own assistant turns. A bad line is reported
with its number, never skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cumulo.errors import InvalidRequest
from cumulo.finetune.api import ValidationReport
from cumulo.finetune.data import DEFAULT_MAX_SEQ_LEN, ROLES, Example, load_tokenizer, read_lines, tokenize
from cumulo.models.tokenizer import Tokenizer

OUTPUTS = ("preferred_output", "non_preferred_output")


@dataclass
class PreferencePair:
    line: int
    chosen: Example  # prompt + preferred output; loss_mask on the output's tokens
    rejected: Example  # prompt + non-preferred output

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def n_tokens(self) -> int:
        """Distinct tokens of the line: the prompt once and both completions. What a DPO job counts as
        trained (and bills) per epoch."""
        common = 0
        for a, b in zip(self.chosen.input_ids, self.rejected.input_ids, strict=False):
            if a != b:
                break
            common += 1
        return len(self.chosen) + len(self.rejected) - common


def _check_output(value: Any, key: str) -> str | None:
    if not isinstance(value, list) or len(value) != 1:
        return f"'{key}' must be a list of exactly one assistant message"
    message = value[0]
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return f"'{key}' must hold one message with role 'assistant'"
    content = message.get("content")
    if not isinstance(content, str):
        return f"'{key}': 'content' must be a string"
    if not content.strip():
        return f"'{key}': empty assistant message"
    return None


def check_preference(record: Any) -> str | None:
    """The first problem with one parsed preference line, or None."""
    if not isinstance(record, dict):
        return "each line must be a JSON object with 'input', 'preferred_output' and 'non_preferred_output'"
    if "messages" in record and "input" not in record:
        return "a DPO line holds 'input', 'preferred_output' and 'non_preferred_output', not 'messages'"
    prompt = record.get("input")
    if not isinstance(prompt, dict):
        return "missing 'input' object"
    for key in ("tools", "functions"):
        if prompt.get(key):
            return f"'input.{key}' is not supported yet"
    messages = prompt.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing or empty 'input.messages' list"
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"input message {i} is not an object"
        role = message.get("role")
        if role not in ROLES:
            return f"input message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(message.get("content"), str):
            return f"input message {i} ({role}) must have 'content' as a string"
    if messages[-1]["role"] != "user":
        return "the last input message must be from the user (the outputs answer it)"
    for key in OUTPUTS:
        if key not in record:
            return f"missing '{key}'"
        problem = _check_output(record[key], key)
        if problem:
            return problem
    if record["preferred_output"][0]["content"] == record["non_preferred_output"][0]["content"]:
        return "'preferred_output' and 'non_preferred_output' are the same; there is nothing to prefer"
    return None


def tokenize_pair(tokenizer: Tokenizer, record: dict[str, Any], line: int) -> PreferencePair:
    """The chosen and rejected sequences; only the output's tokens (and its end of turn) are in the mask."""
    prompt = [  # the prompt's own assistant turns are context, never trained
        {"role": m["role"], "content": m["content"], **({"weight": 0} if m["role"] == "assistant" else {})}
        for m in record["input"]["messages"]
    ]
    chosen, rejected = (
        tokenize(tokenizer, [*prompt, {"role": "assistant", "content": record[k][0]["content"]}], line)
        for k in OUTPUTS
    )
    return PreferencePair(line, chosen, rejected)


def read_pairs(
    path: Path, tokenizer: Tokenizer, max_seq_len: int
) -> tuple[list[PreferencePair], list[tuple[int, str]]]:
    """Every good pair of the file and (line, problem) for every bad one. Each of a pair's two sequences must
    fit `max_seq_len`."""

    def parse(record: Any, number: int) -> tuple[PreferencePair | None, str | None]:
        problem = check_preference(record)
        if problem is not None:
            return None, problem
        try:
            pair = tokenize_pair(tokenizer, record, number)
        except InvalidRequest as exc:
            return None, str(exc)
        longest = max(len(pair.chosen), len(pair.rejected))
        if longest > max_seq_len:
            return None, f"too long: {longest} tokens with an output, the limit is {max_seq_len}"
        if not sum(pair.chosen.loss_mask) or not sum(pair.rejected.loss_mask):
            return None, "no output tokens left after tokenization"
        return pair, None

    return read_lines(path, parse)


def validate_file(path: Path, model: str | Path, max_seq_len: int | None = None) -> ValidationReport:
    tokenizer, context = load_tokenizer(model)
    pairs, errors = read_pairs(path, tokenizer, min(max_seq_len or DEFAULT_MAX_SEQ_LEN, context))
    return ValidationReport(
        n_examples=len(pairs),
        n_tokens=sum(p.n_tokens for p in pairs),
        n_train_tokens=sum(sum(p.chosen.loss_mask) + sum(p.rejected.loss_mask) for p in pairs),
        errors=errors,
    )
