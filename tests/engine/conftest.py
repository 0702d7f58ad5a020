"""The engine tests' fixture: `make_engine(...)` builds an `LLMEngine` over a tiny random model."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cumulo.engine.llm_engine import LLMEngine
from tests.support.tiny import make_tiny_engine


@pytest.fixture
def make_engine() -> Callable[..., LLMEngine]:
    return make_tiny_engine
