"""What the gateway runs for the edge fleet while it serves: the MQTT bridge when `edge_mqtt_url` is set, the
periodic pass (rollouts, desired states, requests) every `edge_check_seconds`, and the webhook delivery thread
(woken by a stored result that owes a delivery, and every second for retries)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
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
        metrics=state.metrics,
    )


async def _keep(fleet: EdgeFleet, period: float) -> None:
    while True:
        try:
            await run_in_threadpool(fleet.tick)
        except Exception:
            log.exception("edge pass failed; trying again in %.0f s", period)
        await asyncio.sleep(period)


def _deliver(fleet: EdgeFleet, stop: threading.Event) -> None:
    with httpx.Client(timeout=10.0, follow_redirects=False) as client:
        while not stop.is_set():
            fleet.webhooks_due.wait(1.0)
            fleet.webhooks_due.clear()
            if not fleet.background_deliveries:
                continue  # tests drive deliveries themselves, on their own clock
            try:
                while fleet.deliver_webhooks(client).delivered and not stop.is_set():
                    pass  # a full round went out: there may be more due at once
            except Exception:
                log.exception("edge webhook round failed; trying again in 1 s")
                stop.wait(1.0)


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
            stop = threading.Event()
            deliverer = threading.Thread(
                target=_deliver, args=(fleet, stop), name="edge-webhooks", daemon=True
            )
            deliverer.start()
            try:
                yield
            finally:
                stop.set()
                fleet.webhooks_due.set()
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
                if bridge is not None:
                    await run_in_threadpool(bridge.stop)
                await run_in_threadpool(deliverer.join, 15.0)

    return lifespan
