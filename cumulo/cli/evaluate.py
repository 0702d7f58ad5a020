"""`cumulo` verbs of this group (placeholder until its layer lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    return None
