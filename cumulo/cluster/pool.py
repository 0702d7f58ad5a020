"""`Pool`: several replicas of one model behind one `EngineClient`, with routing and fail-over.

Only "ready" members get new requests; a router (`cluster/router.py`) picks one per prompt. When a member's
client raises `EngineUnavailable` (its replica or node died), the member is marked "unhealthy", the owner is
told (`on_member_lost`), and the request moves to another ready member: from the start if nothing was streamed
yet, else as a continuation (prompt + the tokens already sent, `max_tokens` reduced by them) whose text the pool
derives itself, so the caller sees one stream whose deltas add up as a single run's would. The pool knows
nothing of Ray: members are any `EngineClient`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from cumulo.cluster.router import make_router
from cumulo.contracts import EngineClient, EngineHealth, ModelInfo, RequestOutput, SamplingParams, Tokenizer
from cumulo.engine.stop import StopChecker
from cumulo.errors import EngineUnavailable, InvalidRequest
from cumulo.models.detokenize import IncrementalDetokenizer

log = logging.getLogger(__name__)

STATES = ("starting", "ready", "draining", "unhealthy")


@dataclass
class Member:
    name: str  # unique replica name, e.g. "smollm2-135m/0"
    node: str  # the node it runs on
    client: EngineClient
    state: str = "ready"  # "starting" | "ready" | "draining" | "unhealthy"


@dataclass(slots=True)
class _Counts:
    in_flight: int = 0  # requests the pool has open on the member now
    served: int = 0  # requests that finished there
    failures: int = 0  # streams that ended in EngineUnavailable there
    waiting: int = 0  # the member's own queue, as its last health() reported


class Pool:
    def __init__(
        self,
        info: ModelInfo,
        tokenizer: Tokenizer,
        *,
        policy: str = "prefix",
        max_attempts: int = 3,
        on_member_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.router = make_router(policy, info.kv_block_size)
        self.max_attempts = max_attempts
        self.on_member_lost = on_member_lost
        self._members: dict[str, Member] = {}
        self._counts: dict[str, _Counts] = {}
        self._serving: dict[str, str] = {}  # request id -> the member streaming it now
        self._aborted: set[str] = set()
        self._drain_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._closed = False

    # -- membership -------------------------------------------------------------------------------------
    def add(self, member: Member) -> None:
        if member.name in self._members:
            raise InvalidRequest(f"the pool already has a member named {member.name!r}")
        _check_state(member.state)
        self._members[member.name] = member
        self._counts.setdefault(member.name, _Counts())

    def set_state(self, name: str, state: str) -> None:
        _check_state(state)
        member = self._member(name)
        member.state = state
        if state == "unhealthy":
            self.router.forget(name)

    def remove(self, name: str) -> Member:
        member = self._member(name)
        del self._members[name]
        self.router.forget(name)
        return member

    async def drain(self, name: str) -> None:
        """No new requests go to the member; returns once the requests it has end (none is cut)."""
        self.set_state(name, "draining")
        while self._counts[name].in_flight:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.setdefault(name, []).append(waiter)
            await waiter

    def status(self) -> list[dict]:
        return [
            {
                "name": m.name,
                "node": m.node,
                "state": m.state,
                "in_flight": self._counts[m.name].in_flight,
                "served": self._counts[m.name].served,
                "failures": self._counts[m.name].failures,
                "prefix_hit_rate": round(self.router.hit_rate(m.name), 4),
            }
            for m in self._members.values()
        ]

    # -- the EngineClient interface -----------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self._closed:
            raise EngineUnavailable(f"the pool of {self.info.name!r} has shut down")
        params.validate()
        rid = request_id or uuid.uuid4().hex
        sent: list[int] = []  # token ids the caller has received
        sent_text: list[str] = []
        cached: int | None = None
        tried: list[str] = []
        relay: _Continuation | None = None
        try:
            while True:
                if rid in self._aborted:
                    yield RequestOutput(rid, [], "", True, "abort", cached or 0)
                    return
                ids = list(prompt_token_ids) + sent
                name = self._pick(ids, tried)
                tried.append(name)
                member_params = params if relay is None else relay.params_after(len(sent))
                counts = self._counts[name]
                counts.in_flight += 1
                self._serving[rid] = name
                stream = self._members[name].client.generate(ids, member_params, rid)
                try:
                    async for out in stream:
                        if cached is None:
                            cached = out.num_cached_tokens
                        if relay is not None:
                            out = relay.translate(out)
                        out = dataclasses.replace(out, request_id=rid, num_cached_tokens=cached)
                        sent += out.new_token_ids
                        sent_text.append(out.new_text)
                        if out.finished:
                            counts.served += 1
                        yield out
                        if out.finished:
                            return
                    raise EngineUnavailable(f"the stream from {name!r} ended before its last output")
                except EngineUnavailable as exc:
                    if self._closed:
                        raise
                    self._lose(name, exc)
                    if len(tried) >= self.max_attempts:
                        raise EngineUnavailable(
                            f"request {rid} failed on {len(tried)} replicas of {self.info.name!r}: {exc}"
                        ) from exc
                    if relay is None and sent:
                        relay = _Continuation(self.tokenizer, params, sent, "".join(sent_text))
                    log.warning("replica %s lost (%s); request %s moves on", name, exc, rid)
                finally:
                    with contextlib.suppress(Exception):  # an early close aborts on the member
                        await stream.aclose()
                    self._done(name)
        finally:
            self._serving.pop(rid, None)
            self._aborted.discard(rid)

    async def abort(self, request_id: str) -> None:
        name = self._serving.get(request_id)
        if name is None:
            return
        self._aborted.add(request_id)  # in case it is between members now
        member = self._members.get(name)
        if member is not None:
            with contextlib.suppress(EngineUnavailable):
                await member.client.abort(request_id)

    async def health(self) -> EngineHealth:
        if self._closed:
            return EngineHealth(ok=False, detail=f"the pool of {self.info.name!r} has shut down")
        asked = [m for m in self._members.values() if m.state != "unhealthy"]
        answers = await asyncio.gather(*(m.client.health() for m in asked), return_exceptions=True)
        running = waiting = 0
        for member, answer in zip(asked, answers, strict=True):
            if isinstance(answer, EngineHealth) and answer.ok:
                running += answer.num_running
                waiting += answer.num_waiting
                self._counts[member.name].waiting = answer.num_waiting
            elif member.state in ("ready", "draining"):
                why = answer.detail if isinstance(answer, EngineHealth) else repr(answer)
                self._lose(member.name, EngineUnavailable(why))
        ready = [m.name for m in self._members.values() if m.state == "ready"]
        lost = [m.name for m in self._members.values() if m.state == "unhealthy"]
        detail = "; ".join(
            part
            for part in (
                "" if ready else "no ready replica",
                f"unhealthy: {', '.join(lost)}" if lost else "",
            )
            if part
        )
        return EngineHealth(ok=bool(ready), detail=detail, num_running=running, num_waiting=waiting)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for member in self._members.values():
            try:
                member.client.shutdown()
            except Exception:  # one member failing to stop must not keep the others running
                log.exception("shutting down %s failed", member.name)

    # -- plumbing -------------------------------------------------------------------------------------
    def _member(self, name: str) -> Member:
        try:
            return self._members[name]
        except KeyError:
            raise InvalidRequest(f"the pool has no member named {name!r}") from None

    def _pick(self, prompt_token_ids: list[int], tried: list[str]) -> str:
        loads = {
            m.name: self._counts[m.name].in_flight + self._counts[m.name].waiting
            for m in self._members.values()
            if m.state == "ready" and m.name not in tried
        }
        if not loads:
            raise EngineUnavailable(f"no ready replica of {self.info.name!r}")
        return self.router.route(prompt_token_ids, loads)

    def _lose(self, name: str, exc: Exception) -> None:
        self._counts[name].failures += 1
        member = self._members.get(name)
        if member is None or member.state == "unhealthy":
            return
        member.state = "unhealthy"
        self.router.forget(name)
        log.warning("replica %s of %s is unhealthy: %s", name, self.info.name, exc)
        if self.on_member_lost is not None:
            try:
                self.on_member_lost(name)
            except Exception:
                log.exception("on_member_lost(%r) failed", name)

    def _done(self, name: str) -> None:
        counts = self._counts[name]
        counts.in_flight -= 1
        if counts.in_flight == 0:
            for waiter in self._drain_waiters.pop(name, []):
                if not waiter.done():
                    waiter.set_result(None)


class _Continuation:
    """Turns a continuation's outputs (a member generating after the tokens already sent, told no stop
    strings) into the deltas the first member would have sent: the text comes from replaying every token
    through the same detokenizer and stop checker an engine uses, so held-back text is not lost and a stop
    string spanning the hand-over is still found."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, sent: list[int], sent_text: str) -> None:
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopChecker(params.stop, params.include_stop_str_in_output)
        for token in sent:
            self.stops.feed(self.detokenizer.push([token]))
        # Normally the replay releases exactly what the caller saw; anything more is owed to the caller.
        released = self.stops.text
        self.owed = released[len(sent_text) :] if released.startswith(sent_text) else ""

    def params_after(self, num_sent: int) -> SamplingParams:
        return dataclasses.replace(self.params, max_tokens=self.params.max_tokens - num_sent, stop=[])

    def translate(self, out: RequestOutput) -> RequestOutput:
        text, self.owed = self.owed, ""
        ids: list[int] = []
        reason: str | None = None
        for i, token in enumerate(out.new_token_ids):
            ids.append(token)
            if out.finished and out.finish_reason == "stop" and i == len(out.new_token_ids) - 1:
                # A stop token (the member has no stop strings): as the engine, it is not detokenized.
                more, _ = self.stops.feed(self.detokenizer.flush())
                text += more + self.stops.flush()
                reason = "stop"
                break
            piece, hit = self.stops.feed(self.detokenizer.push([token]))
            text += piece
            if hit is not None:
                reason = "stop"
                break
        else:
            if out.finished:
                reason = out.finish_reason
                if reason == "length":
                    more, _ = self.stops.feed(self.detokenizer.flush())
                    text += more + self.stops.flush()
        return dataclasses.replace(
            out,
            new_token_ids=ids,
            new_text=text,
            finished=reason is not None,
            finish_reason=reason,
            new_logprobs=out.new_logprobs[: len(ids)],
        )


def _check_state(state: str) -> None:
    if state not in STATES:
        raise InvalidRequest(f"unknown member state {state!r}; one of {', '.join(STATES)}")
