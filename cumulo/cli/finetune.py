"""`cumulo finetune`: fine-tuning jobs through the service's HTTP API (create, list, show, cancel; a progress
bar with --follow), and `cumulo finetune worker`, the process that runs them (cli/finetune_worker.py).

The client verbs speak OpenAI's API with httpx, to `--base-url` (default $CUMULO_BASE_URL, else
http://127.0.0.1:8000/v1) with `--api-key` (default $CUMULO_API_KEY, else the admin key `cumulo serve` wrote
in the data directory). `create` uploads a local file first; an id (`file-...`) is used as it is.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cumulo.errors import CumuloError, InvalidRequest

FINAL = ("succeeded", "failed", "cancelled")


def register(sub: argparse._SubParsersAction) -> None:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--base-url", default=None, help="the service's /v1 URL (default $CUMULO_BASE_URL or :8000)"
    )
    client.add_argument(
        "--api-key", default=None, help="API key (default $CUMULO_API_KEY, else the admin key)"
    )
    p = sub.add_parser("finetune", help="fine-tune models: create, list, show, cancel jobs; run the worker")
    verbs = p.add_subparsers(dest="finetune_verb", metavar="VERB")

    c = verbs.add_parser("create", parents=[client], help="upload a training file and start a job")
    c.add_argument("--model", required=True, help="the base model (as /v1/models lists it)")
    c.add_argument("--file", required=True, help="training file: a local .jsonl path or a file id")
    c.add_argument("--validation-file", default=None, help="a local .jsonl path or a file id")
    c.add_argument("--suffix", default=None, help="up to 64 characters in the fine-tuned model's name")
    c.add_argument("--n-epochs", default="auto", help="'auto' or an integer")
    c.add_argument("--batch-size", default="auto", help="'auto' or an integer")
    c.add_argument("--learning-rate-multiplier", default="auto", help="'auto' or a number")
    c.add_argument(
        "--method",
        choices=("supervised", "dpo"),
        default="supervised",
        help="supervised (chat lines) or dpo (preference lines: input, preferred_output, non_preferred_output)",
    )
    c.add_argument("--beta", default="auto", help="with --method dpo: 'auto' (0.1) or a number in (0, 2]")
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--follow", action="store_true", help="watch the job with a progress bar until it ends")
    c.set_defaults(func=create)

    verbs.add_parser("list", parents=[client], help="your organisation's jobs, newest first").set_defaults(
        func=list_jobs
    )
    s = verbs.add_parser("show", parents=[client], help="one job and its latest events")
    s.add_argument("job")
    s.add_argument("--follow", action="store_true", help="watch the job with a progress bar until it ends")
    s.set_defaults(func=show)
    k = verbs.add_parser(
        "cancel", parents=[client], help="cancel a job (a running one bills what it trained)"
    )
    k.add_argument("job")
    k.set_defaults(func=cancel)

    w = verbs.add_parser("worker", help="run fine-tuning jobs from the service database on this machine")
    w.add_argument("--once", action="store_true", help="handle the jobs waiting now, then exit")
    w.add_argument("--database-url", default=None, help="the service database (default: as `cumulo serve`)")
    w.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    w.add_argument(
        "--pool",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="train on the pool's nodes (Ray) instead of in this process; ADDRESS: the head's HOST:PORT "
        "(default: the pool `cumulo serve --cluster` runs, from the data directory)",
    )
    w.add_argument("--pool-cpus", type=int, default=1, help="with --pool: CPUs a job takes on its node")
    w.add_argument("--pool-chip", default=None, help="with --pool: only nodes of this catalog chip")
    w.set_defaults(func=worker)
    p.set_defaults(func=lambda args: p.print_help() or 2)


# -- the HTTP client -----------------------------------------------------------------------------------------
class Api:
    def __init__(self, args: argparse.Namespace, http: Any = None) -> None:
        import httpx

        self.base = (args.base_url or os.environ.get("CUMULO_BASE_URL") or "http://127.0.0.1:8000/v1").rstrip(
            "/"
        )
        key = args.api_key or os.environ.get("CUMULO_API_KEY") or _admin_key()
        if not key:
            raise InvalidRequest("no API key: pass --api-key or set CUMULO_API_KEY")
        self.http = http or httpx.Client(timeout=60.0)
        self.headers = {"Authorization": f"Bearer {key}"}

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            r = self.http.request(method, f"{self.base}{path}", headers=self.headers, **kwargs)
        except httpx.TransportError as exc:
            raise CumuloError(f"cannot reach the service at {self.base}: {exc}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text.strip()[:200]
            raise CumuloError(f"{r.status_code}: {message}")
        return r.json()

    def file_id(self, given: str) -> str:
        if given.startswith("file-") and not Path(given).exists():
            return given
        path = Path(given).expanduser()
        if not path.is_file():
            raise InvalidRequest(f"{given}: no such file (give a .jsonl path or a file id)")
        with open(path, "rb") as f:
            uploaded = self.call(
                "POST", "/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"}
            )
        print(f"Uploaded {path.name} as {uploaded['id']} ({uploaded['bytes']} bytes)")
        return uploaded["id"]


def _admin_key() -> str | None:
    from cumulo.paths import data_dir

    path = data_dir() / "admin_key"
    return path.read_text().strip() if path.exists() else None


def _number(name: str, value: str) -> str | int | float:
    if value == "auto":
        return value
    try:
        return float(value) if name in ("learning_rate_multiplier", "beta") else int(value)
    except ValueError:
        raise InvalidRequest(
            f"--{name.replace('_', '-')} must be 'auto' or a number, got {value!r}"
        ) from None


def create(args: argparse.Namespace, http: Any = None) -> int:
    api = Api(args, http)
    method = getattr(args, "method", "supervised")
    names = ("n_epochs", "batch_size", "learning_rate_multiplier") + (("beta",) if method == "dpo" else ())
    if method != "dpo" and getattr(args, "beta", "auto") != "auto":
        raise InvalidRequest("--beta is a DPO hyperparameter; add --method dpo")
    hyper = {name: _number(name, getattr(args, name)) for name in names}
    body: dict[str, Any] = {
        "model": args.model,
        "training_file": api.file_id(args.file),
        "method": {"type": method, method: {"hyperparameters": hyper}},
    }
    if args.validation_file:
        body["validation_file"] = api.file_id(args.validation_file)
    if args.suffix:
        body["suffix"] = args.suffix
    if args.seed is not None:
        body["seed"] = args.seed
    job = api.call("POST", "/fine_tuning/jobs", json=body)
    print(f"Created {job['id']} ({job['status']})")
    return follow(api, job["id"]) if args.follow else 0


def list_jobs(args: argparse.Namespace, http: Any = None) -> int:
    from rich.console import Console
    from rich.table import Table

    page = Api(args, http).call("GET", "/fine_tuning/jobs", params={"limit": 100})
    table = Table("id", "model", "status", "trained tokens", "fine-tuned model", "created")
    for job in page["data"]:
        table.add_row(
            job["id"],
            job["model"],
            job["status"],
            str(job["trained_tokens"] or ""),
            job["fine_tuned_model"] or "",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"])),
        )
    Console(width=200).print(table)
    return 0


def show(args: argparse.Namespace, http: Any = None) -> int:
    api = Api(args, http)
    if args.follow:
        return follow(api, args.job)
    job = api.call("GET", f"/fine_tuning/jobs/{args.job}")
    _describe(job)
    events = api.call("GET", f"/fine_tuning/jobs/{args.job}/events", params={"limit": 10})["data"]
    for event in reversed(events):
        print(f"  {time.strftime('%H:%M:%S', time.localtime(event['created_at']))} {event['message']}")
    return 0 if job["status"] != "failed" else 1


def cancel(args: argparse.Namespace, http: Any = None) -> int:
    job = Api(args, http).call("POST", f"/fine_tuning/jobs/{args.job}/cancel")
    print(f"{job['id']}: {job['status']}")
    return 0


def _describe(job: dict[str, Any]) -> None:
    print(f"{job['id']}  {job['status']}  model {job['model']}")
    if job.get("fine_tuned_model"):
        print(f"fine-tuned model: {job['fine_tuned_model']}")
    if job.get("trained_tokens") is not None:
        print(f"trained tokens: {job['trained_tokens']}")
    if job.get("error"):
        print(f"error: {job['error']['message']}")


def follow(api: Api, job_id: str, poll_seconds: float = 1.0) -> int:
    """Prints each new message event and moves a bar with the steps until the job ends. Exit status 0 when it
    succeeded, 1 otherwise."""
    from tqdm import tqdm

    seen: set[str] = set()
    bar = None
    try:
        while True:
            events = api.call("GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": 100})["data"]
            for event in reversed(events):
                if event["id"] in seen:
                    continue
                seen.add(event["id"])
                data = event.get("data") or {}
                if event["type"] == "metrics" and "total_steps" in data:
                    if bar is None:
                        bar = tqdm(total=data["total_steps"], desc=job_id, unit="step", file=sys.stdout)
                    bar.n = data["step"]
                    if "train_loss" in data:
                        bar.set_postfix(loss=f"{data['train_loss']:.4f}", refresh=False)
                    bar.refresh()
                else:
                    (bar.write if bar else print)(event["message"])
            job = api.call("GET", f"/fine_tuning/jobs/{job_id}")
            if job["status"] in FINAL:
                break
            time.sleep(poll_seconds)
    finally:
        if bar is not None:
            bar.close()
    _describe(job)
    return 0 if job["status"] == "succeeded" else 1


# -- the worker ----------------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    from cumulo.cli.database import service_sessions
    from cumulo.cli.finetune_worker import Worker
    from cumulo.service.settings import Settings

    settings = Settings.from_env(database_url=args.database_url)
    options = {}
    if args.pool is not None:  # before the signal handlers below: connecting installs Ray's own
        from cumulo.cluster.finetune_runner import PoolTrainer
        from cumulo.cluster.ray_cluster import connect, find_address

        if args.pool_cpus < 1:
            raise InvalidRequest(f"--pool-cpus must be at least 1, not {args.pool_cpus}")
        connect(find_address(args.pool or None, settings.data_dir))
        options["train"] = PoolTrainer(num_cpus=args.pool_cpus, chip=args.pool_chip)
    with service_sessions(args) as sessions:
        runner = Worker(sessions, settings, parent_pid=args.parent_pid, **options)

        def stop(signum: int, frame: object) -> None:
            runner.stopping.set()  # the job under way goes back to the queue at its next step

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        handled = runner.run(once=args.once)
    if args.once:
        print(f"Handled {handled} jobs (a validation or a training each)")
    return 0
