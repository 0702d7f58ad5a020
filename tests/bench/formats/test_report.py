"""The accuracy-and-speed benchmark's arithmetic: target verdicts, deltas against fp32, weight bytes per token."""

from __future__ import annotations

import torch
from torch import nn

from bench.formats.report import targets
from bench.formats.worker import weight_bytes
from cumulo.formats.linear import PackedLinear
from cumulo.formats.quantize import quantize


def _rows() -> list[dict]:
    return [
        {"format": "float32", "perplexity": 20.0, "decode_tok_s": 10.0, "peak_rss_mib": 1000.0},
        {"format": "ue8m0-fp8", "perplexity": 20.1, "decode_tok_s": 20.0, "peak_rss_mib": 500.0},
        {"format": "mxfp8", "perplexity": 20.4, "decode_tok_s": 15.0, "peak_rss_mib": 520.0},
        {"format": "mxfp4", "perplexity": 30.0, "decode_tok_s": 30.0, "peak_rss_mib": 400.0},
    ]


def test_targets_compare_against_fp32_and_llama_with_each_bound_direction() -> None:
    rows = _rows()
    verdicts = {t["target"]: (round(t["value"], 3), t["met"]) for t in targets(rows, {"decode_tok_s": 25.0})}
    assert verdicts["ue8m0-fp8 decode / Cumulo fp32 decode"] == (2.0, True)
    assert verdicts["ue8m0-fp8 decode / llama.cpp Q4_1 decode"] == (0.8, False)
    assert verdicts["mxfp4 decode / llama.cpp Q4_1 decode"] == (1.2, False)
    assert verdicts["ue8m0-fp8 peak RSS / fp32 peak RSS"] == (0.5, False)
    assert verdicts["ue8m0-fp8 perplexity delta %"] == (0.5, True)
    assert verdicts["mxfp8 perplexity delta %"] == (2.0, False)
    assert rows[1]["speedup_vs_fp32"] == 2.0


def test_targets_without_llama_are_not_measured_rather_than_failed() -> None:
    verdicts = {t["target"]: t for t in targets(_rows(), None)}
    assert verdicts["mxfp4 decode / llama.cpp Q4_1 decode"]["met"] is None
    assert verdicts["mxfp4 decode / llama.cpp Q4_1 decode"]["value"] is None


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.proj = PackedLinear(quantize(torch.randn(32, 32), "ue8m0-fp8"))
        self.dense = nn.Linear(32, 16, bias=False)
        self.lm_head = nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in SmolLM2


def test_weight_bytes_counts_packed_codes_and_a_tied_embedding_once() -> None:
    model = _Tied()
    got = weight_bytes(model)
    packed = model.proj.packed.nbytes
    assert got["linear_bytes"] == packed + 32 * 16 * 4
    assert got["linear_weights"] == 32 * 32 + 32 * 16
    assert got["bytes_per_token"] == got["linear_bytes"] + 64 * 32 * 4
    assert got["weights"] == 32 * 32 + 32 * 16 + 64 * 32
