"""PNG charts for the chip CLI: a metric per chip grouped by format, and chips' figures relative to the first.

matplotlib is imported inside the functions with the non-interactive Agg backend, so plotting works headless
and `import cumulo.chips` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cumulo.chips.catalog import Chip
from cumulo.chips.predict import Prediction

METRICS = {
    "decode_tok_s": "decode tokens/s",
    "prefill_tok_s": "prefill tokens/s",
    "tokens_per_joule": "decode tokens per joule",
    "usd_per_million_tokens": "USD per million output tokens",
}


def metric_value(p: Prediction, metric: str) -> float:
    if metric == "tokens_per_joule":
        return 1.0 / p.joules_per_token if p.joules_per_token else 0.0
    value = getattr(p, metric)
    return float(value) if value is not None else 0.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_predictions(preds: Sequence[Prediction], metric: str, path: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per chip, one bar per format. Emulated formats are hatched."""
    plt = _pyplot()
    chips = list(dict.fromkeys(p.chip for p in preds))
    formats = list(dict.fromkeys(p.format for p in preds))
    width = 0.8 / max(len(formats), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(chips) + 2), 4.2))
    for i, fmt in enumerate(formats):
        xs, ys, hatches = [], [], []
        for j, chip in enumerate(chips):
            p = next((q for q in preds if q.chip == chip and q.format == fmt), None)
            if p is None:
                continue
            xs.append(j + (i - (len(formats) - 1) / 2) * width)
            ys.append(metric_value(p, metric))
            hatches.append("" if p.native else "//")
        bars = ax.bar(xs, ys, width, label=fmt)
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
    ax.set_xticks(range(len(chips)), chips, rotation=30, ha="right")
    ax.set_ylabel(METRICS.get(metric, metric))
    if preds and metric in ("decode_tok_s", "prefill_tok_s", "tokens_per_joule"):
        ax.set_yscale("log")
    ax.set_title(title or f"{preds[0].model}: {METRICS.get(metric, metric)} (hatched = emulated format)")
    ax.legend(title="format", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_compare(chips: Sequence[Chip], keys: Sequence[str], path: str | Path) -> Path:
    """Bars of each figure relative to the first chip (1.0 = same as the first)."""
    plt = _pyplot()
    base = chips[0]
    width = 0.8 / max(len(chips), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(keys) + 2), 4.0))
    for i, chip in enumerate(chips):
        ratios = []
        for key in keys:
            a, b = base.get(key), chip.get(key)
            ratios.append(b / a if a and b else 0.0)
        ax.bar(
            [k + (i - (len(chips) - 1) / 2) * width for k in range(len(keys))], ratios, width, label=chip.id
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(keys)), keys, rotation=20, ha="right")
    ax.set_ylabel(f"relative to {base.id}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
