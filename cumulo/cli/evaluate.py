"""`cumulo eval ppl`: perplexity of a model, optionally converted to a compact number format, on offline text."""

from __future__ import annotations

import argparse
import dataclasses
import json

from cumulo.cli.options import add_head_option

DEFAULT_CONTEXT = 512
DEFAULT_STRIDE = 256
DEFAULT_MAX_TOKENS = 4096


def register(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "eval",
        help="measure a model's accuracy (perplexity)",
        description="Measure a model's accuracy. Run 'cumulo eval ppl --help' for perplexity.",
    )
    verbs = evaluate.add_subparsers(dest="eval_verb", metavar="WHAT")
    ppl = verbs.add_parser(
        "ppl",
        help="sliding-window perplexity on English text available offline",
        description="Sliding-window perplexity (windows of --context tokens every --stride tokens; each token "
        "scored once). Default text: the prose of the Python reference manual that CPython ships in "
        "pydoc_data/topics.py (cleaned of code and grammar; see cumulo/evaluation/corpus.py), first "
        f"{DEFAULT_MAX_TOKENS} tokens. Lower is better; compare runs only with the same source hash.",
    )
    ppl.add_argument(
        "model", help="a catalog name (see 'cumulo models'), a .gguf file or a Hugging Face-style directory"
    )
    ppl.add_argument(
        "--format",
        default=None,
        metavar="F",
        help="convert weights to a compact format first (ue8m0-fp8, mxfp8, mxfp4, nvfp4, ...)",
    )
    add_head_option(ppl)
    ppl.add_argument(
        "--dtype",
        default="float32",
        help="weight dtype: float32 (default: the reference that formats are measured against), bfloat16, "
        "float16, or auto (what 'cumulo serve' would pick)",
    )
    ppl.add_argument("--device", default="auto", help="cpu, cuda[:N], npu[:N], xpu, mps, ... (default: auto)")
    ppl.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    ppl.add_argument(
        "--context", type=int, default=DEFAULT_CONTEXT, help=f"window length (default {DEFAULT_CONTEXT})"
    )
    ppl.add_argument(
        "--stride",
        type=int,
        default=DEFAULT_STRIDE,
        help=f"tokens between window starts, at most --context (default {DEFAULT_STRIDE})",
    )
    ppl.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"tokens of text to use, from its start (default {DEFAULT_MAX_TOKENS}; 0 = all of it)",
    )
    ppl.add_argument("--text", default=None, metavar="FILE", help="score this UTF-8 file instead")
    ppl.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: perplexity, tokens, format, model, seal, dtype, context, stride, source, "
        "seconds, ...",
    )
    ppl.set_defaults(func=_perplexity)
    evaluate.set_defaults(func=lambda args: evaluate.print_help() or 2)


def _perplexity(args: argparse.Namespace) -> int:
    from cumulo.evaluation.perplexity import run_perplexity

    report = run_perplexity(
        args.model,
        format=args.format,
        head=args.head,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        context=args.context,
        stride=args.stride,
        max_tokens=args.max_tokens or None,
        text_file=args.text,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(report)))
        return 0
    converted = f" as {report.format} (output head {report.head})" if report.format else ""
    print(f"model       {report.model}{converted} ({report.checkpoint}, {report.dtype} on {report.device})")
    print(f"text        {report.source}, {report.tokens} tokens scored")
    print(f"windows     {report.windows} of {report.context} tokens, stride {report.stride}")
    print(
        f"perplexity  {report.perplexity:.4f}  (mean NLL {report.nll:.4f} nats/token, {report.seconds:.1f} s)"
    )
    return 0
