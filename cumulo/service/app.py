"""The FastAPI application of the gateway. Engines arrive by injection, so tests pass fakes and `cumulo serve`
passes real ones: `create_app(settings, engines)`."""

from __future__ import annotations

from fastapi import FastAPI

from cumulo import __version__
from cumulo.contracts import EngineClient
from cumulo.service.api import errors
from cumulo.service.api.routes import (
    admin,
    chat,
    completions,
    deployments,
    edge,
    edge_devices,
    edge_requests,
    files,
    fine_tuning,
    health,
    labels,
    models,
    usage,
)
from cumulo.service.console.routes import ConsoleHeaders
from cumulo.service.console.routes import router as console_router
from cumulo.service.edge.lifespan import build_fleet, with_edge
from cumulo.service.finetune.lifespan import with_finetune
from cumulo.service.settings import Settings
from cumulo.service.state import build_state, lifespan


def create_app(settings: Settings, engines: dict[str, EngineClient]) -> FastAPI:
    app = FastAPI(
        title="Cumulo",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=with_finetune(with_edge(lifespan)),
    )
    app.state.service = build_state(settings, engines)
    app.state.edge = build_fleet(app.state.service)
    errors.install(app)
    # Uploads of training files may be larger than any other body.
    uploads = {"/v1/files": settings.finetune_max_file_bytes + (1 << 20)}
    app.add_middleware(errors.BodyLimit, max_bytes=settings.max_body_bytes, larger=uploads)
    app.add_middleware(ConsoleHeaders)
    routers = (models, chat, completions, usage, labels, admin, deployments, health, edge_devices, edge)
    for module in (*routers, edge_requests, files, fine_tuning):
        app.include_router(module.router)
    app.include_router(console_router)  # last: its /console/{path} serves the static files
    return app
