"""Options several commands share, declared once."""

from __future__ import annotations

import argparse


def add_head_option(p: argparse.ArgumentParser) -> None:
    """`--head bf16|body` beside `--format` (EngineConfig.head): the output head of a conversion on load."""
    p.add_argument(
        "--head",
        choices=("bf16", "body"),
        default=None,
        help="with --format: the output head in bf16 (the default) or in the body's format ('body': fewer bytes "
        "read per token, a little more perplexity uncalibrated; see docs/formats.md)",
    )
