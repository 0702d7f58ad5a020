"""Edge apps: turn a model's per-frame outputs into the few results worth sending.

A result is sent when something changes ("slot 4 empty", "wrong product in slot 7", "line stopped") and as a
periodic summary; a frame in which nothing changed sends nothing. A state must hold for `confirm` frames in a
row before it counts, so one misread frame does not send an event and its retraction.

Each result is a `Result(kind, body, summary)`: `summary` marks what the outbox may drop first when it is full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cumulo.contracts.edge import KIND_COUNT, KIND_EVENT
from cumulo.edge.scenes import EMPTY


@dataclass(frozen=True)
class Result:
    kind: str
    body: dict[str, Any]
    summary: bool = False  # a periodic summary: dropped before events when the outbox is full


@dataclass
class _Debounced:
    """A value that changes only after `confirm` equal readings in a row."""

    confirm: int
    value: Any = None
    candidate: Any = None
    streak: int = 0

    def update(self, reading: Any) -> bool:
        """Feed one reading; True when the confirmed value changed (the first confirmed value counts too)."""
        if reading == self.value:
            self.candidate, self.streak = None, 0
            return False
        if reading == self.candidate:
            self.streak += 1
        else:
            self.candidate, self.streak = reading, 1
        if self.streak >= self.confirm:
            self.value, self.candidate, self.streak = reading, None, 0
            return True
        return False


@dataclass
class ShelfApp:
    """Compares what the model sees in each slot with the planogram (what should be there)."""

    planogram: list[int]
    labels: list[str]
    confirm: int = 2
    summary_every: int = 100  # frames between summaries; 0 for none
    _slots: list[_Debounced] = field(init=False)
    _frames: int = 0

    def __post_init__(self) -> None:
        self._slots = [_Debounced(self.confirm, value=expected) for expected in self.planogram]

    def _status(self, slot: int) -> str:
        seen = self._slots[slot].value
        return "empty" if seen == EMPTY else "ok" if seen == self.planogram[slot] else "wrong"

    def update(self, classes: list[int] | torch.Tensor) -> list[Result]:
        classes = [int(c) for c in classes]
        if len(classes) != len(self.planogram):
            raise ValueError(f"{len(classes)} slot readings for a planogram of {len(self.planogram)} slots")
        results = []
        for slot, reading in enumerate(classes):
            before = self._status(slot)
            if not self._slots[slot].update(reading):
                continue
            results.append(self._event(slot, before))
        self._frames += 1
        if self.summary_every and self._frames % self.summary_every == 0:
            results.append(self.summary())
        return results

    def _event(self, slot: int, before: str) -> Result:
        seen, expected = self._slots[slot].value, self.planogram[slot]
        now = self._status(slot)
        body: dict[str, Any] = {"slot": slot, "expected": self.labels[expected]}
        if now == "empty":
            body |= {"type": "slot_empty", "text": f"slot {slot} empty"}
        elif now == "wrong":
            body |= {
                "type": "wrong_product",
                "seen": self.labels[seen],
                "text": f"wrong product in slot {slot}",
            }
        else:
            body |= {"type": "slot_ok", "was": before, "text": f"slot {slot} ok"}
        return Result(KIND_EVENT, body)

    def summary(self) -> Result:
        statuses = [self._status(slot) for slot in range(len(self.planogram))]
        return Result(
            KIND_COUNT,
            {
                "label": "shelf",
                "frames": self._frames,
                "slots": len(statuses),
                "empty": [s for s, status in enumerate(statuses) if status == "empty"],
                "wrong": [s for s, status in enumerate(statuses) if status == "wrong"],
            },
            summary=True,
        )


@dataclass
class LineApp:
    """Tells whether a conveyor line runs from how much the belt changes between frames (no model needed)."""

    confirm: int = 3
    changed: float = 0.02  # share of 4x4 blocks whose grey level moved by more than 20 that means motion
    summary_every: int = 100
    _state: _Debounced = field(init=False)
    _previous: torch.Tensor | None = None
    _frames: int = 0
    _running_frames: int = 0

    def __post_init__(self) -> None:
        self._state = _Debounced(self.confirm)

    def update(self, image: torch.Tensor) -> list[Result]:
        # averaging 4x4 blocks cuts sensor noise by 4 while a moving box still changes whole blocks
        image = F.avg_pool2d(image.float().mean(0, keepdim=True), 4)
        moving = (
            self._previous is not None
            and float(((image - self._previous).abs() > 20).float().mean()) > self.changed
        )
        first = self._previous is None
        self._previous = image
        results = []
        if not first and self._state.update(moving):
            text = "line running" if moving else "line stopped"
            results.append(Result(KIND_EVENT, {"type": text.replace(" ", "_"), "text": text}))
        self._frames += 1
        self._running_frames += int(moving)
        if self.summary_every and self._frames % self.summary_every == 0:
            results.append(self.summary())
        return results

    def summary(self) -> Result:
        return Result(
            KIND_COUNT,
            {"label": "line", "frames": self._frames, "running_frames": self._running_frames},
            summary=True,
        )
