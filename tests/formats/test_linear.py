"""`PackedLinear` and `quantize_model`: the module swap, the keep policy, both forward paths."""

from __future__ import annotations

import torch
from torch import nn

from cumulo.formats.linear import PackedLinear, QuantPolicy, quantize_model


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 64)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "q_proj": nn.Linear(64, 64, bias=True),
                    "down_proj": nn.Linear(64, 64, bias=False),
                    "input_layernorm": nn.LayerNorm(64),
                }
            )
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 50, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = h + layer["down_proj"](torch.relu(layer["q_proj"](layer["input_layernorm"](h))))
        return self.lm_head(self.norm(h))


def _model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().eval()


def test_quantize_model_swaps_linears_but_keeps_embeddings_head_and_norms() -> None:
    model = quantize_model(_model(), "ue8m0-fp8")
    assert isinstance(model.layers[0]["q_proj"], PackedLinear)
    assert isinstance(model.layers[1]["down_proj"], PackedLinear)
    assert type(model.lm_head) is nn.Linear
    assert type(model.embed_tokens) is nn.Embedding


def test_policy_patterns_override_the_default() -> None:
    model = quantize_model(_model(), "mxfp8", QuantPolicy(keep=("*down_proj",)))
    assert isinstance(model.lm_head, PackedLinear)
    assert type(model.layers[0]["down_proj"]) is nn.Linear
    only_q = quantize_model(_model(), "mxfp8", QuantPolicy.from_patterns(only=["*q_proj"]))
    assert type(only_q.layers[0]["down_proj"]) is nn.Linear
    assert isinstance(only_q.layers[0]["q_proj"], PackedLinear)


def test_quantized_model_output_stays_close_to_the_original() -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ref = _model()(ids)
    for fmt in ("ue8m0-fp8", "mxfp4", "nvfp4", "hif8", "bf16"):
        out = quantize_model(_model(), fmt)(ids)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 0.1, (fmt, rel)


def test_fused_and_reference_forward_agree(monkeypatch) -> None:
    layer = PackedLinear.from_linear(nn.Linear(64, 32), "ue8m0-fp8")
    x = torch.randn(2, 3, 64)
    fused = layer(x)
    assert layer._bound["cpu"] is not None  # the fused kernel did run
    layer._bound["cpu"] = None  # what PackedLinear does when no kernel exists for the device
    reference = layer(x)
    assert fused.shape == (2, 3, 32)
    assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-5)


def test_packed_linear_keeps_the_input_dtype_and_moves_with_to() -> None:
    layer = PackedLinear.from_linear(nn.Linear(64, 16), "mxfp6").to("cpu")
    y = layer(torch.randn(4, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert {n for n, _ in layer.named_buffers()} >= {"codes", "scales"}
    assert layer.codes.numel() == 16 * 48  # 6 bits per weight
