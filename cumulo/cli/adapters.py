"""`cumulo adapters list|import DIR|remove NAME`: LoRA adapters from elsewhere (a PEFT directory), kept under
`<data dir>/adapters/NAME/` where the gateway finds them: a request for model NAME runs the adapter over the
base it names (`service/finetune/serving.py`), for every organisation whose plan includes that base."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FILES = ("adapter_config.json", "adapter_model.safetensors")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="list, import (a PEFT directory) and remove LoRA adapters to serve")
    verbs = p.add_subparsers(dest="adapters_verb", metavar="VERB", required=True)
    ls = verbs.add_parser("list", help="the imported adapters")
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ls.set_defaults(func=_list)
    imp = verbs.add_parser(
        "import",
        help="copy a PEFT LoRA directory into the data directory so it can be served",
        description="Checks adapter_config.json (peft_type LORA, r, lora_alpha, target_modules Cumulo serves) and "
        "the weights, then copies them to <data dir>/adapters/NAME/. An adapter Cumulo trained records its base's "
        "seal (cumulo_adapter.json): with --base that base is checked against it. Otherwise the base named by "
        "--base (or by adapter_config.json's base_model_name_or_path) is recorded. Requests for NAME run the "
        "adapter over that base, which must be served under that name.",
    )
    imp.add_argument("directory", metavar="DIR", help="a PEFT adapter directory (peft's save_pretrained)")
    imp.add_argument("--name", help="the model name to serve it under (default: the directory's name)")
    imp.add_argument("--base", help="the served base model it runs over (default: what the adapter names)")
    imp.set_defaults(func=_import)
    rm = verbs.add_parser("remove", help="delete an imported adapter")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=_remove)


def adapters_dir() -> Path:
    from cumulo.paths import data_dir

    return data_dir() / "adapters"


def _rows() -> list[dict[str, Any]]:
    rows = []
    root = adapters_dir()
    for directory in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if directory.name.startswith("."):
            continue
        try:
            info = json.loads((directory / "cumulo_adapter.json").read_text())
            config = json.loads((directory / "adapter_config.json").read_text())
        except (OSError, ValueError):
            continue  # a leftover that is not an adapter does not hide the others
        rows.append(
            {
                "name": directory.name,
                "base": info.get("base_model"),
                "base_seal": info.get("base_seal") or None,
                "r": config.get("r"),
                "lora_alpha": config.get("lora_alpha"),
                "target_modules": config.get("target_modules"),
                "path": str(directory),
            }
        )
    return rows


def _list(args: argparse.Namespace) -> int:
    rows = _rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no adapters in {adapters_dir()}; add one with: cumulo adapters import DIR")
        return 0
    print(f"{'NAME':<28} {'BASE':<28} {'R':>3} {'ALPHA':>6}  TARGETS")
    for r in rows:
        targets = ",".join(r["target_modules"] or [])
        print(f"{r['name']:<28} {str(r['base']):<28} {r['r']:>3} {r['lora_alpha']:>6}  {targets}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from cumulo.engine.lora import read_peft
    from cumulo.errors import InvalidModel, InvalidRequest, SealMismatch

    source = Path(args.directory).expanduser()
    name = args.name or source.resolve().name
    if not NAME.fullmatch(name):
        raise InvalidRequest(
            f"adapter name {name!r}: use 1-128 of A-Za-z0-9._- (starting with a letter or digit)"
        )
    peft = read_peft(source)  # LORA, r, alpha, targets, readable weights: an InvalidModel naming the problem
    parts = {re.sub(r"\.lora_[AB](\.\w+)?\.weight$", "", k) for k in peft.tensors}
    for part in sorted(parts):
        for which in ("A", "B"):
            if not any(
                re.fullmatch(re.escape(part) + rf"\.lora_{which}(\.\w+)?\.weight", k) for k in peft.tensors
            ):
                raise InvalidModel(f"{source}: {part} has no lora_{which} weight")
    base = args.base or peft.base_model
    if not base:
        raise InvalidRequest(
            f"{source} does not name its base model; say which served model it runs over: --base"
        )
    if peft.base_seal and args.base:
        from cumulo.models.loader import load

        seal = load(args.base).seal
        if seal != peft.base_seal:
            raise SealMismatch(f"{source} was trained on base {peft.base_seal}, not {args.base} ({seal})")
    target = adapters_dir() / name
    if target.exists():
        raise InvalidRequest(f"an adapter named {name!r} is already imported; remove it first")
    tmp = adapters_dir() / f".{name}.importing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in FILES:
        shutil.copyfile(source / file, tmp / file)
    info = {
        "base_model": base,
        "base_seal": peft.base_seal or "",
        "trained_tokens": 0,
        "job_id": None,
        "rank": peft.rank,
        "alpha": peft.alpha,
    }
    (tmp / "cumulo_adapter.json").write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, target)  # whole or not at all: the gateway never sees half an adapter
    seal_note = f", base seal {peft.base_seal}" if peft.base_seal else " (no base seal recorded)"
    print(f"imported {name}: LoRA r={peft.rank} alpha={peft.alpha:g} over {base}{seal_note} -> {target}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from cumulo.errors import NotFound

    target = adapters_dir() / args.name
    if not NAME.fullmatch(args.name) or not (target / "adapter_config.json").exists():
        raise NotFound(f"no adapter named {args.name!r} in {adapters_dir()}")
    shutil.rmtree(target)
    print(f"removed {args.name}")
    return 0
