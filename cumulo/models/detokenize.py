"""Incremental detokenization: turn a growing list of token ids into text deltas, one request at a time.

Decoding token by token breaks text: a Hangul syllable or an emoji can span several byte-level tokens, and a
SentencePiece token's leading space depends on what came before. So each step decodes a short window of
earlier tokens plus the new ones and emits only what the window gained; while the decoded text ends in U+FFFD
(an incomplete UTF-8 sequence) nothing is emitted and the bytes wait for the next token. The concatenation of
all deltas equals a full decode of all tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from cumulo.contracts import Tokenizer

REPLACEMENT = "\ufffd"
# Tokens decoded before the new ones so that spaces and merges at the seam come out as in a full decode.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this have been emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete (may be empty while a character is incomplete)."""
        self.token_ids.extend(new_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if full_text.endswith(REPLACEMENT) or len(full_text) <= len(prefix_text):
            # An incomplete character (or nothing visible yet): hold the bytes back.
            return ""
        if not full_text.startswith(prefix_text):
            # Decoders that reshape text at the seam (rare): fall back to the longest common prefix.
            common = _common_prefix_length(full_text, prefix_text)
            delta = full_text[common:]
        else:
            delta = full_text[len(prefix_text) :]
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(0, self.read_offset - CONTEXT_TOKENS)
        return delta

    def flush(self) -> str:
        """At the end of a request: what is still held back (an unfinished character decodes as U+FFFD)."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(0, self.read_offset - CONTEXT_TOKENS)
        return full_text[len(prefix_text) :] if full_text.startswith(prefix_text) else ""

    @property
    def text(self) -> str:
        """Full decode of everything pushed so far."""
        return self._decode(self.token_ids)


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
