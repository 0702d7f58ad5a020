"""`ModelInfo`: who a served model is, as every client of an engine sees it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str  # the name clients call it by ("smollm2-135m", a directory's name, ...)
    seal: str  # "sha256:<hex>" of weights, config and tokenizer, taken at load
    max_model_len: int  # prompt + completion tokens one request may hold
    chat_template: str | None = None  # the model's own Jinja chat template, if it has one
    device: str = "cpu"  # where it runs: "cpu", "cuda:0", "npu:0", or a pool's description
    kv_block_size: int = 16  # tokens per KV-cache block: the unit of prefix caching (and of prefix routing)
