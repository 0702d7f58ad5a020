"""LoRA on Cumulo's own modules against PEFT on transformers, same tiny model and same adapter weights (fp32):
our saved adapter loads in PEFT with the same logits, PEFT's adapter loads in Cumulo with the same logits,
merged and unmerged agree, and the fused q/k/v and gate/up slices each get their own update."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers

from cumulo.errors import InvalidModel, SealMismatch
from cumulo.finetune.lora import apply_lora
from cumulo.finetune.peft_io import AdapterInfo, load_into, save_adapter
from cumulo.models.attention import AttentionContext
from cumulo.models.loader import load
from cumulo.models.registry import build_model
from tests.support.checkpoints import random_lora_b

IDS = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(1))  # longer than gemma's window


def _ours(directory: Path, rank: int = 4, alpha: float = 8.0, targets=None):
    loaded = load(directory)
    model = build_model(loaded.config, loaded.weights)
    kwargs = {} if targets is None else {"targets": targets}
    wrapped = apply_lora(model, rank, alpha, generator=torch.Generator().manual_seed(0), **kwargs)
    return model, wrapped, loaded.seal


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), AttentionContext(kv_cache=None)))


def _randomize_b(wrapped, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in wrapped.values():
            for b in w.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_saved_adapter_gives_peft_the_same_logits(make_model, tmp_path: Path, arch: str) -> None:
    directory = make_model(arch)
    model, wrapped, seal = _ours(directory)
    _randomize_b(wrapped)
    before = _logits(build_model(load(directory).config, load(directory).weights))
    ours = _logits(model)
    assert (ours - before).abs().max() > 1e-2  # the adapter changes the answer
    save_adapter(tmp_path / "adapter", wrapped, AdapterInfo(str(directory), seal, rank=4, alpha=8.0))

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = with_adapter(IDS[None]).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_peft_adapter_loads_into_cumulo_with_the_same_logits(make_model, tmp_path: Path) -> None:
    directory = make_model("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    with_adapter = peft.get_peft_model(hf, config)
    random_lora_b(with_adapter, 3, 0.2)
    with_adapter.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = with_adapter.eval()(IDS[None]).logits[0]

    model, wrapped, _ = _ours(directory, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    assert load_into(tmp_path / "peft", wrapped) is None  # a foreign adapter: no cumulo_adapter.json
    torch.testing.assert_close(_logits(model), ref, rtol=1e-4, atol=1e-4)


def test_merged_and_unmerged_agree(make_model) -> None:
    model, wrapped, _ = _ours(make_model("qwen3"))
    _randomize_b(wrapped)
    unmerged = _logits(model)
    for w in wrapped.values():
        w.merge()
    torch.testing.assert_close(_logits(model), unmerged, rtol=1e-4, atol=1e-4)


def test_each_fused_projection_gets_its_own_slice(make_model) -> None:
    """An update to k_proj's B moves only k's rows of qkv_proj's output, not q's or v's."""
    model, wrapped, _ = _ours(make_model("llama"))
    qkv = wrapped["model.layers.0.self_attn.qkv_proj"]
    assert [s.name for s in qkv.slices] == ["q_proj", "k_proj", "v_proj"]
    x = torch.randn(3, qkv.in_features)
    base = qkv.base(x)
    with torch.no_grad():
        qkv.lora_B["k_proj"].fill_(1.0)
        moved = (qkv(x) - base).abs().amax(dim=0) > 0
    k = qkv.slices[1]
    assert moved[k.start : k.start + k.size].all()
    assert not moved[: k.start].any() and not moved[k.start + k.size :].any()


def test_adapter_for_another_base_is_refused(make_model, tmp_path: Path) -> None:
    model, wrapped, seal = _ours(make_model("llama"))
    save_adapter(tmp_path / "a", wrapped, AdapterInfo("x", seal, rank=4, alpha=8.0))
    with pytest.raises(SealMismatch, match="trained on base"):
        load_into(tmp_path / "a", wrapped, base_seal="sha256:other")
    _, narrow, _ = _ours(make_model("llama"), targets=("q_proj",))
    with pytest.raises(InvalidModel, match="matches no targeted linear"):
        load_into(tmp_path / "a", narrow)
