"""One entry point from a model reference to (config, weights, tokenizer, seal).

A reference is a catalog name (resolved in the local cache: `cumulo pull NAME` fetches it), a path to a
.gguf file, or a Hugging Face-style directory. Weights come back as float tensors under Hugging Face names, so
the architectures never see where a checkpoint came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cumulo.errors import InvalidModel, ModelNotFound
from cumulo.models import catalog, hf, pull
from cumulo.models.config import ModelConfig
from cumulo.models.seal import file_seal, files_seal
from cumulo.models.tokenizer import Tokenizer
from cumulo.paths import models_dir

GGUF_MAGIC = b"GGUF"


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    # Hugging Face names (model.embed_tokens.weight, model.layers.0...); compact-format checkpoints hold
    # cumulo.formats.PackedWeight values for their quantized linears.
    weights: dict[str, Any]
    tokenizer: Tokenizer
    seal: str  # "sha256:<hex>" over weights, config and tokenizer files
    source: Path  # the .gguf file or the model directory
    name: str  # catalog name, or the file/directory name
    format: str  # "gguf:Q4_1", "safetensors:bfloat16"


def resolve(model: str | Path) -> tuple[Path, str]:
    """(path, display name) for a model reference; ModelNotFound when it names nothing loadable."""
    text = str(model)
    if text in catalog.CATALOG:
        if not pull.is_pulled(text):
            raise ModelNotFound(f"model {text!r} is not in the local cache; run `cumulo pull {text}` first")
        return pull.local_path(text), text
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve(), path.name
    if "/" not in text and text not in (".", "..") and (models_dir() / text).is_dir():
        return models_dir() / text, text  # a model someone placed in the cache by hand
    known = ", ".join(sorted(catalog.CATALOG))
    raise ModelNotFound(f"model {text!r} is neither a catalog name ({known}) nor an existing path")


def ensure(name: str, progress: bool = True) -> Path:
    """Pull catalog model `name` when missing; returns its cached file."""
    return pull.ensure(name, progress=progress)


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def checkpoint_kind(path: Path) -> str:
    """ "gguf", "gguf-dir" (a directory holding one GGUF) or "hf" for a model path; InvalidModel otherwise."""
    if _is_gguf(path):
        return "gguf"
    if hf.is_model_dir(path):
        return "hf"
    if path.is_dir():
        gguf_files = sorted(path.glob("*.gguf"))
        if len(gguf_files) == 1:  # a cache directory holding one GGUF
            return "gguf-dir"
        raise InvalidModel(f"{path}: a directory without config.json is not a model")
    raise InvalidModel(f"{path}: not a model file (expected a GGUF file or a Hugging Face-style directory)")


def _gguf_file(path: Path, kind: str) -> Path:
    return sorted(path.glob("*.gguf"))[0] if kind == "gguf-dir" else path


def load_config(model: str | Path) -> ModelConfig:
    """The model's config without reading its weights."""
    path, name = resolve(model)
    kind = checkpoint_kind(path)
    if kind == "hf":
        config = hf.config_from_json(hf.read_config_json(path), path)
    else:
        from cumulo.models.gguf import read_gguf

        config = read_gguf(_gguf_file(path, kind), weights=False).config
    return config


def load(model: str | Path, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Read a model's config, weights (as `dtype`) and tokenizer, and seal them."""
    path, name = resolve(model)
    kind = checkpoint_kind(path)
    if kind == "hf":
        return _load_hf(path, name, dtype)
    return _load_gguf(_gguf_file(path, kind), name, dtype)


def _load_gguf(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    from cumulo.models.chat import DEFAULT_TEMPLATES
    from cumulo.models.gguf import read_gguf
    from cumulo.models.tokenizer import from_gguf_metadata

    contents = read_gguf(path, weights=True, dtype=dtype)
    config = contents.config
    tokenizer = from_gguf_metadata(contents.metadata)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_TEMPLATES.get(config.architecture)
    config.eos_token_ids = sorted(set(config.eos_token_ids) | tokenizer.eos_token_ids)
    assert contents.weights is not None
    return LoadedModel(config, contents.weights, tokenizer, file_seal(path), path, name, contents.format)


def hf_config_and_tokenizer(path: Path) -> tuple[dict, ModelConfig, Tokenizer]:
    """A Hugging Face directory's raw config.json, its ModelConfig and its tokenizer, the config's end and
    start tokens completed from the tokenizer's."""
    from cumulo.models.tokenizer import from_directory

    raw = hf.read_config_json(path)
    config = hf.config_from_json(raw, path)
    tokenizer = from_directory(path, raw)
    config.eos_token_ids = sorted(set(config.eos_token_ids) | tokenizer.eos_token_ids)
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    return raw, config, tokenizer


def read_packed_weights(
    path: Path, dtype: torch.dtype, wanted: Callable[[str], bool] | None = None
) -> tuple[dict[str, Any], str]:
    """A compact-format checkpoint's tensors (cumulo convert, or DeepSeek's block FP8) under our names, each
    `wanted` one (all when None): packed weights stay packed, plain float tensors are cast to `dtype`; and the
    format name."""
    from cumulo.formats.checkpoint import load_packed_state_dict

    packed, quant_format = load_packed_state_dict(path, wanted=wanted)
    weights = {}
    for tensor_name in list(packed):
        t = packed.pop(tensor_name)  # popped, so a cast frees the stored copy as it goes
        if (hf_name := hf.hf_name(tensor_name)) is not None:
            weights[hf_name] = t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    return weights, quant_format


def _load_hf(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    raw, config, tokenizer = hf_config_and_tokenizer(path)
    if raw.get("quantization_config"):
        weights, quant_format = read_packed_weights(path, dtype)
        fmt = "safetensors:" + quant_format
    else:
        weights = hf.read_weights(path, dtype)
        fmt = "safetensors:" + hf.stored_dtype(path)
    return LoadedModel(config, weights, tokenizer, files_seal(path, hf.sealed_files(path)), path, name, fmt)
