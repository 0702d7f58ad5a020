"""Pools over tiny in-process engines, and a client that dies on cue, for the pool's tests and the conformance
suite."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from cumulo.cluster.pool import Member, Pool
from cumulo.contracts import EngineClient, EngineHealth, RequestOutput, SamplingParams
from cumulo.engine.async_engine import AsyncEngine
from cumulo.errors import EngineUnavailable
from tests.support.tiny import make_tiny_engine


class DyingClient:
    """Passes another client's streams through until `die_after` deltas of one stream have been sent, then
    raises EngineUnavailable there, in its other open streams and in every later call, as a replica whose node
    died does. None: never."""

    def __init__(self, inner: EngineClient, die_after: int | None = None) -> None:
        self.inner = inner
        self.info = inner.info
        self.tokenizer = inner.tokenizer
        self.die_after = die_after
        self.dead = False
        self.started: list[str] = []  # request ids it was asked to generate

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        self.started.append(request_id or "")
        if self.dead or self.die_after == 0:
            self.dead = True
            raise EngineUnavailable("the replica's node died")
        sent = 0
        stream = self.inner.generate(prompt_token_ids, params, request_id)
        try:
            async for out in stream:
                if self.dead:  # another stream's death took the whole replica down
                    raise EngineUnavailable("the replica's node died")
                yield out
                sent += 1
                if self.die_after is not None and sent >= self.die_after and not out.finished:
                    self.dead = True
                    raise EngineUnavailable("the replica's node died")
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    async def health(self) -> EngineHealth:
        if self.dead:
            return EngineHealth(ok=False, detail="the replica's node died")
        return await self.inner.health()

    def shutdown(self) -> None:
        self.inner.shutdown()


def tiny_member(name: str, die_after: int | None = None, node: str = "node-a") -> Member:
    return Member(name, node, DyingClient(AsyncEngine(make_tiny_engine()), die_after))


def make_pool(
    *members: Member, policy: str = "prefix", max_attempts: int = 3, lost: list | None = None
) -> Pool:
    """A pool over `members` (default: two tiny engines); `lost` collects the names on_member_lost reports."""
    members = members or (tiny_member("tiny/0"), tiny_member("tiny/1", node="node-b"))
    first = members[0].client
    info = dataclasses.replace(first.info, device=f"pool of {len(members)}")
    pool = Pool(
        info,
        first.tokenizer,
        policy=policy,
        max_attempts=max_attempts,
        on_member_lost=None if lost is None else lost.append,
    )
    for member in members:
        pool.add(member)
    return pool
