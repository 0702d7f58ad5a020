"""Request bodies of the OpenAI-compatible and admin APIs (pydantic), with a limit on every string, list and map.

Unknown fields are ignored, as OpenAI does; known OpenAI fields that no engine here can honour (tools,
`response_format` other than text, non-text content parts, `best_of` other than `n`, `suffix`, `echo`) are
refused instead of dropped, and `logit_bias` is checked against the model's vocabulary and then refused
(`_Sampling.check_logit_bias`). Every string anywhere in a body must be valid Unicode: JSON can spell a lone
surrogate ("\\ud800") that no tokenizer, database or response encoder accepts. Names that reach the database
carry no control characters. docs/service.md ("Limits on requests") lists the limits.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from cumulo.contracts import SamplingParams
from cumulo.service.api.errors import BadParameter

INT32_MAX = 2**31 - 1  # Integer columns: plan limits, row ids (PostgreSQL refuses a larger parameter)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's seed range; BigInteger columns
MAX_TEXT = 10 * 1024 * 1024  # characters in one string (OpenAI's limit); the body limit usually binds first
MAX_NAME = 256  # model, user, e-mail
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256  # per message
MAX_STOP = 4  # OpenAI: up to 4 stop sequences; each is matched against the text at every token
MAX_STOP_CHARS = 256
MAX_BATCH = 64  # prompts in one /v1/completions request
MAX_PROMPT_TOKENS = 1 << 20  # token ids in one prompt (the model's context is checked later)
MAX_N = 128  # OpenAI's bound; the server's own `max_n` setting is lower
MAX_LOGIT_BIAS = 300  # entries
MAX_TOOLS = 128
MAX_PLAN_MODELS = 256
MAX_PRICE = 1e6  # USD per million tokens
LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: no date field needs more


_SCALARS = {int, float, bool, type(None)}


def _check_unicode(value: Any) -> None:
    """Raises unless every string in `value` (nested lists and maps, keys too) encodes as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"text must be valid Unicode: it holds a lone surrogate (U+{ord(value[exc.start]):04X}) "
                f"at character {exc.start}"
            ) from None
    elif isinstance(value, list | tuple):
        if set(map(type, value)) <= _SCALARS:  # token ids: one pass in C, not one call per id
            return
        for item in value:
            _check_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)


def _valid_unicode(value: Any) -> Any:
    _check_unicode(value)
    return value


RawJson = AfterValidator(
    _valid_unicode
)  # for fields that keep JSON as it came (`Any`): checked all the way down


def _plain(value: str) -> str:
    if any(c < " " or c == "\x7f" for c in value):
        raise ValueError("must not contain control characters")
    return value


def _name(max_length: int, min_length: int = 1) -> Any:
    """A single-line name that the database stores: no control characters."""
    return Annotated[
        str, StringConstraints(min_length=min_length, max_length=max_length), AfterValidator(_plain)
    ]


ModelName = _name(MAX_NAME)
Seal = _name(128)
EndUser = _name(MAX_NAME, min_length=0)
PlanName = _name(64)
OrgName = _name(128)
KeyName = _name(128, min_length=0)
Email = _name(MAX_NAME)
PartType = _name(64)
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
StopString = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
ShortText = Annotated[str, StringConstraints(max_length=64)]
JsonObject = Annotated[
    dict[str, Any], Field(max_length=64)
]  # JSON the gateway only inspects, to refuse what it asks for
TokenIds = Annotated[list[int], Field(max_length=MAX_PROMPT_TOKENS)]
Price = Annotated[float, Field(ge=0.0, le=MAX_PRICE)]


class _Body(BaseModel):
    # Every string field is a constrained one (a length at least): pydantic then reads it as UTF-8 and refuses a
    # lone surrogate itself. Raw JSON (`Any`) is walked by `RawJson`. test_request_limits checks both.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: PartType = Field(default="text", json_schema_extra={"enum": ["text"]})
    text: Text = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"only text content parts are supported, not {value!r}")
        return value


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: Annotated[str, StringConstraints(max_length=MAX_NAME)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Sampling(_Body):
    model: ModelName
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100.0, le=100.0)]] | None = (
        Field(default=None, max_length=MAX_LOGIT_BIAS)
    )
    user: EndUser | None = None
    # vLLM extensions that benchmarks send
    ignore_eos: bool = False
    top_k: int = Field(default=0, ge=0, le=INT32_MAX)  # 0 = off; at or above the vocabulary also means off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    # Cumulo: refuse unless the served model has exactly this seal
    seal: Seal | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """What the engine is asked for: these fields with OpenAI's defaults, the fitted `max_tokens`, and
        `logprobs` as the endpoint spells it (top-k alternatives per token, or None)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=self.stop_list(),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logprobs=logprobs,
        )

    def check_logit_bias(self, vocab_size: int) -> None:
        """Token ids must exist in the model's vocabulary; then, as no engine applies a bias yet, a non-empty
        map is refused rather than ignored."""
        if not self.logit_bias:
            return
        outside = sorted(t for t in self.logit_bias if t >= vocab_size)
        if outside:
            raise BadParameter(
                "logit_bias",
                f"logit_bias names token id {outside[0]}, but the model {self.model!r} has {vocab_size} "
                f"tokens (ids 0 to {vocab_size - 1})",
            )
        raise BadParameter(
            "logit_bias", "logit_bias is not supported by this server's engines; leave it out or send {}"
        )


def _refuse_if_set(what: str) -> Any:
    def check(value: Any) -> Any:
        if value:
            raise ValueError(f"{what} is not supported by this server; leave it out")
        return value

    return AfterValidator(check)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # OpenAI fields that ask for what the engines cannot do: refused when they ask for it, never dropped.
    tools: Annotated[
        list[JsonObject] | None, Field(max_length=MAX_TOOLS), RawJson, _refuse_if_set("tools")
    ] = None
    functions: Annotated[
        list[JsonObject] | None, Field(max_length=MAX_TOOLS), RawJson, _refuse_if_set("functions")
    ] = None
    tool_choice: Annotated[ShortText | JsonObject | None, RawJson] = None
    function_call: Annotated[ShortText | JsonObject | None, RawJson] = None
    response_format: Annotated[JsonObject | None, RawJson] = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_forced_tool(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if value not in (None, "none", "auto"):
            raise ValueError("tool calls are not supported by this server; use 'none' or leave it out")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(
                f"response format {value.get('type')!r} is not supported by this server; only 'text'"
            )
        return value


class CompletionRequest(_Sampling):
    prompt: (
        Text
        | Annotated[list[Text], Field(max_length=MAX_BATCH)]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=MAX_BATCH)]
    )
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Annotated[bool, _refuse_if_set("echo")] = False
    suffix: Annotated[str | None, StringConstraints(max_length=MAX_TEXT), _refuse_if_set("suffix")] = None
    best_of: int | None = Field(default=None, ge=1, le=20)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported by this server")
        return value


class VerifyRequest(_Body):
    text: Text
    label: Annotated[dict[str, Any], Field(max_length=64), RawJson]


class PlanFinetuneTerms(_Body):
    """A plan's fine-tuning terms; in a PATCH, a field left out keeps its value and a cap set to null is lifted."""

    priority: int = Field(default=0, ge=0, le=INT32_MAX, description="higher runs first in the queue")
    max_jobs: int | None = Field(
        default=None, ge=1, le=INT32_MAX, description="jobs running at once per key (null: no cap)"
    )
    monthly_training_tokens: int | None = Field(
        default=None, ge=0, le=INT64_MAX, description="training tokens per key and month (null: no quota)"
    )
    price_training: Price = Field(default=0.0, description="USD per million training tokens")


class PlanCreate(_Body):
    name: PlanName
    rpm: int | None = Field(default=None, ge=0, le=INT32_MAX)
    tpm: int | None = Field(default=None, ge=0, le=INT32_MAX)
    concurrency: int | None = Field(default=None, ge=0, le=INT32_MAX)
    monthly_tokens: int | None = Field(default=None, ge=0, le=INT64_MAX)
    models: Annotated[list[ModelName], Field(max_length=MAX_PLAN_MODELS)] | None = None
    price_in: Price = 0.0
    price_out: Price = 0.0
    # {model: [USD per million input tokens, per million output tokens]}
    model_prices: (
        Annotated[
            dict[ModelName, Annotated[list[Price], Field(min_length=2, max_length=2)]],
            Field(max_length=MAX_PLAN_MODELS),
        ]
        | None
    ) = None
    explicit_label: bool = False
    fine_tuning: PlanFinetuneTerms | None = None


class KeyCreate(_Body):
    org: OrgName
    plan: PlanName = "default"
    name: KeyName = ""
    user: Email | None = None
    expires_at: float | None = Field(default=None, ge=0.0, le=LATEST_TIME)
