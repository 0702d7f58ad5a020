"""The seam between the fine-tuning service (jobs, worker, metering) and the training core.

The service side never imports torch or the models: it calls these functions from the worker process
(`cumulo finetune worker`), which may import both. Everything here is plain data plus three entry points:
`resolve_hyperparameters`, `validate_training_file` and `train`. Their bodies live in `data.py` and `train.py`
and are imported lazily, so importing the seam stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cumulo.errors import InvalidRequest

# OpenAI's documented defaults for "auto" (cookbook `Chat_finetuning_data_prep`, fine-tuning guide):
# aim at 3 passes, but see at least ~100 and at most ~25,000 examples in total, within 1..25 epochs.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25
# "batch size ~0.2% of the examples, capped at 256" (OpenAI fine-tuning guide, 2023).
AUTO_BATCH_FRACTION = 0.002
MAX_AUTO_BATCH = 256
# OpenAI exposes a multiplier, not a rate. For LoRA the multiplier scales BASE_LEARNING_RATE, chosen so that
# the middle auto value (0.1) gives 2e-4, the usual LoRA rate. Auto multiplier: 0.05 / 0.1 / 0.2 by batch size
# ("larger learning rates tend to perform better with larger batch sizes").
BASE_LEARNING_RATE = 2e-3
# DPO's beta (OpenAI: "auto" or a number between 0 and 2; the "auto" value is not published): "auto" is the DPO
# paper's default, 0.1.
AUTO_BETA = 0.1
MAX_BETA = 2.0
STATE = "trainer_state.pt"  # in <output_dir>/checkpoints/step-N/: its presence makes a checkpoint complete
Method = Literal["supervised", "dpo"]
METHODS: tuple[str, ...] = ("supervised", "dpo")


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved numbers (never "auto"): what the trainer runs with and what the job reports back."""

    n_epochs: int
    batch_size: int
    learning_rate: float  # the absolute rate = BASE_LEARNING_RATE * learning_rate_multiplier
    beta: float | None = None  # DPO only: the strength of the pull towards the reference (the base)

    @property
    def learning_rate_multiplier(self) -> float:
        return self.learning_rate / BASE_LEARNING_RATE


def auto_epochs(n_examples: int) -> int:
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // max(n_examples, 1))
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    return max(1, min(MAX_AUTO_BATCH, round(n_examples * AUTO_BATCH_FRACTION)))


def auto_multiplier(batch_size: int) -> float:
    if batch_size < 8:
        return 0.05
    if batch_size < 64:
        return 0.1
    return 0.2


def _number(raw: dict[str, Any], name: str, kind: type, low: float, high: float) -> Any:
    value = raw.get(name, "auto")
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
        raise InvalidRequest(f"hyperparameters.{name} must be 'auto' or a {kind.__name__}, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequest(f"hyperparameters.{name} must be between {low:g} and {high:g}, got {value!r}")
    return kind(value)


def resolve_hyperparameters(
    raw: dict[str, Any], n_examples: int, method: Method = "supervised"
) -> Hyperparameters:
    """Turn OpenAI's `{"n_epochs", "batch_size", "learning_rate_multiplier"}` (and `beta` for DPO; each "auto"
    or a number, any of them missing) into numbers for a training file of `n_examples` lines (DPO: pairs).
    Raises InvalidRequest with one line for an out-of-range or non-numeric value, or an unknown key."""
    known = {"n_epochs", "batch_size", "learning_rate_multiplier"} | ({"beta"} if method == "dpo" else set())
    unknown = set(raw) - known
    if unknown:
        raise InvalidRequest(f"unknown hyperparameter {sorted(unknown)[0]!r}")
    n_epochs = _number(raw, "n_epochs", int, 1, 50)
    batch_size = _number(raw, "batch_size", int, 1, 256)
    multiplier = _number(raw, "learning_rate_multiplier", float, 1e-6, 100.0)
    n_epochs = auto_epochs(n_examples) if n_epochs is None else n_epochs
    batch_size = auto_batch_size(n_examples) if batch_size is None else batch_size
    multiplier = auto_multiplier(batch_size) if multiplier is None else multiplier
    beta = None
    if method == "dpo":
        beta = _number(raw, "beta", float, 1e-6, MAX_BETA)
        beta = AUTO_BETA if beta is None else beta
    return Hyperparameters(
        n_epochs=n_epochs, batch_size=batch_size, learning_rate=BASE_LEARNING_RATE * multiplier, beta=beta
    )


@dataclass
class ValidationReport:
    """What a training file holds, and what is wrong with it. `errors` lists (1-based line, problem); the
    file is usable only when it is empty."""

    n_examples: int
    n_tokens: int
    n_train_tokens: int  # tokens in the loss (SFT: weight-1 assistant tokens; DPO: both outputs')
    errors: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.n_examples > 0

    def first_error(self) -> str:
        """One line for a job's `error.message`."""
        if not self.errors:
            return "" if self.n_examples else "the file has no examples"
        line, problem = self.errors[0]
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        return f"line {line}: {problem}{more}"


def validate_training_file(
    path: Path, model: str | Path, max_seq_len: int | None = None, method: Method = "supervised"
) -> ValidationReport:
    """Check every line of a JSONL file against `model`'s tokenizer and chat template: chat lines for
    `supervised`, preference lines (`input`, `preferred_output`, `non_preferred_output`) for `dpo`. Never
    raises for bad content (it reports lines); raises ModelNotFound / InvalidModel when the model itself cannot
    load, InvalidRequest when the file cannot be read. `max_seq_len` defaults to what training packs:
    min(1024, the model's context length), so a line that validates also trains."""
    if method == "dpo":
        from cumulo.finetune.preference import validate_file
    else:
        from cumulo.finetune.data import validate_file

    return validate_file(Path(path), model, max_seq_len)


@dataclass
class TrainSpec:
    model: str | Path  # catalog name, GGUF file or HF directory, as `cumulo serve` accepts
    training_file: Path
    validation_file: Path | None
    hyper: Hyperparameters
    seed: int
    output_dir: Path
    lora_rank: int = 8
    lora_alpha: int = 16
    checkpoint_every: int = 0  # steps; 0 = at the end of each epoch
    resume: bool = True
    max_seq_len: int | None = None  # packed sequence length; None = min(model context, 1024)
    job_id: str | None = None  # recorded in cumulo_adapter.json
    method: Method = "supervised"  # dpo: preference pairs, DPO loss with beta = hyper.beta
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


@dataclass
class TrainEvent:
    kind: Literal["step", "checkpoint", "message"]
    step: int
    total_steps: int
    # tokens of the examples processed so far, prompts and answers, every epoch: OpenAI's `trained_tokens`,
    # what is billed (a whole run bills ValidationReport.n_tokens * n_epochs; a DPO pair counts its prompt
    # once and both outputs)
    trained_tokens: int
    train_loss: float | None = None
    valid_loss: float | None = None
    checkpoint_dir: Path | None = None
    message: str = ""
    # more of the step's numbers, by OpenAI's metric names (DPO: train_reward_margin, train_reward_accuracy,
    # and valid_* at checkpoints)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    adapter_dir: Path  # PEFT directory + cumulo_adapter.json
    trained_tokens: int
    steps: int
    train_loss: float | None
    valid_loss: float | None
    stopped: bool = False  # should_stop() ended it early; adapter_dir holds the last state


def train(
    spec: TrainSpec, on_event: Callable[[TrainEvent], None], should_stop: Callable[[], bool]
) -> TrainResult:
    """LoRA fine-tuning of `spec.model` on `spec.training_file` (supervised, or DPO). Calls `on_event` after every
    optimizer step, checkpoint and notable message; checks `should_stop` between steps (a cancel: it saves the
    adapter as it is and returns with `stopped=True`). With `resume`, continues from the newest checkpoint in
    `output_dir`. Raises cumulo.errors types with one-line messages (a bad file: InvalidRequest naming the line)."""
    from cumulo.finetune.train import run_training

    return run_training(spec, on_event, should_stop)


def newest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint directory under `output_dir`, or None."""
    found = sorted((Path(output_dir) / "checkpoints").glob(f"step-*/{STATE}"))
    return found[-1].parent if found else None
