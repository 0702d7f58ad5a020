"""python -m bench.edge: EfficientNet-Lite0 frames/s in int8 / mxint8 / fp8 against fp32 on this CPU, top-1
agreement on the photo set, and bytes per frame sent as a result envelope against the same frame as a JPEG.

Timing interleaves the formats round by round and keeps each one's best round, so a neighbour's burst of load
hits them alike; the load average is recorded with the figures. Backlog drain rate and frame -> database
latency through Mosquitto: `python -m bench.edge.fleet`.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from cumulo.contracts.edge import Envelope, ModelRef, model_id
from cumulo.edge.calibrate import calibration_set, quantize_calibrated
from cumulo.edge.photos import photo, photo_set
from cumulo.edge.pointwise import quantize_vision_net
from cumulo.edge.vision import load_pretrained, preprocess

FORMATS = ("fp32", "int8", "mxint8", "fp8", "int8+gptq", "mxint8+gptq")


def frames_per_s(nets: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    best = dict.fromkeys(nets, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds):
            for name, net in nets.items():
                start = time.perf_counter()
                net(x)
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: x.shape[0] / t for name, t in best.items()}


def bytes_per_frame() -> dict[str, float]:
    """A result envelope as the agent sends it (its model by the 12-hex `mid`) against the same frame as a JPEG
    (quality 85); also the first result of a model on a connection, which carries the full reference."""
    from PIL import Image

    image = photo("chelsea")
    jpeg = io.BytesIO()
    Image.fromarray(image.numpy()).save(jpeg, format="JPEG", quality=85)
    sha = "0" * 64
    result = Envelope(
        device_id="cam-1", seq=123456, time=datetime.now(UTC), kind="event", mid=model_id(sha), auth="x" * 43,
        body={"class": 282, "label": "tiger cat", "score": 0.39},
    )  # fmt: skip
    full = result.model_copy(
        update={"mid": None, "model": ModelRef(name="efficientnet-lite0", version="1", sha256=sha)}
    )
    size, jpeg_size = len(result.to_bytes()), len(jpeg.getvalue())
    return {
        "jpeg": jpeg_size,
        "result": size,
        "ratio": jpeg_size / size,
        "result_full_model": len(full.to_bytes()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1, help="frames per forward (a camera sends 1)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/edge.json"))
    parser.add_argument(
        "--crops",
        type=int,
        default=6,
        help="agreement crops per photo (6: the 120-crop set; 24 with --seed 1: 480)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the agreement crops")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_pretrained()
    nets = {f: quantize_vision_net(copy.deepcopy(base), f) for f in FORMATS if "+" not in f}
    calibration = calibration_set()  # GPTQ rounding on photos disjoint from the agreement set (calibrate.py)
    for f in FORMATS:
        if f.endswith("+gptq"):
            nets[f] = quantize_calibrated(base, f.removesuffix("+gptq"), calibration)
    frame = preprocess(photo("chelsea"))[None].repeat(args.batch, 1, 1, 1)
    load_before = os.getloadavg()
    fps = frames_per_s(nets, frame.contiguous(memory_format=torch.channels_last), args.rounds)
    load_after = os.getloadavg()
    images = photo_set(args.crops, args.seed).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = {f: net(images) for f, net in nets.items()}
    top1 = logits["fp32"].argmax(-1)
    confident = logits["fp32"].softmax(-1).amax(-1) > 0.5
    record = {
        "threads": args.threads, "batch": args.batch, "load_avg_before": load_before, "load_avg_after": load_after,
        "frames_per_s": fps, "speedup_vs_fp32": {f: fps[f] / fps["fp32"] for f in FORMATS},
        "top1_agreement": {f: float((logits[f].argmax(-1) == top1).float().mean()) for f in FORMATS},
        "top1_agreement_confident": {
            f: float((logits[f].argmax(-1)[confident] == top1[confident]).float().mean()) for f in FORMATS
        },
        "images": len(images), "confident_images": int(confident.sum()), "bytes_per_frame": bytes_per_frame(),
    }  # fmt: skip
    print(f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'format':12} {'frames/s':>9} {'x fp32':>7} {'top-1 agree':>12} {'(confident)':>12}")
    for f in FORMATS:
        print(
            f"{f:12} {fps[f]:9.1f} {record['speedup_vs_fp32'][f]:7.2f} "
            f"{record['top1_agreement'][f]:12.3f} {record['top1_agreement_confident'][f]:12.3f}"
        )
    b = record["bytes_per_frame"]
    print(f"bytes per frame: result {b['result']} vs JPEG {b['jpeg']} ({b['ratio']:.0f}x smaller); the first of a "
          f"model on a connection {b['result_full_model']}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    _plot(record, Path("docs/img/edge.png"))


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    speed = record["speedup_vs_fp32"]
    colours = {"fp32": "grey", "fp8": "tab:orange"}
    ax.bar(list(speed), list(speed.values()), color=[colours.get(f, "tab:blue") for f in speed])
    ax.axhline(1.8, ls="--", color="red", label="target 1.8x")
    ax.set_ylabel("frames/s vs fp32 (same run)")
    ax.set_title(
        f"EfficientNet-Lite0, {record['threads']} thread(s), load {record['load_avg_before'][0]:.0f}"
    )
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
