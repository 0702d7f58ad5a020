"""Tiny random models, a character tokenizer and an engine over them, so tests run in seconds without any download.

The one place tests get a tiny in-memory model: `tiny_config` (any registered architecture), `tiny_model`
(random weights, reproducible by seed) and `make_tiny_engine` (an `LLMEngine` over it with a KV cache of
`kv_tokens` tokens). Tiny models written to disk come from `checkpoints` (Hugging Face-style directories)
and `gguf_files`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cumulo.engine.kv_sizing import plan_kv_cache
from cumulo.engine.llm_engine import EngineConfig, LLMEngine
from cumulo.models.config import ModelConfig
from cumulo.models.registry import ARCHITECTURES
from cumulo.platform.budget import GIB
from cumulo.platform.cpu import CpuPlatform

VOCAB = 96  # ids 0..2 special, the rest printable ASCII


class CharTokenizer:
    """One token per printable ASCII character; id 1 is EOS. Enough to exercise text, stops and streaming."""

    vocab_size = VOCAB
    bos_token_id = 0
    eos_token_ids = {1}
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [min(max(ord(c) - 29, 3), VOCAB - 1) for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(t + 29) for t in token_ids if t >= 3 or not skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        return "".join(m["content"] for m in messages)


def tiny_config(arch: str = "llama", **overrides: object) -> ModelConfig:
    base = dict(
        architecture=arch,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        eos_token_ids=[1],
    )
    if arch == "qwen2":
        base["attention_bias"] = True
    if arch == "gemma3":
        base.update(
            num_hidden_layers=3,
            sliding_window=8,
            sliding_window_pattern=3,
            hidden_act="gelu_pytorch_tanh",
            rope_local_base_freq=10000.0,
            query_pre_attn_scalar=16,
            tie_word_embeddings=True,
        )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def tiny_model(config: ModelConfig, seed: int = 0, weight_std: float = 0.15) -> torch.nn.Module:
    """Random weights, the same for the same seed: norms near their identity, matrices from N(0, weight_std)
    (wider weights make the next token depend more on the history)."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[config.architecture](config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1).add_(0.0 if config.architecture == "gemma3" else 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, weight_std)
    return model.eval().requires_grad_(False)


def cpu_paged_decode_attention(cfg: ModelConfig):
    kernel = CpuPlatform().paged_decode_attention(torch.float32, cfg.head_dim)
    assert kernel is not None, "the CPU decode-attention kernel did not build"
    return kernel


def make_tiny_engine(
    arch: str = "llama",
    kv_tokens: int = 4096,
    seed: int = 0,
    model_overrides: dict | None = None,
    fused_attention: bool = False,
    **options: object,
) -> LLMEngine:
    cfg = tiny_config(arch, **(model_overrides or {}))
    model = tiny_model(cfg, seed)
    # fp32 K and V of every layer; a whole number of bytes over 2^30 is exact in a float, so the plan gets
    # exactly kv_tokens tokens (rounded down to whole blocks)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    gib = kv_tokens * per_token / GIB
    config = EngineConfig(device="cpu", kv_cache_gib=gib, **options)  # type: ignore[arg-type]
    plan = plan_kv_cache(cfg, torch.float32, config, CpuPlatform())
    return LLMEngine(
        model,
        CharTokenizer(),
        config,
        plan,
        device=torch.device("cpu"),
        name=f"tiny-{arch}",
        seal="sha256:test",
        paged_decode_attention=cpu_paged_decode_attention(cfg) if fused_attention else None,
    )
