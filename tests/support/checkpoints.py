"""Tiny random models written to disk as Hugging Face-style directories (transformers' own `save_pretrained`),
and the tokenizers that go with them, so loader, converter and serving tests read real files in seconds.

`hf_model` is the one constructor of tiny transformers models; `write_tiny_llama` (transformers' own init and a
word tokenizer) and `write_hf_model` (every weight drawn wide, a byte-level BPE tokenizer with a chat template)
save them. GGUF files are written from these by `tests.support.gguf_files`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "안녕하세요, 세계! 한국어 문장을 토큰으로 나눕니다.",
    "你好，世界。中文句子也要分词。",
    "Emoji 🙂🚀 and numbers 12345 and symbols €≠∞.",
] * 20

# the shape of `write_hf_model`'s checkpoints; `hf_model` takes any of it as an override
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


# -- tokenizers ----------------------------------------------------------------------------------------------
def save_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A tokenizer.json whose words t0..tN map to ids 0..N: enough for loaders that need one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))


def save_bpe_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer.json trained on a few lines of English, Korean, Chinese and emoji, and a
    tokenizer_config.json with its special tokens and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "chat_template": CHATML})
    )
    return directory


# -- models --------------------------------------------------------------------------------------------------
def hf_model(arch: str, vocab_size: int, **overrides: object):
    """A transformers model of `arch` (llama, qwen2, qwen3, gemma3, qwen3_moe) in SHAPE, with transformers' own random
    init: qwen3 and gemma3 get head_dim 16, gemma3 Gemma's window and attention scale and tied embeddings."""
    import transformers as tf

    config = dict(SHAPE, vocab_size=vocab_size)
    if arch == "llama":
        config.update(rope_theta=10000.0, **overrides)
        return tf.LlamaForCausalLM(tf.LlamaConfig(**config))
    if arch == "qwen2":
        config.update(overrides)
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**config))
    if arch == "qwen3":
        config.update(head_dim=16, **overrides)
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**config))
    if arch == "gemma3":
        config.update(tie_word_embeddings=True, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
        config.update(overrides)
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**config))
    if arch == "qwen3_moe":
        config.update(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
        config.update(overrides)
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**config))
    raise ValueError(arch)


def write_tiny_llama(
    path: Path, vocab: int, hidden: int, intermediate: int, weight_std: float | None = None
) -> Path:
    """A tiny Llama with transformers' init (seed 0) and a word tokenizer, saved as safetensors in `path`.
    `weight_std` draws every weight from N(0, std) instead: transformers' init (std 0.02) gives nearly flat
    logits, whose greedy choice can flip between two correct computations (a prefill and a decode sum in
    different orders); std 0.5 gives margins no rounding reaches."""
    torch.manual_seed(0)
    model = hf_model(
        "llama", vocab, hidden_size=hidden, intermediate_size=intermediate, max_position_embeddings=256
    )
    if weight_std is not None:
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, weight_std)
    model.save_pretrained(path, safe_serialization=True)
    save_word_tokenizer(path, vocab)
    return path


def write_tiny_qwen3_moe(path: Path, vocab: int, weight_std: float = 0.5, **overrides: object) -> Path:
    """A tiny Qwen3-MoE (8 experts of width 32, top-2, 4 layers; `overrides` for any config field, e.g.
    `mlp_only_layers`, `decoder_sparse_step`, `norm_topk_prob`) with every weight from N(0, weight_std),
    saved with transformers' own `save_pretrained` and a word tokenizer. A wide std keeps both the logits and
    the router's choices decisive, so two correct computations summing in different orders agree."""
    torch.manual_seed(0)
    settings: dict[str, object] = dict(num_hidden_layers=4, max_position_embeddings=512)
    settings.update(overrides)
    model = hf_model("qwen3_moe", vocab, **settings)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, weight_std)
    model.save_pretrained(path, safe_serialization=True)
    save_word_tokenizer(path, vocab)
    return path


def write_hf_model(
    directory: Path,
    arch: str,
    tokenizer_dir: Path,
    *,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    shard: bool = False,
) -> Path:
    """A tiny `arch` in SHAPE with every weight drawn from N(0, 0.5), stored in `dtype` (in 40 KB shards when
    `shard`), with the tokenizer files of `tokenizer_dir` (see `save_bpe_tokenizer`); gemma3 is always tied."""
    vocab_size = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    model = hf_model(arch, vocab_size, tie_word_embeddings=tied or arch == "gemma3")
    with torch.no_grad():
        for param in model.parameters():  # norms too, so that a lost "+1" or a swapped norm shows
            param.normal_(0.0, 0.5)
    model = model.to(dtype)
    model.save_pretrained(directory, max_shard_size="40KB" if shard else "5GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    return directory


def hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved directory's safetensors files, under its Hugging Face name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


# DeepSeek-V3 in miniature: 4 heads of MLA (latent 32 + rotary 16), 3 layers of which the first is dense, 8
# routed experts in 4 groups of which 2 are eligible, top-2, one shared expert, YaRN with both mscales
DEEPSEEK_V3_SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=24,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=512,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=128,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=0.707,
    ),
)


def tiny_deepseek_v3(vocab: int, weight_std: float = 0.6, **overrides: object):
    """transformers' own DeepseekV3ForCausalLM in DEEPSEEK_V3_SHAPE (`overrides` for any config field), every
    weight (norms, router and its selection bias too) drawn from N(0, weight_std), seed 0, fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    settings: dict[str, object] = dict(DEEPSEEK_V3_SHAPE, vocab_size=vocab)
    settings.update(overrides)
    model = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**settings))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, weight_std)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a buffer in transformers: drawn too, so it matters
                buf.normal_(0.0, weight_std)
    return model.eval()


def write_tiny_deepseek_v3(path: Path, vocab: int, weight_std: float = 0.6, **overrides: object) -> Path:
    """`tiny_deepseek_v3` saved with `save_pretrained`, with a word tokenizer."""
    model = tiny_deepseek_v3(vocab, weight_std, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    save_word_tokenizer(path, vocab)
    return path


def random_lora_b(model: torch.nn.Module, seed: int, std: float) -> None:
    """PEFT starts every lora_B at zero, so a fresh adapter changes nothing; draw them from N(0, std), seeded."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
