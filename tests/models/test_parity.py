"""Cumulo's architectures against Hugging Face transformers on the same weights: logits within tight tolerance
for tiny random configs of every family (saved as HF directories and loaded through Cumulo's own loader) and for
the real SmolLM2-135M; greedy continuations identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from cumulo.contracts import SamplingParams
from cumulo.engine.llm import LLM
from cumulo.engine.llm_engine import EngineConfig
from cumulo.models.attention import AttentionContext
from cumulo.models.loader import load
from cumulo.models.registry import build_model
from tests.support.checkpoints import hf_model, save_word_tokenizer

# checkpoints.SHAPE with a narrower MLP and more positions; Gemma gets seven layers, so that one (the sixth) is
# global while the others attend through a window (8) shorter than the test's ids (24)
PARITY_SHAPE = dict(intermediate_size=96, max_position_embeddings=256)
PARITY_ARCH = {
    "llama": {},
    "qwen2": dict(tie_word_embeddings=True, rope_theta=10000.0),
    "qwen3": dict(rope_theta=10000.0),
    "gemma3": dict(num_hidden_layers=7, sliding_window=8),
}


def _tiny_hf(arch: str) -> transformers.PreTrainedModel:
    model = hf_model(arch, 160, **PARITY_SHAPE, **PARITY_ARCH[arch])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.1)
    return model.eval()


def _our_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    hidden = model(ids, torch.arange(len(ids)), AttentionContext(kv_cache=None))
    return model.compute_logits(hidden)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_tiny_model_logits_match_transformers(tmp_path: Path, arch: str) -> None:
    hf = _tiny_hf(arch)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    save_word_tokenizer(tmp_path, 160)
    loaded = load(str(tmp_path))
    assert loaded.config.architecture == arch
    ours = build_model(loaded.config, loaded.weights)
    ids = torch.randint(0, 160, (24,), generator=torch.Generator().manual_seed(1))  # longer than the window
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got = _our_logits(ours, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_path: Path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()
    loaded = load(str(smollm2_path))
    return hf, loaded


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_pair) -> None:
    hf, loaded = smollm2_pair
    ours = build_model(loaded.config, dict(loaded.weights))
    ids = torch.tensor(loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got = _our_logits(ours, ids)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=2e-3)


@pytest.mark.slow
def test_smollm2_greedy_continuation_matches_transformers_for_32_tokens(smollm2_pair, smollm2_path) -> None:
    from cumulo.engine.factory import create_engine

    hf, loaded = smollm2_pair
    prompt = loaded.tokenizer.encode("Once upon a time, in a small village by the sea,")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    engine = create_engine(str(smollm2_path), EngineConfig(device="cpu", dtype="float32", kv_cache_gib=0.25))
    [final] = LLM(engine).generate([prompt], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    assert final.token_ids == ref[0, len(prompt) :].tolist()
