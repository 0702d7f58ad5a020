"""What the gateway runs for the edge fleet while it serves: the MQTT bridge when `edge_mqtt_url` is set, and
the periodic pass (rollouts, desired states) every `edge_check_seconds` in either case."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from cumulo.service.edge.bridge import MqttBridge
from cumulo.service.edge.fleet import EdgeFleet
from cumulo.service.state import ServiceState

log = logging.getLogger("cumulo.service.edge")
Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[None]]


def build_fleet(state: ServiceState) -> EdgeFleet:
    settings = state.settings
    return EdgeFleet(
        state.sessions,
        state.hasher,
        topic_root=settings.edge_topic_root,
        token_ttl=settings.edge_enroll_ttl_seconds,
    )


async def _keep(fleet: EdgeFleet, period: float) -> None:
    while True:
        try:
            await run_in_threadpool(fleet.tick)
        except Exception:
            log.exception("edge pass failed; trying again in %.0f s", period)
        await asyncio.sleep(period)


def with_edge(inner: Lifespan) -> Lifespan:
    """The service's lifespan with the edge fleet's bridge and pass inside it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with inner(app):
            fleet: EdgeFleet = app.state.edge
            settings = app.state.service.settings
            bridge = None
            if settings.edge_mqtt_url:
                bridge = MqttBridge(
                    fleet,
                    settings.edge_mqtt_url,
                    settings.edge_mqtt_client_id,
                    settings.edge_session_expiry_seconds,
                )
                bridge.start()
                app.state.edge_bridge = bridge
            keeper = asyncio.create_task(_keep(fleet, settings.edge_check_seconds))
            try:
                yield
            finally:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
                if bridge is not None:
                    await run_in_threadpool(bridge.stop)

    return lifespan
