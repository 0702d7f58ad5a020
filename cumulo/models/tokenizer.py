"""The model's tokenizer, built with the `tokenizers` library from a tokenizer.json or from GGUF metadata.

GGUF files carry a vocabulary, not a tokenizer: `tokenizer.ggml.model == "gpt2"` is byte-level BPE (tokens and
merges, split by the regex named in `tokenizer.ggml.pre`); `"llama"` is a SentencePiece BPE vocabulary
(tokens, scores and token types, no merges), rebuilt here as a byte-fallback BPE whose merges follow the
scores, which is what SentencePiece's BPE does. Control tokens become special added tokens, so
`<|im_start|>` typed in a chat template encodes as one id and `decode(..., skip_special_tokens=True)` drops it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from cumulo.errors import InvalidModel, InvalidRequest
from cumulo.models.chat import render_chat

# Tokens that end an assistant turn in common chat formats; any that the vocabulary holds as special tokens
# count as end-of-sequence, because a chat model emits them instead of its eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>")

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_IGNORE_MERGES = ("llama-bpe", "llama3", "llama-v3")
# StarCoder-style vocabularies (SmolLM, SmolLM2) split every digit, then apply GPT-2's regex.
_DIGIT_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class Tokenizer:
    """Implements `cumulo.contracts.Tokenizer` over a `tokenizers.Tokenizer`."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_ids: set[int],
        chat_template: str | None,
        add_bos: bool = False,
        eos_token_id: int | None = None,
    ) -> None:
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        # The file's own eos (what templates print as `eos_token`); `eos_token_ids` adds end-of-turn tokens.
        self.eos_token_id = eos_token_id if eos_token_id is not None else min(eos_token_ids, default=None)
        self.eos_token_ids = set(eos_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
        self.chat_template = chat_template
        # True when the backend has no post-processor that adds bos itself (GGUF-built tokenizers).
        self.add_bos = add_bos and bos_token_id is not None

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.backend.id_to_token(self.eos_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            # The backend takes only text that encodes as UTF-8; a lone surrogate ("\ud800" in JSON, or an
            # undecodable byte in a command line) gets a TypeError that names neither the text nor the fault.
            at = _lone_surrogate(text)
            if at is None:
                raise
            raise InvalidRequest(f"text is not valid Unicode: a lone surrogate at character {at}") from None
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text; encode it with `add_special_tokens=False` (templates write bos themselves)."""
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def _lone_surrogate(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _end_of_turn_ids(backend: Backend) -> set[int]:
    ids = {backend.token_to_id(token) for token in END_OF_TURN_TOKENS}
    return {i for i in ids if i is not None}


# -- from a Hugging Face-style directory ---------------------------------------------------------------------
def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _as_ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"{path}: not valid JSON ({exc})") from exc


def _chat_template_of(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template") or _read_json(directory / "chat_template.json").get(
        "chat_template"
    )
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def from_directory(directory: Path, config: dict[str, Any] | None = None) -> Tokenizer:
    """Tokenizer of a Hugging Face-style directory: tokenizer.json plus tokenizer_config.json for the rest."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise InvalidModel(f"{directory}: no tokenizer.json")
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exceptions
        raise InvalidModel(f"{path}: not a tokenizer.json the tokenizers library can read ({exc})") from exc
    tok_config = _read_json(directory / "tokenizer_config.json")
    config = config or {}
    generation = _read_json(directory / "generation_config.json")

    def token_id(key: str) -> int | None:
        content = _token_content(tok_config.get(key))
        return backend.token_to_id(content) if content else None

    bos = token_id("bos_token")
    if bos is None and isinstance(config.get("bos_token_id"), int):
        bos = config["bos_token_id"]
    config_eos = _as_ids(config.get("eos_token_id"))
    primary = token_id("eos_token")
    if primary is None and config_eos:
        primary = min(config_eos)
    eos = config_eos | _as_ids(generation.get("eos_token_id")) | _end_of_turn_ids(backend)
    template = _chat_template_of(directory, tok_config)
    tokenizer = Tokenizer(
        backend, bos_token_id=bos, eos_token_ids=eos, chat_template=template, eos_token_id=primary
    )
    # A tokenizer.json usually adds bos through its post-processor; when the config asks for bos and the
    # post-processor does not add it, add it ourselves.
    if tok_config.get("add_bos_token") and bos is not None and tokenizer.encode("a")[:1] != [bos]:
        tokenizer.add_bos = True
    return tokenizer


# -- from GGUF metadata --------------------------------------------------------------------------------------
def from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """Tokenizer from `tokenizer.ggml.*` metadata (values already decoded to Python lists and scalars)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise InvalidModel("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    types = (types + [NORMAL] * len(tokens))[: len(tokens)]
    if kind == "gpt2":
        backend = _byte_level_bpe(
            tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre")
        )
    elif kind == "llama":
        arch = str(meta.get("general.architecture", ""))
        scores = list(meta.get("tokenizer.ggml.scores") or [])
        scores = (scores + [0.0] * len(tokens))[: len(tokens)]
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend = _sentencepiece_bpe(
            tokens, scores, types, unk, space_prefix, by_position=arch.startswith("gemma")
        )
    else:
        raise InvalidModel(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    _add_marked_tokens(backend, tokens, types)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = ({eos} if isinstance(eos, int) else set()) | _end_of_turn_ids(backend)
    default_add_bos = kind == "llama"  # llama.cpp's default when the key is absent
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos))
    return Tokenizer(
        backend,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=eos_ids,
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos=add_bos,
        eos_token_id=eos if isinstance(eos, int) else None,
    )


def _add_marked_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special (whole in the text, skipped on decode); user-defined ones stay visible.

    Only tokens the model vocabulary already holds are added, so no id beyond the embedding table appears
    (Gemma's runs of spaces are user-defined but live in the vocabulary as U+2581 runs, reached by merges).
    """
    marked = [(t, k) for t, k in zip(tokens, types, strict=True) if k in (CONTROL, USER_DEFINED) and t]
    in_vocab = [(t, k) for t, k in marked if backend.token_to_id(t) is not None]
    control = [AddedToken(t, special=True, normalized=False) for t, k in in_vocab if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in in_vocab if k == USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Backend:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # Llama 3 takes a pre-token that is in the vocabulary whole, before any merge (as llama.cpp does).
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGIT_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:  # "gpt2", "default" and the rest: GPT-2's own regex
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _merges_from_vocab(
    vocab: dict[str, int], mergeable: set[str], rank: dict[str, float]
) -> list[tuple[str, str]]:
    """Every split of a token into two mergeable tokens, best-ranked result first (ties: by piece ids)."""
    found: list[tuple[float, int, int, str, str]] = []
    append = found.append
    for (
        token
    ) in mergeable:  # the hot loop of Gemma's 262k vocabulary: check the left piece before slicing more
        for cut in range(1, len(token)):
            left = token[:cut]
            if left in mergeable:
                right = token[cut:]
                if right in mergeable:
                    append((rank[token], vocab[left], vocab[right], left, right))
    found.sort()
    return [(m[3], m[4]) for m in found]


def _sentencepiece_bpe(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    unk: int | None,
    space_prefix: bool,
    by_position: bool,
) -> Backend:
    # Gemma stores tokens made of several spaces as real spaces; SentencePiece spells them with U+2581.
    spelled = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab: dict[str, int] = {}
    for index, token in enumerate(spelled):
        vocab.setdefault(token, index)
    mergeable = {t for t, k in zip(spelled, types, strict=True) if k in (NORMAL, USER_DEFINED, UNUSED)}
    # SentencePiece BPE merges the pair whose result scores best. Gemma's scores do not follow that order,
    # but its file order does, so Gemma ranks by position.
    rank = {t: (i if by_position else -scores[i]) for t, i in vocab.items()}
    merges = _merges_from_vocab(vocab, mergeable, rank)
    unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk_token,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    scheme = "first" if space_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend
