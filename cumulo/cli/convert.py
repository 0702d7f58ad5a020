"""`cumulo convert MODEL --format F -o DIR`: rewrite a model's weights in a compact number format.

Reads any model the loader can (GGUF file, Hugging Face directory, catalog name), quantizes the linear layers
the keep policy allows (default: embeddings, lm_head, norms and routers stay in bf16; `--keep` / `--only` take
fnmatch patterns on module names; `--head body` packs the output head too, a tied embedding then stored once)
and writes safetensors + config.json with `quantization_config` (block FP8 in
DeepSeek-V3's layout; see cumulo.formats.checkpoint), plus the tokenizer, so the directory is a model again.

`--calibrate [N|FILE]` rounds with GPTQ (cumulo.formats.gptq) instead of to nearest: each linear's input
statistics come from N tokens of calibration text (default 8192 from the half of the evaluator's corpus that
`cumulo eval ppl` never scores, cumulo.evaluation.corpus.calibration_docs) or from a text file, all taken in
one pass of the unquantized model. `--sequential` calibrates and quantizes the decoder layers in order instead,
each on inputs that went through the already quantized layers before it (the GPTQ paper's order); on SmolLM2 it
measured slightly worse than one pass (docs/formats.md), so it is not the default. `--flips` then moves single
codes to a neighbouring grid value while that lowers each layer's calibration error (cumulo.formats.flips). The
output has the same formats and layouts; only the codes and block scales differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_CALIBRATION_TOKENS = 8192
CALIBRATION_WINDOW = 512
MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
    "qwen3_moe": "qwen3_moe",
}
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="rewrite a model's weights in a compact number format",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("model", help="catalog name, .gguf file or Hugging Face-style directory")
    p.add_argument(
        "--format",
        "-f",
        required=True,
        metavar="F",
        help="ue8m0-fp8, fp8, fp8-block, mxfp8, mxfp6, mxfp4, mxint8, nvfp4, hif8, bf16 (and -rceil "
        "variants of the MX formats)",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write (created)")
    p.add_argument(
        "--keep",
        action="append",
        metavar="PATTERN",
        help="module-name pattern to leave in bf16 (repeatable; replaces the default list)",
    )
    p.add_argument("--only", action="append", metavar="PATTERN", help="quantize only modules matching these")
    p.add_argument(
        "--head",
        choices=("bf16", "body"),
        default=None,
        help="the output head in bf16, or in the body's format ('body'; a tied embedding is then stored once, "
        "packed, and the loader rebuilds the embedding table from it). Default per format: see docs/formats.md",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    p.add_argument(
        "--calibrate",
        nargs="?",
        const=str(DEFAULT_CALIBRATION_TOKENS),
        default=None,
        metavar="N|FILE",
        help="error-compensating (GPTQ) rounding calibrated on N tokens of the built-in calibration text "
        f"(default {DEFAULT_CALIBRATION_TOKENS}; disjoint from what 'cumulo eval ppl' scores) or on a UTF-8 "
        "text FILE; same formats and layouts, better codes",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="with --calibrate: calibrate layer by layer on the outputs of the already quantized layers "
        "instead of one pass of the unquantized model",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for the calibration windows' positions (default 0)"
    )
    p.add_argument(
        "--act-order",
        action="store_true",
        help="with --calibrate: quantize columns by descending input energy, block scales fixed from the "
        "original weight (same layout)",
    )
    p.add_argument(
        "--scale-search",
        action="store_true",
        help="with --calibrate: per block, keep whichever power-of-two scale (the rule's, half, double) rounds "
        "with the least input-weighted error (ue8m0 and E8M0 formats; same layout)",
    )
    p.add_argument(
        "--flips",
        action="store_true",
        help="with --calibrate: after GPTQ, move one code at a time to its neighbouring grid value while that "
        "lowers the layer's calibration error (exact greedy descent; float formats; same layout, slower)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cumulo.errors import CumuloError
    from cumulo.formats.schemes import get_scheme

    scheme = get_scheme(args.format)  # unknown names fail before the model is read
    calibrate = _calibration_request(args.calibrate, scheme.element is None)
    if (args.flips or args.act_order or args.scale_search or args.sequential) and calibrate is None:
        raise CumuloError("--sequential, --act-order, --scale-search and --flips refine --calibrate's rounding; "
                          "add --calibrate")  # fmt: skip
    out = Path(args.output).expanduser()
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CumuloError(f"{out} is not empty; pass --force to write into it")
    import torch
    from tqdm import tqdm

    from cumulo.formats.checkpoint import save_packed_state_dict
    from cumulo.formats.linear import QuantPolicy, default_head
    from cumulo.formats.packed import PackedWeight
    from cumulo.formats.quantize import quantize
    from cumulo.models.loader import load

    model = load(args.model, dtype=torch.float32)
    head = args.head or default_head(scheme.name)
    policy = QuantPolicy.from_patterns(keep=args.keep, only=args.only, head=head)
    state: dict[str, torch.Tensor | PackedWeight] = {}
    bytes_in = bytes_out = 0
    items = _with_packed_head(model, policy, scheme.element is not None)
    group_amax = _fused_group_amax(model.weights)
    quantized = [
        n
        for n, t in items
        if t.dim() == 2 and n.endswith(".weight") and policy.quantizes(n.removesuffix(".weight"))
    ]
    done: dict[str, PackedWeight] = {}  # weights the sequential calibration already quantized
    calibration = None
    options = {"act_order": args.act_order, "scale_search": args.scale_search, "flips": args.flips}
    if calibrate is not None:
        calibration = _calibrate(
            model, quantized, calibrate, args.seed, scheme.name, group_amax, done if args.sequential else None,
            options,
        )  # fmt: skip
    for name, tensor in tqdm(items, desc=f"convert to {scheme.name}", unit="tensor", mininterval=0.5):
        bytes_in += tensor.numel() * tensor.element_size()
        module = name.removesuffix(".weight")
        if (
            scheme.element is not None
            and tensor.dim() == 2
            and name.endswith(".weight")
            and policy.quantizes(module)
        ):
            hessian = calibration.hessian_for(name) if calibration is not None else None
            if name in done:
                value = done.pop(name)
            elif hessian is not None:
                value: torch.Tensor | PackedWeight = _calibrated(
                    tensor, hessian, scheme.name, name=name, tensor_amax=group_amax.get(name), **options
                )
            else:
                value = quantize(tensor, scheme.name, name=name, tensor_amax=group_amax.get(name))
            assert isinstance(value, PackedWeight)
            bytes_out += value.nbytes
        else:
            value = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
            bytes_out += value.numel() * value.element_size()
        state[name] = value
    head_note = "packed" if isinstance(state.get("lm_head.weight"), PackedWeight) else "bf16"
    out.mkdir(parents=True, exist_ok=True)
    config = _config_json(model, out)
    save_packed_state_dict(state, out, scheme.name, config=config)
    print(
        f"wrote {out}: {scheme.name} (output head {head_note}), {bytes_out / 1e6:.1f} MB of weights "
        f"(from {bytes_in / 1e6:.1f} MB fp32)"
    )
    return 0


def _calibrated(weight: Any, hessian: Any, fmt: str, *, flips: bool = False, **options: Any) -> Any:
    """GPTQ's codes for `weight` under `hessian`; with `flips`, then improved by cumulo.formats.flips."""
    if flips:
        from cumulo.formats.flips import flip_quantize

        return flip_quantize(weight, hessian, fmt, **options)
    from cumulo.formats.gptq import gptq_quantize

    return gptq_quantize(weight, hessian, fmt, **options)


def _with_packed_head(model: Any, policy: Any, compact: bool) -> list[tuple[str, Any]]:
    """The checkpoint's tensors to convert. A tied model whose head the policy quantizes gets its shared matrix
    once, as `lm_head.weight` (packed like the body, which is what the head reads every step), and no
    `model.embed_tokens.weight`: the loader rebuilds the embedding table from the packed head
    (cumulo.models.registry), so the file holds one 8- or 4-bit copy where it held one 16-bit copy."""
    weights = model.weights
    embed = "model.embed_tokens.weight"
    tied = "lm_head.weight" not in weights and embed in weights
    if not (compact and tied and model.config.tie_word_embeddings and policy.quantizes("lm_head")):
        return list(weights.items())
    return [("lm_head.weight", weights[embed]) if n == embed else (n, t) for n, t in weights.items()]


def _calibration_request(value: str | None, uncompressed: bool) -> int | str | None:
    """--calibrate's value: a token count (int), a text file (str), or None when not asked; bad values fail
    here, before the model is read."""
    from cumulo.errors import InvalidRequest

    if value is None:
        return None
    if uncompressed:
        raise InvalidRequest("--calibrate needs a compact format; bf16 has no rounding to calibrate")
    try:
        tokens = int(value)
    except ValueError:
        if not Path(value).expanduser().is_file():
            raise InvalidRequest(
                f"--calibrate {value!r} is neither a token count nor an existing text file"
            ) from None
        return value
    if tokens < 2:
        raise InvalidRequest(f"--calibrate needs at least 2 tokens, not {tokens}")
    return tokens


def _calibrate(
    model: Any,
    quantized: list[str],
    request: int | str,
    seed: int,
    fmt: str,
    group_amax: dict[str, float],
    done: dict[str, Any] | None,
    options: dict[str, bool],
) -> Any:
    """Input statistics of every linear that will be quantized, from the engine's own fp32 module. With `done`
    (sequential mode), the decoder layers' weights are quantized here, layer by layer, into `done`."""
    import torch

    from cumulo.evaluation.calibration import (
        collect_hessians,
        module_for,
        quantize_sequentially,
        sample_windows,
    )
    from cumulo.evaluation.corpus import calibration_docs, from_file
    from cumulo.models.registry import build_model

    corpus = from_file(request) if isinstance(request, str) else calibration_docs()
    tokens = DEFAULT_CALIBRATION_TOKENS if isinstance(request, str) else request
    ids = model.tokenizer.encode(corpus.text)
    window = min(CALIBRATION_WINDOW, model.config.max_position_embeddings)
    spans = sample_windows(len(ids), tokens, window, seed)
    module = build_model(model.config, dict(model.weights), torch.float32)
    targets = {module_for(n) for n in quantized}
    if done is None:
        calibration = collect_hessians(module, ids, spans, targets)
    else:
        params = {n for n, _ in module.named_parameters()}
        layer = _layer_quantizer(model.weights, quantized, fmt, group_amax, params, done, options)
        calibration = quantize_sequentially(module, ids, spans, targets, layer)
    del module
    print(f"calibrated on {calibration.tokens} tokens ({calibration.windows} windows) of {corpus.source}")
    return calibration


def _layer_quantizer(
    weights: dict[str, Any],
    quantized: list[str],
    fmt: str,
    group_amax: dict[str, float],
    params: set[str],
    done: dict[str, Any],
    options: dict[str, bool],
) -> Any:
    """The callback `quantize_sequentially` calls per decoder layer: GPTQ (or nearest, where no H was seen) for
    each of the layer's checkpoint weights, kept in `done`; returns their dequantized values under the engine's
    (fused) parameter names, for the module to run the next layers with."""
    from cumulo.evaluation.calibration import module_for
    from cumulo.formats.quantize import quantize
    from cumulo.models.registry import fuse_weights

    def quantize_layer(prefix: str, hessians: dict[str, Any]) -> dict[str, Any]:
        dense = {}
        for name in [n for n in quantized if n.startswith(prefix)]:
            hessian = hessians.get(module_for(name))
            amax = group_amax.get(name)
            if hessian is not None:
                done[name] = _calibrated(weights[name], hessian, fmt, name=name, tensor_amax=amax, **options)
            else:
                done[name] = quantize(weights[name], fmt, name=name, tensor_amax=amax)
            dense[name] = done[name].dequantize()
        return {n: t for n, t in fuse_weights(dense).items() if n in params}

    return quantize_layer


def _config_json(model: Any, out: Path) -> dict[str, Any]:
    """The source's own config.json and side files when it is a HF directory; otherwise built from ModelConfig."""
    source = Path(model.source)
    if source.is_dir() and (source / "config.json").is_file():
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        raw = json.loads((source / "config.json").read_text())
        raw.pop("quantization_config", None)
        return raw
    _write_tokenizer(model.tokenizer, out)
    return _hf_config(model.config)


def _hf_config(c: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": [],
        "model_type": MODEL_TYPES.get(c.architecture, c.architecture),
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": c.hidden_act,
        "attention_bias": c.attention_bias,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids),
        "torch_dtype": "bfloat16",
    }
    if c.architecture == "qwen3_moe":
        cfg.update(
            num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            moe_intermediate_size=c.moe_intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=c.decoder_sparse_step,
            mlp_only_layers=list(c.mlp_only_layers),
        )
    if c.architecture == "gemma3":
        cfg.update(
            sliding_window=c.sliding_window,
            sliding_window_pattern=c.sliding_window_pattern,
            rope_local_base_freq=c.rope_local_base_freq,
            query_pre_attn_scalar=c.query_pre_attn_scalar,
            final_logit_softcapping=c.final_logit_softcapping,
            attn_logit_softcapping=c.attn_logit_softcapping,
        )
    return cfg


def _write_tokenizer(tokenizer: Any, out: Path) -> None:
    tokenizer.backend.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "add_bos_token": bool(tokenizer.add_bos),
        "chat_template": tokenizer.chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


_FUSED_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("gate_proj", "up_proj"),  # any gated MLP: mlp, mlp.experts.{e}, mlp.shared_experts
)


def _fused_group_amax(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """For each weight the engine fuses with its siblings (q/k/v, gate/up), the largest |w| of the whole group:
    formats with a per-tensor scale (NVFP4) then give the siblings one scale, so they join exactly on load."""
    out: dict[str, float] = {}
    for name in weights:
        for group in _FUSED_GROUPS:
            if name.endswith(f".{group[0]}.weight"):
                prefix = name.removesuffix(f"{group[0]}.weight")
                names = [f"{prefix}{part}.weight" for part in group]
                if all(n in weights for n in names):
                    amax = max(float(weights[n].abs().amax()) for n in names)
                    out.update(dict.fromkeys(names, amax))
    return out
