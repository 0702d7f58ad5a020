"""Builds one pipeline stage from a checkpoint, reading only the tensors that stage runs: its decoder layers,
the embedding on stage 0, the final norm and output head on the last. A stage never holds the whole model,
which is the point of splitting one too large for a device.

`build_stage(spec)` is what every stage runs in its own process (a Ray actor, `cumulo.cluster.stage`) or in
the engine's own process (`engine/pipeline_factory.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cumulo.engine.pipeline import StageWorker, stage_kv_cache
from cumulo.errors import InvalidModel
from cumulo.models import hf
from cumulo.models.config import ModelConfig
from cumulo.models.registry import ARCHITECTURES, SkipMetaInit, fuse_weights, param_dtype


@dataclass(frozen=True, slots=True)
class StageSpec:
    """Everything a stage process needs to build itself (plain values: it crosses processes)."""

    model: str  # catalog name or path, as `loader.resolve` reads it
    layers: range
    first: bool
    last: bool
    num_blocks: int  # the same for every stage: block ids are global
    block_size: int
    cache_dtype: torch.dtype
    dtype: str = "float32"  # the weights' compute dtype (EngineConfig.dtype, resolved)
    device: str = "cpu"
    threads: int | None = None


def checkpoint_dir(model: str) -> Path:
    """The model's Hugging Face directory (plain weights, or packed ones as `cumulo convert` or DeepSeek's
    block FP8 write them); InvalidModel for what a split cannot load."""
    from cumulo.models.loader import checkpoint_kind, resolve

    path, _ = resolve(model)
    if checkpoint_kind(path) != "hf":
        raise InvalidModel(
            f"{model}: a model split over pipeline stages loads from a Hugging Face safetensors directory "
            "(GGUF files are not split yet: `cumulo convert` writes one)"
        )
    return path


def stage_config(model: str) -> ModelConfig:
    path = checkpoint_dir(model)
    return hf.config_from_json(hf.read_config_json(path), path)


@dataclass(slots=True)
class ModelMeta:
    """What the driver of a split model reads instead of weights."""

    config: ModelConfig
    tokenizer: object
    name: str
    seal: str  # the same seal the unsplit loader gives the same directory


def load_meta(model: str) -> ModelMeta:
    from cumulo.models.loader import hf_config_and_tokenizer, resolve
    from cumulo.models.seal import files_seal

    path = checkpoint_dir(model)
    _, name = resolve(model)
    _, config, tokenizer = hf_config_and_tokenizer(path)
    return ModelMeta(config, tokenizer, name, files_seal(path, hf.sealed_files(path)))


def stage_tensors(config: ModelConfig, layers: range, first: bool, last: bool) -> Callable[[str], bool]:
    """Whether a checkpoint tensor name belongs to the stage running `layers` (first: embeds; last: norm, head)."""
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    if first or (last and config.tie_word_embeddings):
        prefixes += ("model.embed_tokens.",)
    if last:
        prefixes += ("model.norm.", "lm_head.")

    def wanted(name: str) -> bool:
        ours = hf.hf_name(name)
        return ours is not None and ours.startswith(prefixes)

    return wanted


def _read_stage_tensors(
    path: Path, raw_config: dict, wanted: Callable[[str], bool], dtype: torch.dtype
) -> dict:
    """This stage's tensors under our names: plain ones cast to `dtype`, packed ones (a compact-format
    checkpoint) as `PackedWeight`s, as the unsplit loader reads them."""
    from cumulo.formats.checkpoint import iter_safetensors
    from cumulo.models.loader import read_packed_weights

    if raw_config.get("quantization_config"):
        return read_packed_weights(path, dtype, wanted)[0]
    state: dict = {}
    for file in hf.weight_files(path):
        for name, tensor in iter_safetensors(file, wanted=wanted):
            state[str(hf.hf_name(name))] = tensor.to(dtype)
    return hf.unstack_experts(state)


def load_stage_model(spec: StageSpec, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The architecture's module with only this stage's tensors loaded; every other layer, and the embedding,
    norm and head where this stage does not run them, replaced by an empty `nn.Identity`.

    Packed weights stay packed (`PackedLinear`). A tied model converted with `--head body` stores its shared
    matrix only as the packed head: the first stage then reads the head too, rebuilds its embedding table from
    it as the unsplit loader does, and drops it unless it is also the last."""
    from cumulo.formats.packed import PackedWeight
    from cumulo.models.registry import swap_packed, untie_packed_head

    path = checkpoint_dir(spec.model)
    raw_config = hf.read_config_json(path)
    config = hf.config_from_json(raw_config, path)
    wanted = stage_tensors(config, spec.layers, spec.first, spec.last)
    if spec.first and config.tie_word_embeddings:  # the embedding may be stored only as a packed head
        stage_wanted = wanted
        wanted = lambda name: stage_wanted(name) or str(hf.hf_name(name)).startswith("lm_head.")  # noqa: E731
    state = fuse_weights(_read_stage_tensors(path, raw_config, wanted, dtype), consume=True)
    packed_head = isinstance(state.get("lm_head.weight"), PackedWeight)
    if spec.first:
        untie_packed_head(config, state, dtype)
    if not spec.last:
        state.pop("lm_head.weight", None)

    with torch.device("meta"), SkipMetaInit():
        model = ARCHITECTURES[config.architecture](config)
    body = model.model
    for i in range(config.num_hidden_layers):
        if i not in spec.layers:
            body.layers[i] = nn.Identity()
    tied = not packed_head and (config.tie_word_embeddings or "lm_head.weight" not in state)
    if not spec.first and not (spec.last and tied):
        body.embed_tokens = nn.Identity()
    if not spec.last:
        body.norm, model.lm_head = nn.Identity(), nn.Identity()
    elif tied:
        state.pop("lm_head.weight", None)
    swap_packed(model, state, dtype, device)  # this stage's packed linears, the packed head included
    model.config.tie_word_embeddings = tied
    expected = {n for n, p in model.named_parameters() if p.is_meta and not (tied and n == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    if missing:
        raise InvalidModel(f"checkpoint lacks {len(missing)} tensors of this stage, e.g. {missing[0]}")
    model.load_state_dict(
        {n: state.pop(n).to(device=device, dtype=param_dtype(n, dtype)) for n in expected},
        strict=False,
        assign=True,
    )
    if spec.last and tied:
        model.lm_head.weight = body.embed_tokens.weight
    for module in model.modules():  # rotary tables were built on the CPU; move them with the model
        for bname, buf in list(module.named_buffers(recurse=False)):
            setattr(module, bname, buf.to(device))
    return model.eval().requires_grad_(False)


def build_stage(spec: StageSpec) -> StageWorker:
    """Load this stage's weights, attach the platform's kernels, allocate its KV cache."""
    from cumulo.engine.factory import resolve_dtype, use_platform_kernels
    from cumulo.platform import configure_cpu_threads, get_platform

    platform = get_platform(spec.device)
    device = torch.device(platform.device)
    if device.type == "cpu":
        configure_cpu_threads(spec.threads)
    dtype = resolve_dtype(spec.dtype, platform)
    model = load_stage_model(spec, dtype, device)
    use_platform_kernels(model, platform, dtype)
    config = model.config
    cache = stage_kv_cache(config, spec.layers, spec.num_blocks, spec.block_size, spec.cache_dtype, device)
    return StageWorker(
        model,
        spec.layers,
        cache,
        device,
        first=spec.first,
        last=spec.last,
        paged_decode_attention=platform.paged_decode_attention(spec.cache_dtype, config.head_dim),
    )
