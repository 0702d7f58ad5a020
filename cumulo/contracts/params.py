"""What a request asks for (`SamplingParams`) and what one engine step adds to it (`RequestOutput`).

Outputs are deltas: each carries only the tokens, text and log-probabilities that step added, so a stream costs
the same per message whether the engine runs in this process or on another machine. Whoever needs the whole
answer adds the deltas up (the service's `Run`, the CLI's `LLM`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cumulo.errors import InvalidRequest

# What a 64-bit generator state takes (torch.Generator.manual_seed: signed or unsigned 64 bits). The service
# accepts signed 64-bit seeds, as OpenAI does, leaving room for its `seed + i` per choice.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A LoRA adapter a request runs with, over the engine's base model. The service names it; the engine
    reads it from `path` (a PEFT directory) on first use and keeps it in its adapter cache.

    `name` is what the caller called the model (`ft:...`, or an imported adapter's name); with `path` it keys
    the engine's cache and its prefix cache, so requests for different adapters never share KV blocks.
    `base_seal`: the base the caller expects it to run over; the engine refuses it over another."""

    name: str
    path: str
    base_seal: str | None = None


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None = off; k >= 0 returns the chosen token's logprob and the top k
    include_stop_str_in_output: bool = False
    adapter: AdapterRef | None = None  # run with this LoRA adapter (None: the base model)

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1")
        if self.temperature < 0 or self.temperature > 100:
            raise InvalidRequest("temperature must be between 0 and 100")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidRequest("top_k must be 0 (off) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("min_p must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidRequest("presence_penalty and frequency_penalty must be between -2 and 2")
        if self.repetition_penalty <= 0:
            raise InvalidRequest("repetition_penalty must be positive")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequest("logprobs must be between 0 and 20")
        if self.adapter is not None and not (self.adapter.name and self.adapter.path):
            raise InvalidRequest("an adapter needs a name and a path")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise InvalidRequest(f"seed must be between {SEED_MIN} and {SEED_MAX} (64 bits)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first


@dataclass(slots=True)
class RequestOutput:
    """One step's news about one request: only what this step added."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # stop strings trimmed; may be empty while a possible stop string is held back
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
