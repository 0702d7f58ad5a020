"""`cumulo chips`: the chip catalog, export-control metrics, performance predictions and local calibration.

    cumulo chips list | show CHIP | compare A B ... | predict MODEL --chip C --format F --batch B | calibrate

Every verb takes --json for scripts; `compare` and `predict` take --plot FILE.png.
"""

from __future__ import annotations

import argparse
import json
import sys

COMPARE_KEYS = [
    "bf16_tflops",
    "fp8_tflops",
    "fp4_tflops",
    "memory_gb",
    "memory_bandwidth_gbs",
    "interconnect_gbs",
    "power_w",
    "price_usd",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chips",
        help="chip catalog, export-control metrics and performance predictions",
        description="Chip catalog with sources, TPP/3A090 estimates (not legal advice), "
        "roofline predictions, and calibration of this machine as the 'local' chip.",
    )
    verbs = p.add_subparsers(dest="chips_verb", metavar="VERB")
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])

    q = verbs.add_parser("list", help="every chip with headline figures and its 2023 export class")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_list)

    q = verbs.add_parser("show", help="every figure of one chip with its source and provenance")
    q.add_argument("chip")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_show)

    q = verbs.add_parser("compare", help="chips side by side, with ratios to the first")
    q.add_argument("chips", nargs="+", metavar="CHIP")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--plot", metavar="FILE.png", help="draw each figure relative to the first chip")
    q.set_defaults(func=cmd_compare)

    q = verbs.add_parser("predict", help="roofline prediction: tokens/s, TTFT, TPOT, J/token, USD/Mtok")
    q.add_argument("model", help="preset (llama-3.1-8b, qwen2.5-72b, deepseek-v3, ...) or a model path")
    q.add_argument("--chip", action="append", required=True, help="chip id; repeat or comma-separate")
    q.add_argument("--format", action="append", default=None, help="weight format (default bf16); repeatable")
    q.add_argument("--batch", type=int, default=1, help="concurrent sequences (default 1)")
    q.add_argument("--context", type=int, default=1024, help="tokens per sequence: prompt = KV length")
    q.add_argument("--n-chips", type=int, default=1, help="chips sharing the model (default 1)")
    q.add_argument(
        "--parallel",
        choices=["tp", "pp", "ep"],
        default="tp",
        help="tensor, pipeline or expert parallel (MoE)",
    )
    q.add_argument("--redundant-experts", type=int, default=0, help="ep: extra expert copies (EPLB)")
    q.add_argument(
        "--mtp-tokens", type=int, default=0, help="draft tokens per decode step (multi-token prediction)"
    )
    q.add_argument("--mtp-acceptance", type=float, default=0.0, help="share of draft tokens accepted")
    q.add_argument(
        "--emulation",
        choices=["fused", "dequant-at-load", "dequant-per-step"],
        default="fused",
        help="cost model for formats the chip lacks (default fused dequant)",
    )
    q.add_argument(
        "--compute-dtype",
        choices=["bf16", "fp32", "fp8"],
        default=None,
        help="dtype emulated formats are expanded into (default: the best the chip holds exactly)",
    )
    q.add_argument("--json", action="store_true", help="print JSON (one object, or a list for several)")
    q.add_argument("--plot", metavar="FILE.png", help="bar chart of --metric per chip and format")
    q.add_argument(
        "--metric",
        default="decode_tok_s",
        choices=["decode_tok_s", "prefill_tok_s", "tokens_per_joule", "usd_per_million_tokens"],
    )
    q.set_defaults(func=cmd_predict)

    q = verbs.add_parser("calibrate", help="measure this machine and store it as the 'local' chip")
    q.add_argument("--device", default="cpu", help="torch device to measure (default cpu)")
    q.add_argument("--quick", action="store_true", help="small sizes: a rough answer in a few seconds")
    q.add_argument(
        "--formats",
        action="append",
        default=None,
        help="also measure Cumulo's packed linear in these compact formats (e.g. mxfp4,nvfp4)",
    )
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_calibrate)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _print_table(title: str, columns: list[str], rows: list[list[str]], caption: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption or None, caption_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    Console(width=max(150, Console().width)).print(table)


def _dump(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def cmd_list(args: argparse.Namespace) -> int:
    from cumulo.chips.catalog import load_catalog
    from cumulo.chips.export import DISCLAIMER, classify

    cat = load_catalog()
    if args.json:
        _dump([{**c.to_dict(), "export": classify(c).to_dict()} for c in cat.chips.values()])
        return 0
    rows = []
    for c in cat.chips.values():
        e = classify(c)
        rows.append(
            [
                c.id,
                c.vendor,
                str(c.year),
                c.kind,
                _num(c.get("bf16_tflops")),
                _num(c.get("fp8_tflops")),
                _num(c.get("fp4_tflops")),
                _num(c.memory_gb),
                _num(c.memory_bandwidth_gbs),
                _num(c.power_w),
                _num(e.tpp),
                e.rule_2023.split(" (")[0],
            ]
        )
    _print_table(
        "Chip catalog (dense TFLOPS; racks are totals)",
        [
            "chip",
            "vendor",
            "year",
            "kind",
            "bf16",
            "fp8",
            "fp4",
            "mem GB",
            "BW GB/s",
            "W",
            "TPP",
            "Oct 2023 rule",
        ],
        rows,
        DISCLAIMER,
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from cumulo.chips.catalog import load_catalog
    from cumulo.chips.export import DISCLAIMER, RULE_2022, RULE_2023, classify

    cat = load_catalog()
    chip = cat.get(args.chip)
    e = classify(chip)
    if args.json:
        out = chip.to_dict()
        out["export"] = e.to_dict()
        out["sources"] = {
            sid: {"title": s.title, "url": s.url, "date": s.date, "checked": s.checked}
            for sid, s in cat.sources.items()
            if any(f.source == sid for f in chip.figures.values())
        }
        _dump(out)
        return 0
    rows = [[k, _num(f.value, 4), f.provenance, f.source, f.note] for k, f in chip.figures.items()]
    _print_table(
        f"{chip.name} ({chip.id}), {chip.vendor} {chip.year}, {chip.kind}"
        + (f" of {chip.units}" if chip.units > 1 else ""),
        ["figure", "value", "provenance", "source", "note"],
        rows,
        f"native formats: {', '.join(chip.native)}",
    )
    for sid in dict.fromkeys(f.source for f in chip.figures.values()):
        s = cat.sources[sid]
        print(f"  [{sid}] {s.title} ({s.date}) {s.url}{'' if s.checked else '  (not re-read)'}")
    pd = "-" if e.performance_density is None else f"{e.performance_density:.2f}"
    print(f"\nTPP {_num(e.tpp)} (from {e.tpp_format}), performance density {pd}")
    print(f"  {RULE_2022}\n    -> {e.rule_2022}\n  {RULE_2023}\n    -> {e.rule_2023}\n{DISCLAIMER}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cumulo.chips.catalog import load_catalog
    from cumulo.chips.export import classify

    cat = load_catalog()
    chips = [cat.get(c) for c in _split(args.chips)]
    base = chips[0]
    if args.plot:
        from cumulo.chips.plot import plot_compare

        plot_compare(chips, COMPARE_KEYS, args.plot)
    if args.json:
        _dump(
            [
                {
                    **c.to_dict(),
                    "export": classify(c).to_dict(),
                    "ratio_to_first": {
                        k: (c.get(k) / base.get(k) if c.get(k) and base.get(k) else None)
                        for k in COMPARE_KEYS
                    },
                }
                for c in chips
            ]
        )
        return 0
    rows = []
    for key in COMPARE_KEYS + ["tpp"]:
        vals = [classify(c).tpp if key == "tpp" else c.get(key) for c in chips]
        cells = [_num(vals[0])]
        for v in vals[1:]:
            ratio = f" ({v / vals[0]:.2f}x)" if v and vals[0] else ""
            cells.append(_num(v) + ratio)
        rows.append([key, *cells])
    _print_table("Chip comparison (ratio to the first chip)", ["figure", *[c.id for c in chips]], rows)
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cumulo.chips.predict import predict

    chips, formats = _split(args.chip), _split(args.format) or ["bf16"]
    preds = [
        predict(
            args.model,
            f,
            c,
            batch=args.batch,
            context=args.context,
            n_chips=args.n_chips,
            parallel=args.parallel,
            emulation=args.emulation,
            compute_dtype=args.compute_dtype,
            redundant_experts=args.redundant_experts,
            mtp_tokens=args.mtp_tokens,
            mtp_acceptance=args.mtp_acceptance,
        )
        for c in chips
        for f in formats
    ]
    if args.plot:
        from cumulo.chips.plot import METRICS, plot_predictions

        p0 = preds[0]
        plot_predictions(
            preds,
            args.metric,
            args.plot,
            f"{p0.model}, batch {p0.batch}, context {p0.context}: {METRICS[args.metric]}"
            " (hatched = emulated format)",
        )
    if args.json:
        _dump(preds[0].to_dict() if len(preds) == 1 else [p.to_dict() for p in preds])
        return 0
    rows = [
        [
            p.chip,
            p.format + ("" if p.native else "*"),
            _num(p.prefill_tok_s),
            _num(p.decode_tok_s),
            _num(p.ttft_s),
            _num(p.tpot_s * 1e3),
            str(p.max_sequences),
            _num(p.joules_per_token),
            _num(p.usd_per_million_tokens),
            p.bound,
        ]
        for p in preds
    ]
    p0 = preds[0]
    if p0.active_params < p0.total_params * 0.9:  # mixture of experts: a token multiplies only its experts
        print(
            f"{p0.model}: {p0.active_params / 1e9:.1f}B active of {p0.total_params / 1e9:.1f}B parameters "
            f"per token; all {p0.weights_gb:.0f} GB must be stored ({p0.weights_gb_per_chip:.1f} GB per chip)"
        )
    _print_table(
        f"{p0.model}: batch {p0.batch}, context {p0.context}, {p0.n_chips} chip(s) {p0.parallel}",
        [
            "chip",
            "format",
            "prefill tok/s",
            "decode tok/s",
            "TTFT s",
            "TPOT ms",
            "max seqs",
            "J/token",
            "USD/Mtok",
            "decode bound",
        ],
        rows,
        "* emulated format. Roofline estimate; assumptions in docs/chips.md.",
    )
    for p in preds:
        for note in p.notes:
            print(f"  {p.chip}/{p.format}: {note}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cumulo.chips.calibrate import calibrate
    from cumulo.chips.catalog import local_chip_path

    sizes = {"bandwidth_mb": 32, "matmul_n": 256, "min_time": 0.05, "repeats": 2} if args.quick else {}
    record = calibrate(args.device, formats=tuple(_split(args.formats)), **sizes)
    if args.json:
        _dump(record)
        return 0
    rows = [[k, _num(v["value"], 4), v.get("note", "")] for k, v in record.items() if isinstance(v, dict)]
    _print_table(
        f"local: {record['name']}",
        ["figure", "measured", "how"],
        rows,
        f"written to {local_chip_path()}; use --chip local",
    )
    return 0
