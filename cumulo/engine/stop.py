"""Stop strings on streamed text: find them across token boundaries and never let a client see part of one.

The detokenizer hands over text piece by piece; a stop string may arrive split over several pieces. The
`StopChecker` releases text as soon as it cannot be the start of a stop string and holds back the shortest
tail that still could be, so a streaming client sees either the whole stop (when it is included) or none of it.
"""

from __future__ import annotations


class StopChecker:
    """Feed it new text with `feed`; when the request ends for another reason, `flush` releases the tail.

    `text` is everything released so far (the request's text, stop string trimmed unless included).
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in dict.fromkeys(stop) if s]  # empty strings would match everywhere
        self.include = include_stop_str_in_output
        self.text = ""
        self.stopped: str | None = None  # the stop string that ended the request
        self._held = ""
        self._longest = max((len(s) for s in self.stop), default=0)

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit now, the stop string found or None). After a stop nothing more comes."""
        if self.stopped is not None:
            return "", self.stopped
        if not self.stop:
            self.text += new_text
            return new_text, None
        pending = self._held + new_text
        # Only text after the previously released part can start a stop: anything earlier was checked and
        # released because no stop could begin there. Find the earliest stop; on a tie, the longest.
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            at = pending.find(s)
            if at >= 0 and (best is None or (at, -len(s)) < (best[0], -len(best[2]))):
                best = (at, len(s), s)
        if best is not None:
            at, length, s = best
            out = pending[: at + length] if self.include else pending[:at]
            self._held = ""
            self.stopped = s
            self.text += out
            return out, s
        hold = self._partial_stop_length(pending)
        out = pending[: len(pending) - hold]
        self._held = pending[len(pending) - hold :]
        self.text += out
        return out, None

    def flush(self) -> str:
        """The held-back tail, for a request that finished without a stop string (length, eos, abort)."""
        out, self._held = ("" if self.stopped is not None else self._held), ""
        self.text += out
        return out

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
