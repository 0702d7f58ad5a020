"""Builds an `LLMEngine` from a model name or path: pick the platform, build the model for use
(`build_for_use`: load, optionally convert to a compact number format, cast, attach the platform's kernels;
the one way every command gets a runnable model), size the KV cache (`kv_sizing.plan_kv_cache`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cumulo.engine.kv_sizing import plan_kv_cache
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.errors import InvalidRequest
from cumulo.platform import Platform, configure_cpu_threads, get_platform

if TYPE_CHECKING:
    from cumulo.models.loader import LoadedModel

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str, platform: Platform) -> torch.dtype:
    if name == "auto":
        # bf16 halves the bytes per weight; it is the fast path wherever matmuls run natively in bf16
        # (accelerators; CPUs with AVX512-BF16 or AMX). Elsewhere bf16 is emulated and fp32 is faster.
        return platform.pick_dtype(torch.bfloat16)
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidRequest(f"unknown dtype '{name}' (choose from auto, {', '.join(_DTYPES)})") from None


def use_platform_kernels(module: torch.nn.Module, platform: Platform, dtype: torch.dtype) -> None:
    """Put the platform's kernels into `module` in place: decode-sized matmuls of its dense weights, and the
    one-call kernels for the small operators around them (each stays torch's where the platform has none)."""
    from cumulo.models.layers import Attention, RMSNorm

    dense = platform.dense_linear(dtype)
    if dense is not None:
        from cumulo.formats.linear import use_dense_kernel

        use_dense_kernel(module, dense)
    norm, rope = platform.rms_norm(dtype), platform.rope_and_cache(dtype)
    for sub in module.modules():
        if isinstance(sub, RMSNorm) and norm is not None:
            sub.kernel = norm
        elif isinstance(sub, Attention) and rope is not None:
            sub.rope_cache = rope


def build_for_use(
    model: str,
    platform: Platform,
    dtype: torch.dtype,
    format: str | None = None,
    threads: int | None = None,
    head: str | None = None,
) -> tuple[torch.nn.Module, LoadedModel]:
    """The model `model` ready to run on `platform` in `dtype`, and what the loader read (config, tokenizer,
    name, seal). Serving, generation, chat and evaluation all build their models here, so they run the same
    weights: loaded; with `format`, its linears quantized from fp32 weights (not from an already rounded
    16-bit copy) and what stays dense then cast to `dtype`; the platform's kernels attached. `head` ("bf16" or
    "body", with `format` only): the output head kept in 16 bits or packed like the body (default: the
    format's, `cumulo.formats.linear.default_head`), as `cumulo convert --head` writes it. `threads`: the
    CPU's kernel threads (default: the physical cores)."""
    from cumulo.models.loader import load
    from cumulo.models.registry import build_model, param_dtype, release_freed_heap

    device = torch.device(platform.device)
    if device.type == "cpu":
        configure_cpu_threads(threads)
    if head is not None and not format:
        raise InvalidRequest(
            "--head applies to a conversion: give --format too (a stored model keeps its head)"
        )
    if format:
        from cumulo.formats.linear import QuantPolicy, default_head, quantize_model
        from cumulo.formats.schemes import get_scheme

        get_scheme(format)  # an unknown name fails here, before the slow load
        policy = QuantPolicy.from_patterns(head=head or default_head(format))  # a bad head fails here too
        loaded = load(model, dtype=torch.float32)
        module = build_model(loaded.config, loaded.weights, dtype=torch.float32, device=device, consume=True)
        loaded.weights.clear()
        quantize_model(module, format, policy)
        for name, param in module.named_parameters():
            param.data = param.data.to(param_dtype(name, dtype))
        release_freed_heap()  # the fp32 copies just freed would otherwise stay resident in the C heap
    else:
        loaded = load(model, dtype=dtype)
        module = build_model(loaded.config, loaded.weights, dtype=dtype, device=device, consume=True)
        loaded.weights.clear()  # the module owns the tensors now; drop the loader's references
    use_platform_kernels(module, platform, dtype)
    return module, loaded


def create_engine(model: str, config: EngineConfig | None = None) -> LLMEngine:
    config = config or EngineConfig()
    if config.pipeline_stages > 1:  # layers split over stages, each loading only its own tensors
        from cumulo.engine.pipeline_factory import create_split_engine

        return create_split_engine(model, config)
    platform = get_platform(config.device)
    dtype = resolve_dtype(config.dtype, platform)
    module, loaded = build_for_use(model, platform, dtype, config.format, config.threads, config.head)
    plan = plan_kv_cache(loaded.config, dtype, config, platform)
    return LLMEngine(
        module,
        loaded.tokenizer,
        config,
        plan,
        device=torch.device(platform.device),
        name=loaded.name,
        seal=loaded.seal,
        paged_decode_attention=platform.paged_decode_attention(plan.dtype, loaded.config.head_dim),
        graph_recorder=platform.graph_recorder(plan.dtype) if config.decode_graphs else None,
    )
