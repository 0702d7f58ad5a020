"""Adapters on disk in PEFT's format, so PEFT, vLLM and others load what Cumulo trains, and back.

A directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules ...),
`adapter_model.safetensors` with PEFT's key names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`:
A [r, in], B [out, r]) and `cumulo_adapter.json` (the base model's name and seal, trained tokens, job id), which
the service and the engine read. Weights are in Hugging Face's layout: Cumulo's loader already undoes GGUF's
q/k row permutation when it reads a GGUF (cumulo.models.gguf._unpermute_rotary), so the q/k rows an adapter
was trained against are HF's rows whatever file the base came from.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cumulo.engine.lora import CONFIG, CUMULO, WEIGHTS, read_peft
from cumulo.errors import InvalidModel, SealMismatch
from cumulo.finetune.lora import LoRALinear, peft_name

_KEY = re.compile(r"^base_model\.model\.(.+)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class AdapterInfo:
    """cumulo_adapter.json."""

    base_model: str  # as the job named it (catalog name or path)
    base_seal: str
    trained_tokens: int = 0
    job_id: str | None = None
    rank: int = 8
    alpha: float = 16.0


def adapter_state(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """PEFT-named fp32 tensors of every slice of every wrapped linear."""
    out = {}
    for name, w in wrapped.items():
        for s in w.slices:
            key = peft_name(name, s.name)
            out[f"{key}.lora_A.weight"] = w.lora_A[s.name].detach().float().contiguous()
            out[f"{key}.lora_B.weight"] = w.lora_B[s.name].detach().float().contiguous()
    return out


def save_adapter(directory: Path, wrapped: dict[str, LoRALinear], info: AdapterInfo) -> Path:
    """Write the three files into `directory` (created), each atomically (a temporary name, then rename)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    targets = sorted({s.name for w in wrapped.values() for s in w.slices})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": info.rank,
        "lora_alpha": info.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": str(info.base_model),
    }
    tmp = directory / f".{WEIGHTS}.tmp"
    save_file(adapter_state(wrapped), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS)
    for name, payload in ((CONFIG, config), (CUMULO, asdict(info))):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, directory / name)
    return directory


def _info(directory: Path) -> AdapterInfo | None:
    """cumulo_adapter.json, or None for a foreign PEFT directory."""
    path = Path(directory) / CUMULO
    return AdapterInfo(**json.loads(path.read_text())) if path.exists() else None


def load_into(
    directory: Path, wrapped: dict[str, LoRALinear], base_seal: str | None = None
) -> AdapterInfo | None:
    """Copy a saved adapter's tensors into `wrapped` (built by apply_lora with the same rank and targets).
    With `base_seal`, an adapter trained on another base is refused (SealMismatch)."""
    peft = read_peft(directory)  # the engine's reader: the same checks for what is trained and what is served
    if base_seal is not None and peft.base_seal is not None and peft.base_seal != base_seal:
        raise SealMismatch(f"adapter {directory} was trained on base {peft.base_seal}, not {base_seal}")
    by_peft = {}
    for name, w in wrapped.items():
        for s in w.slices:
            by_peft[peft_name(name, s.name)] = (w, s.name)
    seen = set()
    for key, tensor in peft.tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise InvalidModel(f"{directory}: unexpected tensor {key}")
        module = f"base_model.model.{match[1]}.{match[2]}"
        if module not in by_peft:
            raise InvalidModel(f"{directory}: tensor {key} matches no targeted linear of this model")
        w, part = by_peft[module]
        target = (w.lora_A if match[3] == "A" else w.lora_B)[part]
        if tuple(tensor.shape) != tuple(target.shape):
            raise InvalidModel(f"{directory}: {key} is {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        seen.add(module)
    missing = sorted(set(by_peft) - seen)
    if missing:
        raise InvalidModel(f"{directory}: no weights for {missing[0]}")
    return _info(directory)


def targets_of(directory: Path) -> tuple[tuple[str, ...], int, float]:
    """(target modules, rank, alpha) from adapter_config.json: what apply_lora needs to rebuild it."""
    peft = read_peft(directory)
    if peft.scale != peft.alpha / peft.rank:
        raise InvalidModel(f"{directory}: rsLoRA adapters are not supported for training yet")
    return peft.targets, peft.rank, peft.alpha


def attach_adapter(model, directory: Path, base_seal: str | None = None) -> dict[str, LoRALinear]:
    """Wrap `model`'s linears as the saved adapter says and load its weights: the model now answers with it."""
    from cumulo.finetune.lora import apply_lora

    targets, rank, alpha = targets_of(directory)
    wrapped = apply_lora(model, rank, alpha, targets)
    load_into(directory, wrapped, base_seal)
    return wrapped
