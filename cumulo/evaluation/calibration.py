"""Calibration for error-compensating rounding: each linear layer's input statistics H = sum x^T x on real text.

GPTQ (`cumulo.formats.gptq`) needs, per linear, the Gram matrix of the inputs it sees. They are captured with
forward hooks on the module the engine itself builds (`cumulo.models.registry.build_model`, fp32), running a
few windows of calibration text through it without a KV cache, as the perplexity evaluator does. The engine
fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; the parts share their input, so the checkpoint
names map onto the fused module's H (`hessian_for`).

The default text is the second half (by paragraphs) of the evaluator's corpus (`corpus.calibration_docs`),
while `cumulo eval ppl` scores the first 4096 tokens of its first half: calibration never sees the scored text.
Windows start at seeded random offsets, so a run is reproducible and a different seed samples other windows.

Two modes. `collect_hessians` takes every H from one pass of the unquantized model (GPTQ's "non-sequential"
variant). `quantize_sequentially` is the paper's own order: the windows' hidden states go through the decoder
one layer at a time; a layer's H are collected, the caller quantizes that layer, its weights are replaced by
the dequantized result, and its outputs are recomputed with them, so each later layer is calibrated on the
inputs it will really see and can compensate the error earlier layers left. It holds only the windows' hidden
states (windows x tokens x hidden) besides the model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from cumulo.errors import InvalidRequest
from cumulo.models.attention import AttentionContext

# Checkpoint part -> the engine's fused module that takes the same input.
FUSED_INPUTS = {
    "self_attn.q_proj": "self_attn.qkv_proj",
    "self_attn.k_proj": "self_attn.qkv_proj",
    "self_attn.v_proj": "self_attn.qkv_proj",
    "mlp.gate_proj": "mlp.gate_up_proj",
    "mlp.up_proj": "mlp.gate_up_proj",
}


@dataclass(frozen=True, slots=True)
class Calibration:
    hessians: dict[
        str, torch.Tensor
    ]  # module name -> [K, K] float32 sum of x^T x over all calibration tokens
    tokens: int
    windows: int

    def hessian_for(self, weight_name: str) -> torch.Tensor | None:
        """H for a checkpoint weight ("model.layers.0.self_attn.q_proj.weight"), or None if it was not seen."""
        return self.hessians.get(module_for(weight_name))


def module_for(weight_name: str) -> str:
    """The engine module that a checkpoint weight feeds: q_proj -> qkv_proj, gate_proj -> gate_up_proj, ..."""
    module = weight_name.removesuffix(".weight")
    for part, fused in FUSED_INPUTS.items():
        if module.endswith("." + part):
            return module.removesuffix(part) + fused
    return module


def sample_windows(num_tokens: int, tokens: int, window: int, seed: int) -> list[tuple[int, int]]:
    """[begin, end) spans of `window` tokens (fewer if the text is short) totalling about `tokens`, at seeded
    random starts; the whole text when it is shorter than what is asked."""
    if tokens < 2:
        raise InvalidRequest(f"calibration needs at least 2 tokens, not {tokens}")
    if num_tokens < 2:
        raise InvalidRequest(f"calibration text has only {num_tokens} tokens")
    window = min(window, num_tokens)
    count = max(1, -(-tokens // window))
    if count * window >= num_tokens:
        return [(b, min(b + window, num_tokens)) for b in range(0, num_tokens, window)]
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, num_tokens - window + 1, (count,), generator=gen).tolist()
    return [(s, s + window) for s in sorted(starts)]


def collect_hessians(
    model: nn.Module,
    token_ids: Sequence[int],
    spans: Iterable[tuple[int, int]],
    targets: set[str],
    *,
    progress: bool = True,
) -> Calibration:
    """Run `spans` of `token_ids` through `model` (fp32, no cache) and sum x^T x at every nn.Linear in `targets`."""
    from tqdm import tqdm

    hessians: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def accumulate(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float32)  # [T, K]
            gram = x.T @ x
            if name in hessians:
                hessians[name] += gram
            else:
                hessians[name] = gram

        return accumulate

    for name, module in model.named_modules():
        if name in targets and isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(hook(name)))
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    spans = list(spans)
    need_head = "lm_head" in targets
    seen = 0
    try:
        with torch.inference_mode():
            for begin, end in tqdm(
                spans, desc="calibrate", unit="window", file=sys.stderr, disable=not progress
            ):
                inputs = ids[begin:end]
                positions = torch.arange(inputs.numel())
                hidden = model(inputs, positions, AttentionContext(kv_cache=None))
                if need_head:
                    model.compute_logits(hidden)
                seen += inputs.numel()
    finally:
        for handle in handles:
            handle.remove()
    return Calibration(hessians, seen, len(spans))


class _ReachedFirstLayer(Exception):
    """Raised by a pre-hook to stop the forward pass once the first decoder layer's input is known."""


# (layer prefix "model.layers.3.", {module name: H}) -> {parameter name: its new (dequantized) weight}
LayerQuantizer = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def quantize_sequentially(
    model: nn.Module,
    token_ids: Sequence[int],
    spans: Iterable[tuple[int, int]],
    targets: set[str],
    quantize_layer: LayerQuantizer,
    *,
    progress: bool = True,
) -> Calibration:
    """Calibrate and quantize `model` (fp32, modified in place) one decoder layer at a time.

    For each layer in `model.model.layers`: sum x^T x at its `targets` over every window, call
    `quantize_layer(prefix, hessians)`, write the weights it returns into the module, then run the layer again
    to get the next layer's inputs. Targets outside the decoder (an lm_head) get their H after the last layer,
    from inputs that went through every quantized layer. Returns every H collected."""
    from tqdm import tqdm

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise InvalidRequest(f"{type(model).__name__} has no model.layers: sequential calibration needs them")
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    spans = list(spans)
    states: list[torch.Tensor] = []

    def first_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        states.append(args[0].detach().clone())
        raise _ReachedFirstLayer

    positions = [torch.arange(end - begin) for begin, end in spans]
    handle = layers[0].register_forward_pre_hook(first_input)
    try:
        with torch.inference_mode():
            for (begin, end), pos in zip(spans, positions, strict=True):
                try:
                    model(ids[begin:end], pos, AttentionContext(kv_cache=None))
                except _ReachedFirstLayer:
                    pass
    finally:
        handle.remove()
    hessians: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(
        tqdm(layers, desc="calibrate+quantize", unit="layer", file=sys.stderr, disable=not progress)
    ):
        prefix = f"model.layers.{index}."
        inner = {t.removeprefix(prefix) for t in targets if t.startswith(prefix)}
        with torch.inference_mode():
            seen = _hessians_of(layer, inner, partial(_run_layer, layer, states, positions))
        found = {prefix + name: h for name, h in seen.items()}
        hessians.update(found)
        new_weights = quantize_layer(prefix, found)
        with torch.no_grad():
            for name, value in new_weights.items():
                model.get_parameter(name).copy_(value)
        with torch.inference_mode():
            states = _run_layer(layer, states, positions)
    rest = {t for t in targets if not t.startswith("model.layers.")}
    norm = getattr(model.model, "norm", None)
    if rest and norm is not None and hasattr(model, "compute_logits"):
        with torch.inference_mode():
            hessians.update(
                _hessians_of(model, rest, lambda: [model.compute_logits(norm(h)) for h in states])
            )
    return Calibration(hessians, sum(e - b for b, e in spans), len(spans))


def _run_layer(
    layer: nn.Module, states: list[torch.Tensor], positions: list[torch.Tensor]
) -> list[torch.Tensor]:
    """One decoder layer over every window's hidden states (no KV cache: each window attends to itself)."""
    return [layer(h, p, AttentionContext(kv_cache=None)) for h, p in zip(states, positions, strict=True)]


def _hessians_of(root: nn.Module, targets: set[str], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Sum x^T x at the nn.Linear modules of `root` named in `targets` while `run()` calls it."""
    hessians: dict[str, torch.Tensor] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def accumulate(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float32)
            gram = x.T @ x
            hessians[name] = hessians[name] + gram if name in hessians else gram

        return accumulate

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in root.named_modules()
        if name in targets and isinstance(module, nn.Linear)
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return hessians
