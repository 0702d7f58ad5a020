"""Entry point of the `cumulo` command.

Each verb group lives in its own module under `cumulo.cli` with a `register(subparsers)` function that adds its
parsers and sets `func`. Heavy imports (torch, FastAPI) happen inside the handlers so `--help` stays fast.
Errors a user can cause are `CumuloError`s: printed as one line, exit status 1. Never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cumulo import __version__
from cumulo.errors import CumuloError

# Order here is the order in `cumulo --help`.
VERB_MODULES = [
    "generate",
    "models",
    "serve",
    "deploy",
    "cluster",
    "admin",
    "edge",
    "finetune",
    "adapters",
    "convert",
    "evaluate",
    "chips",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cumulo",
        description="Cumulo: serve models fast on the chips you have, as an OpenAI-compatible AI cloud.",
        epilog="Run 'cumulo VERB --help' for the options of one verb. Data lives in --data-dir, "
        "$CUMULO_DATA_DIR or ~/.local/share/cumulo.",
    )
    parser.add_argument("--version", action="version", version=f"cumulo {__version__}")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="where models, the database and keys live (default: $CUMULO_DATA_DIR or ~/.local/share/cumulo)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(f"cumulo.cli.{name}").register(sub)
    return parser


def _add_data_dir_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let `--data-dir` also follow the verb (`cumulo admin key create ... --data-dir D`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any("--data-dir" in a.option_strings for a in child._actions):
                    child.add_argument(
                        "--data-dir", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS
                    )
                _add_data_dir_everywhere(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _add_data_dir_everywhere(parser)
    args = parser.parse_args(argv)
    if args.data_dir:
        from cumulo.paths import set_data_dir

        set_data_dir(args.data_dir)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CumuloError as exc:
        print(f"cumulo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cumulo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `cumulo ... | head`: the reader left; stay quiet like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
