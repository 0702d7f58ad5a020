"""Placement against GPUStack-style memory-fit binpack on simulated heterogeneous pools.

    python -m bench.pool.placement [--orders 8] [--seed 0]

Each pool mixes four or more catalog chips; the workload mixes prompt lengths (chat, RAG, code, short
classification) with an SLO each. Both strategies place the same deployments, one after the other, on the same
nodes (binpack in several node orders, since first fit depends on the order). Printed, measured in this run:
- goodput under the SLO (output tokens/s of replicas whose predicted TTFT and TPOT meet it; every deployment
  serves llama-3.1-8b or qwen2.5-72b, so the sum adds like with like), cost per hour of the
  devices used (catalog price amortised plus power, as `predict` costs them), and the ratios place / binpack;
- an ablation with `place` held to bf16, to show what the format choice alone is worth;
- the cheapest sub-pool on which `place` still reaches binpack's goodput (cost at equal goodput);
- a second judge: a "truth" that differs from the placer's model (other efficiency assumptions and a hidden
  speed factor per chip), with and without `Corrections` learned from one round of measurements.

Honesty: in the first three figures the SAME performance model (`cumulo.chips.predict`) places and judges,
so `place` is judged by the very model it optimises; only the second judge is independent of it, and it is
itself a model, not hardware. Nothing here runs an engine. The issue's target: at least 1.3x goodput under the
SLO, or the same goodput at 30% lower cost (HexGen-2 and Melange report that range).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, replace

from cumulo.chips.predict import Assumptions, predict
from cumulo.cluster.placement import (
    Corrections,
    DeploymentSpec,
    NodeSpec,
    Placement,
    PlacementError,
    binpack,
    place,
)

POOLS: dict[str, list[NodeSpec]] = {
    "mixed-datacenter": [
        NodeSpec("cpu-0", "cpu-avx512-32core", 1, 230.0),
        NodeSpec("cpu-1", "cpu-avx512-32core", 1, 230.0),
        NodeSpec("l20-0", "l20", 1, 44.0),
        NodeSpec("l20-1", "l20", 1, 44.0),
        NodeSpec("a100-0", "a100", 1, 76.0),
        NodeSpec("a100-1", "a100", 1, 76.0),
        NodeSpec("910b-0", "ascend-910b", 1, 60.0),
        NodeSpec("910b-1", "ascend-910b", 1, 60.0),
        NodeSpec("h100-0", "h100-sxm", 1, 76.0),
    ],
    "china-pool": [
        NodeSpec("910b-x4", "ascend-910b", 4, 60.0),
        NodeSpec("910b-0", "ascend-910b", 1, 60.0),
        NodeSpec("h20-0", "h20", 1, 90.0),
        NodeSpec("h20-1", "h20", 1, 90.0),
        NodeSpec("4090-0", "rtx-4090", 1, 22.0),
        NodeSpec("4090-1", "rtx-4090", 1, 22.0),
        NodeSpec("4090-2", "rtx-4090", 1, 22.0),
        NodeSpec("cpu-0", "cpu-avx512-32core", 1, 230.0),
    ],
    "gpu-generations": [
        NodeSpec("a100-x2", "a100", 2, 76.0),
        NodeSpec("h100-0", "h100-sxm", 1, 76.0),
        NodeSpec("l20-0", "l20", 1, 44.0),
        NodeSpec("l20-1", "l20", 1, 44.0),
        NodeSpec("5090-0", "rtx-5090", 1, 30.0),
        NodeSpec("5090-1", "rtx-5090", 1, 30.0),
        NodeSpec("mi300x-0", "mi300x", 1, 180.0),
    ],
}

WORKLOAD: list[DeploymentSpec] = [
    DeploymentSpec("llama-3.1-8b", 3, ttft_slo_ms=500, tpot_slo_ms=50, prompt_tokens=512, output_tokens=256),
    DeploymentSpec(
        "llama-3.1-8b", 2, ttft_slo_ms=1500, tpot_slo_ms=60, prompt_tokens=4096, output_tokens=256
    ),
    DeploymentSpec(
        "llama-3.1-8b", 1, ttft_slo_ms=1000, tpot_slo_ms=40, prompt_tokens=2048, output_tokens=512
    ),
    DeploymentSpec("llama-3.1-8b", 2, ttft_slo_ms=150, tpot_slo_ms=30, prompt_tokens=128, output_tokens=16),
    DeploymentSpec(
        "qwen2.5-72b", 1, ttft_slo_ms=3000, tpot_slo_ms=100, prompt_tokens=1024, output_tokens=256
    ),
]


@dataclass
class Outcome:
    placements: list[tuple[DeploymentSpec, Placement]]
    unplaced: int

    def goodput(self) -> float:
        return sum(p.predicted_goodput_tok_s for _, p in self.placements)

    def cost(self, nodes: list[NodeSpec]) -> float:
        """USD per hour of the devices in use (a device two replicas share counts once)."""
        per_device = {n.name: _device_usd(n) for n in nodes}
        devices = {n.name: n.devices for n in nodes}
        used: dict[str, int] = {}
        for _, p in self.placements:
            used[p.node] = min(devices[p.node], used.get(p.node, 0) + p.devices)
        return sum(per_device[name] * k for name, k in used.items())


def _device_usd(node: NodeSpec) -> float:
    if node.usd_per_hour is not None:
        return node.usd_per_hour
    pred = predict("llama-3.1-8b", "bf16", node.chip)
    return (pred.usd_per_million_tokens or 0.0) * pred.decode_tok_s * 3600 / 1e6


def run(strategy, nodes: list[NodeSpec], corrections: Corrections | None = None) -> Outcome:
    """Place the workload's deployments one after the other, each seeing the memory the earlier ones took."""
    used: dict[str, float] = {}
    out: list[tuple[DeploymentSpec, Placement]] = []
    unplaced = 0
    for dep in WORKLOAD:
        try:
            got = strategy(dep, nodes, used, corrections) if corrections else strategy(dep, nodes, used)
        except PlacementError:
            unplaced += dep.replicas
            continue
        for p in got:
            used[p.node] = used.get(p.node, 0.0) + p.weights_gb + p.kv_gb
            out.append((dep, p))
    return Outcome(out, unplaced)


def bf16_place(dep: DeploymentSpec, nodes: list[NodeSpec], used: dict[str, float]) -> list[Placement]:
    return place(replace(dep, format=dep.format or "bf16"), nodes, used)


def cheapest_equal_goodput(nodes: list[NodeSpec], target: float) -> tuple[list[NodeSpec], Outcome]:
    """Drop nodes greedily (the drop that saves the most per hour first) while `place` keeps `target`."""
    best = run(place, nodes)
    while True:
        trials = []
        for node in nodes:
            fewer = [n for n in nodes if n.name != node.name]
            got = run(place, fewer)
            if got.unplaced == 0 and got.goodput() >= target:
                trials.append((got.cost(fewer), fewer, got))
        if not trials:
            return nodes, best
        _, nodes, best = min(trials, key=lambda t: t[0])


# -- the second judge: a truth the placer does not know --------------------------------------------------------
TRUTH = Assumptions(compute_efficiency=0.45, bandwidth_efficiency=0.65)


def hidden_factors(nodes: list[NodeSpec], seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {chip: rng.uniform(0.5, 1.2) for chip in sorted({n.chip for n in nodes})}


def true_goodput(dep: DeploymentSpec, p: Placement, speed: dict[str, float]) -> float:
    """Goodput by the truth: the largest batch up to the replica's planned one that meets the SLO there (a router
    that admits no more), times its tokens/s."""
    seq = dep.prompt_tokens + dep.output_tokens
    par = "pp" if p.devices > 1 else "tp"

    def at(batch: int) -> tuple[bool, float]:
        first = predict(
            dep.model, p.format, p.chip, batch, dep.prompt_tokens, p.devices, par, assumptions=TRUTH
        )
        full = predict(dep.model, p.format, p.chip, batch, seq, p.devices, par, assumptions=TRUTH)
        ttft, tpot = first.ttft_s * 1e3 / speed[p.chip], full.tpot_s * 1e3 / speed[p.chip]
        ok = (dep.ttft_slo_ms is None or ttft <= dep.ttft_slo_ms) and (
            dep.tpot_slo_ms is None or tpot <= dep.tpot_slo_ms
        )
        return ok, batch / tpot * 1e3

    lo, hi = 0, max(p.max_sequences, 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if at(mid)[0] else (lo, mid - 1)
    return at(lo)[1] if lo else 0.0


def measured_corrections(outcome: Outcome, speed: dict[str, float]) -> Corrections:
    """One round of measurements: each replica's true decode speed at batch 1 against the prediction."""
    corrections = Corrections()
    for dep, p in outcome.placements:
        seq, par = dep.prompt_tokens + dep.output_tokens, ("pp" if p.devices > 1 else "tp")
        guess = predict(dep.model, p.format, p.chip, 1, seq, p.devices, par)
        truth = predict(dep.model, p.format, p.chip, 1, seq, p.devices, par, assumptions=TRUTH)
        corrections.record(
            dep.model, p.chip, p.format, truth.decode_tok_s * speed[p.chip], guess.decode_tok_s
        )
    return corrections


def judged(outcome: Outcome, speed: dict[str, float]) -> float:
    return sum(true_goodput(dep, p, speed) for dep, p in outcome.placements)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=8, help="node orders tried for binpack (first fit)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(__doc__.split("Honesty:")[1].split("\n\n")[0].replace("\n", " ").strip().join(("Honesty: ", "")))
    print()
    start = time.perf_counter()
    for name, nodes in POOLS.items():
        chips = sorted({n.chip for n in nodes})
        print(f"== {name}: {len(nodes)} nodes, chips {', '.join(chips)}")
        rng = random.Random(args.seed)
        placed = run(place, nodes)
        g_place, c_place = placed.goodput(), placed.cost(nodes)
        bf16 = run(bf16_place, nodes)
        ratios, cost_ratios, packs = [], [], []
        for _ in range(args.orders):
            order = nodes[:]
            rng.shuffle(order)
            packed = run(binpack, order)
            packs.append(packed)
            ratios.append(g_place / packed.goodput() if packed.goodput() else float("inf"))
            cost_ratios.append(c_place / packed.cost(nodes) if packed.cost(nodes) else float("nan"))
        g_pack = sum(p.goodput() for p in packs) / len(packs)
        c_pack = sum(p.cost(nodes) for p in packs) / len(packs)
        print(
            f"  place:   goodput {g_place:9.0f} tok/s under the SLO, {c_place:6.2f} USD/h, "
            f"{placed.unplaced} replica(s) unplaced"
        )
        print(
            f"  binpack: goodput {g_pack:9.0f} tok/s (mean of {args.orders} node orders), {c_pack:6.2f} USD/h, "
            f"{sum(p.unplaced for p in packs) / len(packs):.1f} replica(s) unplaced"
        )
        print(
            f"  goodput place/binpack: mean {sum(ratios) / len(ratios):.2f}x, "
            f"min {min(ratios):.2f}x, max {max(ratios):.2f}x; cost place/binpack {sum(cost_ratios) / len(cost_ratios):.2f}"
        )
        print(
            f"  ablation, place held to bf16: goodput {bf16.goodput():.0f} tok/s, "
            f"{bf16.goodput() / g_pack:.2f}x binpack (node choice and SLO-sized caches only)"
        )
        fewer, cheap = cheapest_equal_goodput(nodes, g_pack)
        print(
            f"  equal goodput: place reaches binpack's mean ({g_pack:.0f} tok/s) on {len(fewer)} of {len(nodes)} "
            f"nodes at {cheap.cost(fewer):.2f} USD/h: {cheap.cost(fewer) / c_pack:.2f}x binpack's cost"
        )
        speed = hidden_factors(nodes, args.seed)
        t_place, t_pack = judged(placed, speed), sum(judged(p, speed) for p in packs) / len(packs)
        corrected = run(place, nodes, measured_corrections(placed, speed))
        t_corr = judged(corrected, speed)
        print(
            f"  second judge (other efficiencies, hidden per-chip speed {min(speed.values()):.2f}-"
            f"{max(speed.values()):.2f}x): place {t_place:.0f}, with corrections {t_corr:.0f}, binpack {t_pack:.0f} "
            f"tok/s -> {t_place / t_pack:.2f}x, corrected {t_corr / t_pack:.2f}x"
        )
        print()
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
