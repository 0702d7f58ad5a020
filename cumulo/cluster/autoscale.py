"""How many replicas a deployment should run, between its `min_replicas` and `max_replicas`: a pure decision from
its replicas' load and what placement predicts of them (`decide`); the controller calls it every pass.

The model of a replica: it runs up to `max_sequences` requests in one batch, and a full batch's first tokens take
`predicted_ttft_ms` (placement's figures). A request that arrives behind `q` queued requests waits about
`q / max_sequences` batches, so its predicted TTFT is `(q / max_sequences + 1) * predicted_ttft_ms`. Spread over
`n` replicas, `demand` open requests leave `max(0, demand / n - max_sequences)` queued on each.

- Up: when the predicted TTFT of a new request exceeds the TTFT SLO (or, without one, the queue per replica
  exceeds `Policy.queue_depth`), to the fewest replicas that bring it back under, at most `max_replicas`.
- Down: by one, when the demand has fit in one fewer replica's batches with `Policy.margin` to spare, with no
  queue, for `Policy.down_after_s` without a break.
- No change within `Policy.cooldown_s` of the last one: new replicas take time to start and take load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cumulo.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One ready replica's load: requests open on it, and those of them its engine has not yet started."""

    requests: int
    waiting: int


@dataclass(frozen=True, slots=True)
class Policy:
    queue_depth: float = 4.0  # without a TTFT SLO: queued requests per replica that call for another replica
    margin: float = 0.25  # down only when the demand fits (1 - margin) of one fewer replica's batches
    down_after_s: float = 60.0  # ... and has for this long
    cooldown_s: float = 30.0  # no change sooner than this after the last one

    def __post_init__(self) -> None:
        if (
            self.queue_depth < 0
            or not 0.0 <= self.margin < 1.0
            or self.down_after_s < 0
            or self.cooldown_s < 0
        ):
            raise InvalidRequest(f"bad autoscaling policy: {self}")


@dataclass(frozen=True, slots=True)
class ScaleState:
    """What `decide` remembers between passes."""

    last_change: float = -math.inf
    calm_since: float | None = None  # since when the demand has fit in one fewer replica


@dataclass(frozen=True, slots=True)
class Decision:
    wanted: int
    reason: str
    state: ScaleState
    predicted_ttft_ms: float | None = None  # of a request arriving now, when placement's figures are known


def decide(
    loads: list[ReplicaLoad],
    current: int,
    min_replicas: int,
    max_replicas: int,
    *,
    max_sequences: float,
    predicted_ttft_ms: float | None,
    ttft_slo_ms: float | None,
    now: float,
    state: ScaleState,
    policy: Policy = Policy(),
) -> Decision:
    """The replica count wanted now, and why in words. `current`: the count the controller keeps (ready or
    not); `loads`: one per ready replica; `max_sequences` and `predicted_ttft_ms`: placement's, per replica."""
    if not 1 <= min_replicas <= max_replicas:
        raise InvalidRequest(f"need 1 <= min_replicas <= max_replicas, not {min_replicas} and {max_replicas}")
    if current < min_replicas:
        return Decision(min_replicas, f"{current} is below the minimum of {min_replicas}", _changed(now))
    if current > max_replicas:
        return Decision(max_replicas, f"{current} is above the maximum of {max_replicas}", _changed(now))
    if min_replicas == max_replicas:
        return Decision(current, f"fixed at {current} replica{_s(current)}", state)
    if not loads:
        return Decision(current, "no ready replica to measure load on", state)

    batch = max(1.0, max_sequences)
    demand = sum(load.requests for load in loads)
    queued = sum(max(load.waiting, load.requests - batch) for load in loads)
    per = queued / current
    ttft = (per / batch + 1) * predicted_ttft_ms if predicted_ttft_ms else None
    cooling = now - state.last_change < policy.cooldown_s
    steady = ScaleState(state.last_change)  # the demand does not fit one fewer: the calm, if any, is over

    def queue_at(n: int) -> float:
        return max(0.0, demand / n - batch)

    if ttft_slo_ms is not None and predicted_ttft_ms and ttft is not None:
        over = queued > 0 and ttft > ttft_slo_ms
        why = f"predicted TTFT {ttft:.0f} ms over the SLO {ttft_slo_ms:g} ms ({queued:g} queued)"
        limit = (ttft_slo_ms / predicted_ttft_ms - 1) * batch  # the queue per replica the SLO allows
    else:
        over = per > policy.queue_depth
        why = f"{per:.1f} queued per replica, over {policy.queue_depth:g}"
        limit = policy.queue_depth
    if over:
        if current >= max_replicas:
            return Decision(current, f"{why}; at the maximum of {max_replicas}", steady, ttft)
        if cooling:
            return Decision(current, f"{why}; cooling down after the last change", steady, ttft)
        wanted = next((n for n in range(current + 1, max_replicas + 1) if queue_at(n) <= limit), max_replicas)
        return Decision(wanted, f"up to {wanted}: {why}", _changed(now), ttft)

    room = (current - 1) * batch * (1 - policy.margin)
    if current <= min_replicas or queued > 0 or demand > room:
        head = f"{demand} open request{_s(demand)} on {current} replica{_s(current)}"
        if ttft is not None:
            head += f", predicted TTFT {ttft:.0f} ms"
        return Decision(current, f"steady: {head}", steady, ttft)
    calm_since = state.calm_since if state.calm_since is not None else now
    calm = ScaleState(state.last_change, calm_since)
    fit = f"{demand} open request{_s(demand)} would fit {current - 1} replica{_s(current - 1)} with margin"
    if now - calm_since < policy.down_after_s:
        held = now - calm_since
        return Decision(current, f"{fit} for {held:.0f} s of {policy.down_after_s:g} s", calm, ttft)
    if cooling:
        return Decision(current, f"{fit}; cooling down after the last change", calm, ttft)
    return Decision(
        current - 1, f"down to {current - 1}: {fit} for {policy.down_after_s:g} s", _changed(now), ttft
    )


def _changed(now: float) -> ScaleState:
    return ScaleState(last_change=now)


def _s(n: float) -> str:
    return "" if n == 1 else "s"
