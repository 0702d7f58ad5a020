"""Architecture registry: picks the module class for a `ModelConfig` and loads Hugging Face-named weights into
it, fusing q/k/v and gate/up projections on the way.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cumulo.errors import InvalidModel, UnsupportedArchitecture
from cumulo.models.config import ModelConfig
from cumulo.models.deepseek import DeepseekV3ForCausalLM
from cumulo.models.gemma3 import Gemma3ForCausalLM
from cumulo.models.llama import LlamaForCausalLM
from cumulo.models.qwen3_moe import Qwen3MoeForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "deepseek_v3": DeepseekV3ForCausalLM,
}

# fused module -> its parts, siblings under one parent module: self_attn's q/k/v; the gate/up pair of any gated
# MLP, wherever it sits (mlp, mlp.experts.{e}, mlp.shared_experts)
_FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def _concat(tensors: list[Any]) -> Any:
    if all(isinstance(t, torch.Tensor) for t in tensors):
        return torch.cat(tensors, dim=0)
    from cumulo.formats.packed import PackedWeight, concat_rows

    if all(isinstance(t, PackedWeight) for t in tensors):
        return concat_rows(tensors)  # exact: codes and block scales are stacked, nothing is requantized
    raise InvalidModel("a checkpoint mixes packed and plain weights within one fused projection")


def fuse_weights(weights: dict[str, Any], *, consume: bool = False) -> dict[str, Any]:
    """HF names -> our module names (q/k/v -> qkv_proj, gate/up -> gate_up_proj, for every gated MLP: a dense
    layer's, each expert's, a shared expert's). The input is not modified,
    unless `consume`: then the parts are popped from `weights` itself (which is returned), so each part is freed
    as soon as it is joined instead of every part and every joined copy being held at once."""
    out = weights if consume else dict(weights)
    for name in list(weights):
        module, _, kind = name.rpartition(".")  # kind: weight | bias
        parent, _, child = module.rpartition(".")
        if kind not in ("weight", "bias"):
            continue
        for fused, parts in _FUSED.items():
            if child != parts[0]:
                continue
            names = [f"{parent}.{p}.{kind}" for p in parts]
            if all(n in out for n in names):
                out[f"{parent}.{fused}.{kind}"] = _concat([out.pop(n) for n in names])
    return out


# Parameters kept in float32 whatever the model computes in: DeepSeek-V3's expert-selection bias (its reference
# holds it in fp32: close biases rounded to 16 bits can tie or swap, changing which experts are picked).
FP32_PARAMS = ("e_score_correction_bias",)


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter `name` is held in for a model computing in `dtype`."""
    return torch.float32 if name.endswith(FP32_PARAMS) else dtype


def untie_packed_head(config: ModelConfig, state: dict[str, Any], dtype: torch.dtype) -> bool:
    """Whether the output head is packed (`cumulo convert --head`). A tied model's checkpoint then stores the
    shared matrix once, as the packed `lm_head.weight`, and no embedding: the embedding table is made here from
    the head's dequantized rows (exact in bf16 for the power-of-two-scaled formats), so the head reads its
    compact bytes every step while the lookup keeps a plain table that decode graphs can record."""
    from cumulo.formats.packed import PackedWeight

    head = state.get("lm_head.weight")
    if not isinstance(head, PackedWeight):
        return False
    embed = "model.embed_tokens.weight"
    if embed not in state:
        if not config.tie_word_embeddings:
            raise InvalidModel("checkpoint lacks model.embed_tokens.weight and its head is not tied")
        state[embed] = head.dequantize(torch.float32).to(param_dtype(embed, dtype))
    return True


def swap_packed(
    model: nn.Module, state: dict[str, Any], dtype: torch.dtype, device: torch.device | str
) -> None:
    """Replace each linear whose checkpoint weight is packed by a PackedLinear holding it (no dense copy)."""
    from cumulo.formats.linear import PackedLinear
    from cumulo.formats.packed import PackedWeight

    for name in [n for n, t in state.items() if isinstance(t, PackedWeight)]:
        module_name = name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
        except AttributeError:
            # Not part of the served model: DeepSeek-V3's multi-token-prediction layer (model.layers.61.*) is
            # stored in FP8 beside the 61 decoder layers. Dropped, as plain tensors the model lacks are.
            state.pop(name)
            continue
        packed = state.pop(name)
        if tuple(packed.shape) != (old.out_features, old.in_features):
            raise InvalidModel(
                f"tensor {name} has shape {tuple(packed.shape)}, expected {tuple(old.weight.shape)}"
            )
        bias = state.pop(f"{module_name}.bias", None)
        bias = bias.to(device=device, dtype=dtype) if bias is not None else None
        setattr(parent, child, PackedLinear(packed, bias).to(device))


class SkipMetaInit(TorchFunctionMode):
    """Skips the initialisers module constructors run (nn.init.*, Tensor.normal_ / uniform_ ...) on meta tensors.

    A meta tensor holds no values, so they do nothing; but meta `normal_` (nn.Embedding's init) has no C++ meta
    kernel, and its Python fallback imports torch's decompositions with sympy, torch._dynamo and torch._inductor:
    about 70 MiB of resident memory and a second of import for nothing. Only meta tensors are skipped, and only
    in the thread (mode stack) that builds the model.
    """

    _INIT = frozenset(
        {getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")}
        | {getattr(torch.Tensor, n) for n in ("normal_", "uniform_", "erfinv_", "clamp_", "log_normal_",
                                                "exponential_", "cauchy_", "geometric_", "random_", "bernoulli_")}
    )  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self._INIT:
            tensor = kwargs.get("tensor", args[0] if args else None)
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def release_freed_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    Loading frees many mid-sized blocks (checkpoint parts once joined, the tokenizer's parse): glibc keeps them
    mapped in its heap, resident but unused, tens of MB for a small model, until a trim hands them back.
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def build_model(
    config: ModelConfig,
    weights: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    consume: bool = False,
) -> nn.Module:
    """The architecture's module holding `weights` (Hugging Face names), cast to `dtype` on `device`.

    consume: take the tensors out of `weights` as they are used (the dict is empty afterwards), so that q/k/v
    and gate/up parts are freed as soon as they are joined rather than after the whole model is built.
    """
    cls = ARCHITECTURES.get(config.architecture)
    if cls is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"architecture '{config.architecture}' is not supported (known: {known})"
        )
    with torch.device("meta"), SkipMetaInit():
        model = cls(config)
    state = fuse_weights(weights, consume=consume)
    packed_head = untie_packed_head(config, state, dtype)
    swap_packed(model, state, dtype, device)
    if packed_head:
        tie = False
    elif config.tie_word_embeddings or "lm_head.weight" not in state:
        state.pop("lm_head.weight", None)
        tie = True
    else:
        tie = False
    expected = {n for n, p in model.named_parameters(remove_duplicate=True) if p.is_meta}
    if tie:
        expected.discard("lm_head.weight")
    missing = sorted(expected - state.keys())
    if missing:
        raise InvalidModel(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in expected:
        tensor = state[name]
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise InvalidModel(
                f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
            )
    model.load_state_dict(
        {n: state[n].to(device=device, dtype=param_dtype(n, dtype)) for n in expected},
        strict=False,
        assign=True,
    )
    if consume:
        state.clear()
        release_freed_heap()
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = tie
    for module in model.modules():  # rotary tables were built on the CPU; move them with the model
        for bname, buf in list(module.named_buffers(recurse=False)):
            setattr(module, bname, buf.to(device))
    return model.eval().requires_grad_(False)
