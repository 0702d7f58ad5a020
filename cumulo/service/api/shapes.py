"""The JSON shapes of OpenAI's chat and text completion responses, whole and as stream chunks.

The two endpoints differ only here; `generation` drives both through the same `Shape` interface.
"""

from __future__ import annotations

from typing import Any

from cumulo.contracts import Tokenizer, TokenLogprob
from cumulo.errors import Conflict
from cumulo.service.api.run import Choice


def usage_dict(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


class Shape:
    object_name: str
    chunk_name: str

    def __init__(self, *, request_id: str, created: int, model: str, seal: str, tokenizer: Tokenizer) -> None:
        self.request_id, self.created, self.model, self.seal = request_id, created, model, seal
        self.tokenizer = tokenizer

    def _envelope(self, name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.seal,
            "choices": choices,
        }

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self._envelope(self.chunk_name, choices)
        if usage is not None:
            body["usage"] = usage
        return body

    # per endpoint ---------------------------------------------------------------------------------------
    def opening(self, choice: Choice) -> dict[str, Any] | None:
        return None

    def delta(self, choice: Choice, text: str, logprobs: list[TokenLogprob], finish: bool) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, choice: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def final(self, choices: list[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope(self.object_name, [self.whole(c) for c in choices])
        body["usage"] = usage
        return body

    def replay(self, stored: dict[str, Any]) -> list[dict[str, Any]]:
        """Stream chunks equivalent to a stored whole response (Idempotency-Key replays), once
        `check_replayable` has passed."""
        raise NotImplementedError

    def check_replayable(self, stored: dict[str, Any]) -> None:
        """Conflict if the stored answer is of the other endpoint: an Idempotency-Key is looked up per API key,
        not per endpoint, and a chat client must not be handed a text completion (or the reverse)."""
        if stored.get("object") != self.object_name:
            raise Conflict(
                f"this Idempotency-Key was first used for a {stored.get('object')!r} request; "
                "send a new key for this one"
            )


class ChatShape(Shape):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            text = _token_text(self.tokenizer, token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                for e in entries
            ]
        }

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        return {
            "index": choice.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def delta(self, choice: Choice, text: str, logprobs: list[TokenLogprob], finish: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "index": choice.index,
            "delta": {"content": text} if text else {},
            "logprobs": self._logprobs(logprobs) if logprobs else None,
            "finish_reason": choice.finish_reason if finish else None,
        }
        if finish:
            body["label"] = choice.label
        return body

    def whole(self, choice: Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": self._logprobs(choice.logprobs) if choice.logprobs else None,
            "finish_reason": choice.finish_reason,
            "label": choice.label,
        }

    def replay(self, stored: dict[str, Any]) -> list[dict[str, Any]]:
        chunks = []
        for c in stored["choices"]:
            delta = {"role": "assistant", "content": c["message"]["content"]}
            part = {
                "index": c["index"],
                "delta": delta,
                "logprobs": c.get("logprobs"),
                "finish_reason": c["finish_reason"],
                "label": c.get("label"),
            }
            chunks.append({**stored, "object": self.chunk_name, "choices": [part], "usage": None})
        chunks.append({**stored, "object": self.chunk_name, "choices": [], "usage": stored["usage"]})
        return chunks


class CompletionShape(Shape):
    object_name = "text_completion"
    chunk_name = "text_completion"

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for e in entries:
            text = _token_text(self.tokenizer, e.token_id)
            tokens.append(text)
            token_logprobs.append(e.logprob)
            tops.append({_token_text(self.tokenizer, t): lp for t, lp in e.top})
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def delta(self, choice: Choice, text: str, logprobs: list[TokenLogprob], finish: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "index": choice.index,
            "text": text,
            "logprobs": self._logprobs(logprobs, 0) if logprobs else None,
            "finish_reason": choice.finish_reason if finish else None,
        }
        if finish:
            body["label"] = choice.label
        return body

    def whole(self, choice: Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "text": choice.text,
            "logprobs": self._logprobs(choice.logprobs, 0) if choice.logprobs else None,
            "finish_reason": choice.finish_reason,
            "label": choice.label,
        }

    def replay(self, stored: dict[str, Any]) -> list[dict[str, Any]]:
        chunks = [{**stored, "choices": [c], "usage": None} for c in stored["choices"]]
        chunks.append({**stored, "choices": [], "usage": stored["usage"]})
        return chunks
