"""Sliding-window perplexity of a causal language model over one long token sequence.

The method is Hugging Face's ("Perplexity of fixed-length models"): windows of `context` tokens start every
`stride` tokens; each window scores only the tokens that no earlier window scored, so every token is predicted at
most once, and (when stride < context) every token after the first window with at least `context - stride`
tokens of history. A window's own first token has no history inside the window, so it is never a target: with
stride == context (disjoint windows: fast, less history) the first token of every window goes unscored, as in
Hugging Face's recipe; with stride < context only the text's first token does. `tokens` counts what was scored.
Perplexity = exp(mean negative log-likelihood over scored tokens).

The model runs as the engine's architectures do without a cache: `forward(ids[T], positions[T],
AttentionContext(kv_cache=None))` -> hidden [T, H] for one causal sequence, then `compute_logits(hidden)`.
Logits are computed only for the positions that predict scored tokens, which saves the vocabulary projection for
the overlapping history.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cumulo.errors import InvalidRequest
from cumulo.models.attention import AttentionContext


@dataclass(frozen=True, slots=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    first_target: int  # first token scored in this window; tokens [first_target, end) are scored


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood, nats per scored token
    tokens: int  # scored tokens
    windows: int
    seconds: float


def check_window(context: int, stride: int) -> None:
    if context < 2:
        raise InvalidRequest(f"context must be at least 2 tokens, not {context}")
    if not 1 <= stride <= context:
        raise InvalidRequest(f"stride must be between 1 and the context ({context}), not {stride}")


def windows(num_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows covering `num_tokens` tokens; no token is a target twice, none is a window's first token."""
    check_window(context, stride)
    if num_tokens < 2:
        raise InvalidRequest(f"perplexity needs at least 2 tokens of text, got {num_tokens}")
    out: list[Window] = []
    scored_until = 0
    begin = 0
    while True:
        end = min(begin + context, num_tokens)
        first_target = max(scored_until, begin + 1)
        if end > first_target:
            out.append(Window(begin, end, first_target))
            scored_until = end
        if end == num_tokens:
            return out
        begin += stride


def window_nll(model: nn.Module, ids: torch.Tensor, window: Window) -> float:
    """Sum of -log p(token) over the window's targets; `ids` is the whole text on the model's device."""
    inputs = ids[window.begin : window.end]
    positions = torch.arange(inputs.numel(), device=ids.device)
    hidden = model(inputs, positions, AttentionContext(kv_cache=None))
    # hidden[i] predicts token begin + i + 1, so targets [first_target, end) come from rows shifted by one.
    rows = slice(window.first_target - 1 - window.begin, window.end - 1 - window.begin)
    logits = model.compute_logits(hidden[rows]).float()
    targets = ids[window.first_target : window.end]
    log_probs = torch.log_softmax(logits, dim=-1)
    return float(-log_probs.gather(1, targets[:, None]).sum(dtype=torch.float64))


def perplexity(
    model: nn.Module,
    token_ids: Sequence[int],
    *,
    context: int = 512,
    stride: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> PerplexityResult:
    """Sliding-window perplexity of `model` on `token_ids`; a tqdm bar on stderr counts scored tokens."""
    from tqdm import tqdm

    plan = windows(len(token_ids), context, stride)
    scored = sum(w.end - w.first_target for w in plan)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    total_nll = 0.0
    started = time.perf_counter()
    with (
        torch.inference_mode(),
        tqdm(total=scored, unit="tok", desc="perplexity", file=sys.stderr, disable=not progress) as bar,
    ):
        for window in plan:
            total_nll += window_nll(model, ids, window)
            bar.update(window.end - window.first_target)
    mean = total_nll / scored
    ppl = math.exp(mean) if mean < 700 else math.inf  # exp overflows a double past ~709.78
    return PerplexityResult(ppl, mean, scored, len(plan), time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class PerplexityReport:
    """One evaluation run, as `cumulo eval ppl --json` prints it."""

    model: str
    seal: str
    checkpoint: str  # the stored weights, e.g. "gguf:Q4_1"
    format: str | None  # the compact format the weights were converted to; None when not converted
    head: str | None  # with format: the output head "bf16" or "body" (packed like the rest)
    dtype: str
    device: str
    source: str  # which text, see `cumulo.evaluation.corpus`
    source_sha256: str
    context: int
    stride: int
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seconds: float  # the scoring loop only, not loading or conversion


def run_perplexity(
    model: str,
    *,
    format: str | None = None,
    head: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    threads: int | None = None,
    context: int = 512,
    stride: int = 256,
    max_tokens: int | None = 4096,
    text_file: str | None = None,
    progress: bool = True,
) -> PerplexityReport:
    """Build `model` as `cumulo serve` builds it (`build_for_use`: optionally converted to `format` from fp32
    weights, then cast to `dtype`), and score the corpus's first `max_tokens` tokens (all of it when None)."""
    from cumulo.engine.factory import build_for_use, resolve_dtype
    from cumulo.errors import ContextLengthExceeded
    from cumulo.evaluation.corpus import from_file, python_docs
    from cumulo.formats.linear import default_head
    from cumulo.models.loader import load_config
    from cumulo.platform import get_platform

    if max_tokens is not None and max_tokens < 2:
        raise InvalidRequest(f"max_tokens must be at least 2, not {max_tokens}")
    check_window(context, stride)  # reject bad settings before a slow load
    limit = load_config(model).max_position_embeddings
    if context > limit:
        raise ContextLengthExceeded(f"context {context} exceeds the model's {limit} positions")
    corpus = from_file(text_file) if text_file else python_docs()
    platform = get_platform(device)
    target = torch.device(platform.device)
    torch_dtype = resolve_dtype(dtype, platform)
    module, loaded = build_for_use(model, platform, torch_dtype, format, threads, head)
    ids = loaded.tokenizer.encode(corpus.text)  # the model's own bos policy, as for any document
    if max_tokens is not None:
        ids = ids[:max_tokens]
    result = perplexity(module, ids, context=context, stride=stride, device=target, progress=progress)
    return PerplexityReport(
        model=loaded.name,
        seal=loaded.seal,
        checkpoint=loaded.format,
        format=format,
        head=(head or default_head(format)) if format else None,
        dtype=str(torch_dtype).removeprefix("torch."),
        device=str(target),
        source=corpus.source,
        source_sha256=corpus.sha256,
        context=context,
        stride=stride,
        perplexity=result.perplexity,
        nll=result.nll,
        tokens=result.tokens,
        windows=result.windows,
        seconds=result.seconds,
    )
