"""`cumulo serve`: the OpenAI-compatible AI cloud on this machine (HTTP gateway + one engine process per model).

Embedded defaults: 127.0.0.1:8000, SQLite in the data directory, the catalog model smollm2-135m (pulled when
missing). Flags override `CUMULO_HOST`, `CUMULO_PORT`, `CUMULO_DATABASE_URL`, `CUMULO_MODELS` (comma list).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from cumulo.cli.options import add_head_option
from cumulo.contracts import EngineClient
from cumulo.errors import InvalidRequest

DEFAULT_MODEL = "smollm2-135m"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models as an OpenAI-compatible API with keys, plans, quotas and metering",
        description="Serve models over an OpenAI-compatible HTTP API. The first start creates an admin key "
        "and writes it to a file in the data directory.",
    )
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, env CUMULO_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000, env CUMULO_PORT)")
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME_OR_PATH",
        default=None,
        help=f"catalog name, .gguf file or model directory; repeat to serve several (default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--device", default="auto", help="device for the engines: auto, cpu, cuda:0, ... (default auto)"
    )
    p.add_argument("--format", default=None, help="convert weights to this number format on load")
    add_head_option(p)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the engines' kernels (default: the physical cores, or OMP_NUM_THREADS). "
        "On a small machine one fewer than the cores leaves a core to the HTTP side: faster single "
        "streams, slower large batches (docs/service.md)",
    )
    p.add_argument(
        "--engine-in-process",
        action="store_true",
        help="step the engines on a thread of the gateway's process instead of a process each (for profiling "
        "and debugging; slower at one stream, see docs/service.md)",
    )
    c = p.add_argument_group("pool (docs/cluster.md)")
    c.add_argument(
        "--cluster",
        action="store_true",
        help="serve the stored deployments from a pool of machines on Ray: start a Ray head here (or use "
        "--address) and print the 'cumulo join' line that adds a machine; --model adds a deployment",
    )
    c.add_argument("--address", default=None, help="with --cluster: an existing pool's head HOST:PORT")
    c.add_argument(
        "--ray-port", type=int, default=None, help="with --cluster: the head's port (default 6380, env "
        "CUMULO_RAY_PORT; Ray's own default 6379 is Redis's)",
    )  # fmt: skip
    c.add_argument(
        "--ray-host", default=None, help="with --cluster: the address other machines reach the head at "
        "(default: 127.0.0.1 when serving on localhost, else this machine's outgoing address)",
    )  # fmt: skip
    c.add_argument(
        "--head-cpus", type=int, default=None, help="with --cluster: CPUs the head node offers to replicas "
        "(default: all; 0 keeps replicas off the gateway's machine)",
    )  # fmt: skip
    c.add_argument(
        "--finetune-pool", action="store_true", default=None, help="with --cluster: train fine-tuning jobs on "
        "the pool's nodes instead of in the gateway's worker processes (env CUMULO_FINETUNE_POOL=1)",
    )  # fmt: skip
    p.add_argument(
        "--database-url",
        default=None,
        help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: SQLite in the data dir)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def model_refs(args: argparse.Namespace) -> list[str]:
    if args.model:
        return list(args.model)
    return _env_models() or [DEFAULT_MODEL]


def _env_models() -> list[str]:
    return [m.strip() for m in os.environ.get("CUMULO_MODELS", "").split(",") if m.strip()]


def load_engines(
    refs: list[str],
    device: str,
    format: str | None,
    threads: int | None = None,
    in_process: bool = False,
    head: str | None = None,
) -> dict[str, EngineClient]:
    """Starts one engine process per reference (pulling catalog models that are not cached yet) and waits
    until each has loaded. Each engine steps in a process of its own, so the gateway's event loop and the
    engine never wait for each other's Python (docs/service.md, "One stream"); `in_process` keeps them in this
    process instead (one process to profile or debug)."""
    from cumulo.cluster.engine_process import EngineProcess
    from cumulo.models import catalog, pull

    engines: dict[str, EngineClient] = {}
    try:
        for ref in refs:
            if not Path(ref).expanduser().exists() and ref in catalog.CATALOG and not pull.is_pulled(ref):
                print(f"Pulling {ref} ...", flush=True)
                pull.ensure(ref, progress=True)
            if in_process:
                from cumulo.engine.async_engine import build_engine

                engine = build_engine(ref, device=device, format=format, threads=threads, head=head)
            else:
                engine = EngineProcess(ref, device=device, format=format, threads=threads, head=head)
            if engine.info.name in engines:
                engine.shutdown()
                raise InvalidRequest(f"two models would be served as {engine.info.name!r}; serve each once")
            engines[engine.info.name] = engine
    except BaseException:
        shutdown_all(engines)  # the ones that did start
        raise
    return engines


def shutdown_all(engines: dict[str, EngineClient]) -> None:
    """Shuts every engine down, each whatever the others do."""
    for name, engine in engines.items():
        try:
            engine.shutdown()
        except Exception as exc:
            print(f"cumulo: could not shut down the engine of {name}: {exc}", file=sys.stderr)


class _Stop(Exception):
    """SIGTERM, turned into an exception so that the engines and the database are closed on the way out."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from cumulo.cli import console_ops, edge_fit
    from cumulo.service.app import create_app
    from cumulo.service.bootstrap import ensure_admin_key
    from cumulo.service.settings import Settings

    settings = Settings.from_env(
        host=args.host, port=args.port, database_url=args.database_url, finetune_pool=args.finetune_pool
    )
    if args.threads is not None and args.threads < 1:
        raise InvalidRequest(f"threads must be at least 1, not {args.threads}")
    # uvicorn shuts down gracefully on SIGTERM and SIGINT, then raises the signal again with the handler it
    # found: ours ends the process through the `finally` below, as Ctrl-C's KeyboardInterrupt does.
    if args.address is not None and not args.cluster:
        raise InvalidRequest("--address needs --cluster")
    if settings.finetune_pool and not args.cluster:
        raise InvalidRequest(
            "fine-tuning on the pool (--finetune-pool, CUMULO_FINETUNE_POOL) needs --cluster"
        )
    if args.cluster:
        from cumulo.cli.cluster import run_gateway

        return run_gateway(args, settings, args.model or _env_models())
    signal.signal(signal.SIGTERM, _raise_stop)
    engines: dict[str, EngineClient] = {}
    app = None
    try:
        engines = load_engines(
            model_refs(args), args.device, args.format, args.threads, args.engine_in_process, head=args.head
        )
        app = create_app(settings, engines)
        console_ops.install(app)
        edge_fit.install(app)  # POST /v1/edge/rollouts checks packages against device classes
        created = ensure_admin_key(app.state.service)
        if created is not None:
            print(f"Created the admin key; it is in {created} (readable by you only) and is not shown again.")
        names = ", ".join(f"{name} ({e.info.seal[:19]}, {e.info.device})" for name, e in engines.items())
        print(f"Serving {names} at http://{settings.host}:{settings.port}/v1", flush=True)
        print(f"Console: http://{settings.host}:{settings.port}/console/ (sign in with a key)", flush=True)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        shutdown_all(engines)
        if app is not None:
            app.state.service.db.dispose()
    return 0
