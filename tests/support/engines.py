"""Engine factories for tests that start engines in other processes: module-level, so they pickle by name."""

from __future__ import annotations

from cumulo.errors import InvalidModel


def refuse_to_build(**options: object) -> None:
    """A factory that refuses, as a loader does with a model it cannot serve."""
    raise InvalidModel(f"cannot build with {sorted(options)}")


def crash_while_building(**options: object) -> None:
    """A factory with a bug in it."""
    raise ZeroDivisionError("a bug in the loader")
