"""`cumulo admin`: manage plans (with their fine-tuning terms), organisations, API keys and read usage, straight on
the service database.

Uses the same database and data directory as `cumulo serve` (`--database-url`, `CUMULO_DATABASE_URL`, or the
SQLite file in the data directory). `key create` prints the new key as its last line, and only there.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from cumulo.errors import InvalidRequest


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        help="SQLAlchemy URL of the service database (default: as `cumulo serve`)",
    )
    admin = sub.add_parser(
        "admin",
        help="manage plans, organisations, API keys; read usage",
        description="Manage the service's plans, organisations and API keys.",
    )
    groups = admin.add_subparsers(dest="admin_group", metavar="GROUP")

    plan = groups.add_parser("plan", help="subscription plans").add_subparsers(
        dest="admin_verb", metavar="VERB"
    )
    training = argparse.ArgumentParser(add_help=False)
    terms = training.add_argument_group(
        "fine-tuning terms",
        "What the plan's keys may train (`cumulo finetune`, /v1/fine_tuning). A plan without terms has "
        "priority 0, no caps and free training. A cap given as 'none' is lifted.",
    )
    terms.add_argument(
        "--finetune-priority",
        default=None,
        metavar="N",
        help="queue priority of the plan's jobs, 0 or more: a higher one is trained first (default 0)",
    )
    terms.add_argument(
        "--finetune-max-jobs",
        default=None,
        metavar="N|none",
        help="jobs of one key training at once, 1 or more; later ones wait queued (default none: no cap)",
    )
    terms.add_argument(
        "--monthly-training-tokens",
        default=None,
        metavar="N|none",
        help="training tokens per key and calendar month (UTC); a job is refused when they are used up; "
        "0 means the plan may not fine-tune (default none: no quota)",
    )
    terms.add_argument(
        "--price-training",
        default=None,
        metavar="USD",
        help="USD per million training tokens, billed in the usage ledger as jobs train (default 0)",
    )
    create = plan.add_parser("create", parents=[common, training], help="add a plan")
    create.add_argument("name")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute per key")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute per key")
    create.add_argument("--concurrency", type=int, default=None, help="concurrent requests per key")
    create.add_argument("--monthly-tokens", type=int, default=None, help="token quota per key and month")
    create.add_argument(
        "--models", default=None, help="comma-separated models the plan may use (default: all)"
    )
    create.add_argument("--price-in", type=float, default=0.0, help="USD per million input tokens")
    create.add_argument("--price-out", type=float, default=0.0, help="USD per million output tokens")
    create.add_argument(
        "--model-price",
        action="append",
        default=None,
        metavar="MODEL=IN,OUT",
        help="price of one model in USD per million input,output tokens (repeatable)",
    )
    create.add_argument("--explicit-label", action="store_true", help="append a visible AI-content notice")
    create.set_defaults(func=plan_create)
    plan.add_parser("list", parents=[common], help="list plans").set_defaults(func=plan_list)
    finetune = plan.add_parser(
        "finetune",
        parents=[common, training],
        help="show or change a plan's fine-tuning terms",
        description="Show a plan's fine-tuning terms, after changing those given (the others keep "
        "their values).",
    )
    finetune.add_argument("name", help="the plan")
    finetune.set_defaults(func=plan_finetune)

    key = groups.add_parser("key", help="API keys").add_subparsers(dest="admin_verb", metavar="VERB")
    kc = key.add_parser("create", parents=[common], help="create a key (and its organisation if needed)")
    kc.add_argument("--org", required=True, help="organisation name (created when missing)")
    kc.add_argument("--plan", default="default", help="plan of the key (default: default)")
    kc.add_argument("--name", default="", help="a note to recognise the key by")
    kc.add_argument("--user", default=None, help="e-mail of the user the key belongs to")
    kc.add_argument(
        "--expires-days", type=float, default=None, help="the key stops working after this many days"
    )
    kc.add_argument("--admin", action="store_true", help="the key may use the /admin API")
    kc.set_defaults(func=key_create)
    kl = key.add_parser("list", parents=[common], help="list keys (never their secrets)")
    kl.add_argument("--org", default=None)
    kl.set_defaults(func=key_list)
    kr = key.add_parser("revoke", parents=[common], help="revoke a key by id")
    kr.add_argument("id", type=int)
    kr.set_defaults(func=key_revoke)

    org = groups.add_parser("org", help="organisations").add_subparsers(dest="admin_verb", metavar="VERB")
    org.add_parser("list", parents=[common], help="list organisations").set_defaults(func=org_list)

    usage = groups.add_parser("usage", parents=[common], help="usage totals and the newest records")
    usage.add_argument("--org", default=None)
    usage.add_argument("--since", default=None, help="ISO date/time (UTC) or epoch seconds")
    usage.add_argument("--limit", type=int, default=20, help="records to list (default 20)")
    usage.set_defaults(func=usage_show)


@contextmanager
def _db(args: argparse.Namespace) -> Iterator[tuple[Any, Any]]:
    """(session factory, key hasher) on the migrated service database."""
    from cumulo.cli.database import service_sessions
    from cumulo.service.security import KeyHasher, load_or_create_secret
    from cumulo.service.settings import Settings

    settings = Settings.from_env(database_url=getattr(args, "database_url", None))
    with service_sessions(args) as sessions:
        yield sessions, KeyHasher(load_or_create_secret(settings.data_dir))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _when(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _model_prices(items: list[str] | None) -> dict[str, list[float]] | None:
    if not items:
        return None
    prices: dict[str, list[float]] = {}
    for item in items:
        model, _, pair = item.rpartition("=")
        try:
            price_in, price_out = (float(x) for x in pair.split(","))
        except ValueError:
            raise InvalidRequest(
                f"--model-price {item!r}: expected MODEL=IN,OUT, e.g. smollm2-135m=0.1,0.4"
            ) from None
        if not model or price_in < 0 or price_out < 0:
            raise InvalidRequest(f"--model-price {item!r}: expected MODEL=IN,OUT with prices >= 0")
        prices[model] = [price_in, price_out]
    return prices


def _whole_or_none(flag: str, text: str, none: bool = True) -> int | None:
    if none and text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidRequest(
            f"{flag} {text!r}: expected a whole number{' or none' if none else ''}"
        ) from None


FLAGS = {
    "priority": "--finetune-priority",
    "max_jobs": "--finetune-max-jobs",
    "monthly_training_tokens": "--monthly-training-tokens",
    "price_training": "--price-training",
}


def _training_terms(args: argparse.Namespace) -> dict[str, Any]:
    """The fine-tuning terms given on the command line, by their names in `finetune_plans`."""
    given: dict[str, Any] = {}
    for name, flag in FLAGS.items():
        text = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if text is None:
            continue
        if name == "price_training":
            try:
                given[name] = float(text)
            except ValueError:
                raise InvalidRequest(f"{flag} {text!r}: expected a number of USD") from None
        else:
            given[name] = _whole_or_none(flag, text, none=name != "priority")
    return given


TERMS_HEADERS = ["ft priority", "ft max jobs", "ft tokens/month", "usd/M train"]


def _terms_cells(row: Any) -> list[object]:
    return [
        row.priority,
        "none" if row.max_jobs is None else row.max_jobs,
        "none" if row.monthly_training_tokens is None else row.monthly_training_tokens,
        row.price_training,
    ]


def plan_create(args: argparse.Namespace) -> int:
    from cumulo.service import crud
    from cumulo.service.finetune import terms

    training = _training_terms(args)

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    with _db(args) as (sessions, _), sessions() as session, session.begin():
        plan = crud.create_plan(
            session,
            args.name,
            rpm=args.rpm,
            tpm=args.tpm,
            concurrency=args.concurrency,
            monthly_tokens=args.monthly_tokens,
            models=models,
            price_in=args.price_in,
            price_out=args.price_out,
            model_prices=_model_prices(args.model_price),
            explicit_label=args.explicit_label,
        )
        if training:
            terms.set_terms(session, plan.id, labels=FLAGS, **training)
        print(f"Created plan {plan.name!r} (id {plan.id}).")
    return 0


def plan_finetune(args: argparse.Namespace) -> int:
    from cumulo.service import crud
    from cumulo.service.finetune import terms

    training = _training_terms(args)
    with _db(args) as (sessions, _), sessions() as session, session.begin():
        plan = crud.get_plan(session, args.name)
        row = (
            terms.set_terms(session, plan.id, labels=FLAGS, **training)
            if training
            else terms.of_plan(session, plan.id)
        )
        cells = [plan.name, *_terms_cells(row)]
    _table(["plan", *TERMS_HEADERS], [cells])
    return 0


def plan_list(args: argparse.Namespace) -> int:
    from cumulo.service import crud
    from cumulo.service.finetune import terms

    with _db(args) as (sessions, _), sessions() as session:
        stored = terms.all_plans(session)
        rows = [
            (
                p.name,
                p.rpm,
                p.tpm,
                p.concurrency,
                p.monthly_tokens,
                ",".join(p.models) if p.models else "all",
                p.price_in,
                p.price_out,
                "yes" if p.explicit_label else "no",
                *_terms_cells(stored.get(p.id) or terms.of_plan(session, p.id)),
            )
            for p in crud.list_plans(session)
        ]
    _table(
        [
            "plan",
            "rpm",
            "tpm",
            "concurrency",
            "monthly_tokens",
            "models",
            "usd/M in",
            "usd/M out",
            "visible label",
            *TERMS_HEADERS,
        ],
        rows,
    )
    return 0


def key_create(args: argparse.Namespace) -> int:
    from cumulo.service import crud

    if args.expires_days is not None and args.expires_days <= 0:
        raise InvalidRequest("--expires-days must be positive")
    expires = time.time() + args.expires_days * 86400 if args.expires_days is not None else None
    with _db(args) as (sessions, hasher), sessions() as session, session.begin():
        row, secret = crud.create_key(
            session,
            hasher,
            org_name=args.org,
            plan_name=args.plan,
            name=args.name,
            user_email=args.user,
            expires_at=expires,
            is_admin=args.admin,
        )
        print(
            f"Created key {row.id} for organisation {args.org!r} on plan {args.plan!r}"
            f"{'; expires ' + str(_when(expires)) + ' UTC' if expires else ''}."
        )
        print("Store it now; it is shown only this once:")
        print(secret)
    return 0


def key_list(args: argparse.Namespace) -> int:
    from cumulo.service import crud

    with _db(args) as (sessions, _), sessions() as session:
        rows = [
            (
                k.id,
                k.prefix + "...",
                org,
                plan,
                k.name,
                "yes" if k.is_admin else "",
                _when(k.created_at),
                _when(k.expires_at),
                _when(k.revoked_at),
                k.month_tokens,
            )
            for k, org, plan in crud.list_keys(session, args.org)
        ]
    _table(
        ["id", "key", "org", "plan", "name", "admin", "created", "expires", "revoked", "month_tokens"], rows
    )
    return 0


def key_revoke(args: argparse.Namespace) -> int:
    from cumulo.service import crud

    with _db(args) as (sessions, _), sessions() as session, session.begin():
        crud.revoke_key(session, args.id)
    print(f"Revoked key {args.id}.")
    return 0


def org_list(args: argparse.Namespace) -> int:
    from cumulo.service import crud

    with _db(args) as (sessions, _), sessions() as session:
        rows = [(o.id, o.name, _when(o.created_at)) for o in crud.list_orgs(session)]
    _table(["id", "org", "created"], rows)
    return 0


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidRequest(f"--since {text!r} is neither epoch seconds nor an ISO date") from exc
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def usage_show(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from cumulo.errors import NotFound
    from cumulo.service import crud
    from cumulo.service.db import Organization

    with _db(args) as (sessions, _), sessions() as session:
        org_id = None
        if args.org:
            org_id = session.scalar(select(Organization.id).where(Organization.name == args.org))
            if org_id is None:
                raise NotFound(f"no organisation named {args.org!r}")
        rows, _more, totals = crud.usage_page(
            session, org_id=org_id, start_time=_since(args.since), limit=max(1, args.limit)
        )
    print(
        f"requests {totals.requests}  prompt_tokens {totals.prompt_tokens}  "
        f"completion_tokens {totals.completion_tokens}  cost_usd {totals.cost_nanos / 1e9:.6f}"
    )
    _table(
        ["id", "time", "org_id", "key_id", "model", "status", "prompt", "completion", "cost_usd", "ttft_s"],
        [
            (
                r.id,
                _when(r.started_at),
                r.org_id,
                r.key_id,
                r.model,
                r.status,
                r.prompt_tokens,
                r.completion_tokens,
                f"{r.cost_nanos / 1e9:.6f}",
                None if r.ttft is None else f"{r.ttft:.3f}",
            )
            for r in rows
        ],
    )
    return 0
