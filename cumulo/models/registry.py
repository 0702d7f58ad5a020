"""Architecture registry: picks the module class for a `ModelConfig` and loads Hugging Face-named weights into
it, fusing q/k/v and gate/up projections on the way.
"""

from __future__ import annotations

import torch
from torch import nn

from cumulo.errors import InvalidModel, UnsupportedArchitecture
from cumulo.models.config import ModelConfig
from cumulo.models.gemma3 import Gemma3ForCausalLM
from cumulo.models.llama import LlamaForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}

_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> our module names (q/k/v -> qkv_proj, gate/up -> gate_up_proj). Input is not modified."""
    out = dict(weights)
    layer_prefixes = {n.rsplit(".self_attn.", 1)[0] for n in weights if ".self_attn.q_proj." in n}
    for prefix in layer_prefixes:
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{prefix}.{p}.{kind}" for p in parts]
                if all(n in out for n in names):
                    out[f"{prefix}.{fused}.{kind}"] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


def build_model(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    cls = ARCHITECTURES.get(config.architecture)
    if cls is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"architecture '{config.architecture}' is not supported (known: {known})"
        )
    with torch.device("meta"):
        model = cls(config)
    state = fuse_weights(weights)
    if config.tie_word_embeddings or "lm_head.weight" not in state:
        state.pop("lm_head.weight", None)
        tie = True
    else:
        tie = False
    expected = {n for n, _ in model.named_parameters(remove_duplicate=True)}
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
        {n: state[n].to(device=device, dtype=dtype) for n in expected}, strict=False, assign=True
    )
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = tie
    for module in model.modules():  # rotary tables were built on the CPU; move them with the model
        for bname, buf in list(module.named_buffers(recurse=False)):
            setattr(module, bname, buf.to(device))
    return model.eval().requires_grad_(False)
