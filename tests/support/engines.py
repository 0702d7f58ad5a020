"""Engine factories for tests that start engines in other processes: module-level, so they pickle by name."""

from __future__ import annotations

from cumulo.errors import InvalidModel


def refuse_to_build(**options: object) -> None:
    """A factory that refuses, as a loader does with a model it cannot serve."""
    raise InvalidModel(f"cannot build with {sorted(options)}")


def crash_while_building(**options: object) -> None:
    """A factory with a bug in it."""
    raise ZeroDivisionError("a bug in the loader")


def tiny_engine_whose_third_step_fails(**options: object):
    """A tiny engine whose third step raises, as a device error would; every later step works."""
    from tests.support.tiny import make_tiny_engine

    engine = make_tiny_engine(**options)
    step, calls = engine.step, [0]

    def flaky_step():
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("device lost")
        return step()

    engine.step = flaky_step
    return engine
