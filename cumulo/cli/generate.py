"""`cumulo generate` (one completion) and `cumulo chat` (interactive, streaming)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from cumulo.cli.options import add_head_option


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", help="a catalog name (see 'cumulo models'), a .gguf file or a Hugging Face-style directory"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda[:N], npu[:N], xpu, mps, ... (default: auto)")
    p.add_argument("--dtype", default="auto", help="weight dtype: auto, float32, bfloat16, float16")
    p.add_argument(
        "--format",
        default=None,
        metavar="F",
        help="convert weights on load to a compact format (ue8m0-fp8, mxfp8, mxfp4, nvfp4, ...)",
    )
    add_head_option(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length limit (default: the model's)"
    )


def _sampling_args(p: argparse.ArgumentParser, default_max: int) -> None:
    p.add_argument(
        "--max-tokens", type=int, default=default_max, help=f"tokens to generate (default {default_max})"
    )
    p.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy; default 0 for generate, 0.7 for chat"
    )
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate a completion for one prompt",
        description="Generate a completion for PROMPT and print it.",
    )
    _engine_args(gen)
    gen.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    _sampling_args(gen, 64)
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message with the chat template"
    )
    gen.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: text, token_ids, prompt_token_ids, finish_reason, timings",
    )
    gen.set_defaults(func=_generate)

    chat = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (streaming)",
        description="Interactive chat using the model's own chat template. "
        "Empty line or Ctrl-D quits; '/reset' clears the conversation.",
    )
    _engine_args(chat)
    _sampling_args(chat, 512)
    chat.add_argument("--system", default=None, help="a system message")
    chat.set_defaults(func=_chat)


def _build(args: argparse.Namespace):
    from cumulo.engine.factory import create_engine
    from cumulo.engine.llm_engine import EngineConfig

    config = EngineConfig(
        device=args.device,
        dtype=args.dtype,
        format=args.format,
        head=args.head,
        threads=args.threads,
        max_model_len=args.max_model_len,
    )
    return create_engine(args.model, config)


def _params(args: argparse.Namespace, default_temperature: float):
    from cumulo.contracts import SamplingParams

    temperature = default_temperature if args.temperature is None else args.temperature
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )


def _echo(out) -> None:
    if out.new_text:
        sys.stdout.write(out.new_text)
        sys.stdout.flush()


def _generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    t_load = time.perf_counter()
    engine = _build(args)
    load_s = time.perf_counter() - t_load
    tok = engine.tokenizer
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tok.encode(text, add_special_tokens=False)
    else:
        prompt_ids = tok.encode(prompt)
    params = _params(args, 0.0)
    from cumulo.engine.llm import LLM

    [final] = LLM(engine).generate([prompt_ids], params, on_output=None if args.json else _echo)
    if args.json:
        ttft = final.ttft or 0.0
        total = (final.finished_time or 0.0) - final.arrival_time
        decode = total - ttft
        n = len(final.token_ids)
        print(
            json.dumps(
                {
                    "model": engine.model_name,
                    "seal": engine.seal,
                    "device": str(engine.device),
                    "text": final.text,
                    "token_ids": final.token_ids,
                    "prompt_token_ids": final.prompt_token_ids,
                    "finish_reason": final.finish_reason,
                    "timings": {
                        "load_s": round(load_s, 4),
                        "ttft_s": round(ttft, 5),
                        "total_s": round(total, 5),
                        "prefill_tok_s": round(len(prompt_ids) / ttft, 2) if ttft else None,
                        "decode_tok_s": round((n - 1) / decode, 2) if n > 1 and decode > 0 else None,
                    },
                },
                ensure_ascii=False,
            )
        )
    else:
        sys.stdout.write("\n")
    return 0


def _chat(args: argparse.Namespace) -> int:
    engine = _build(args)
    tok = engine.tokenizer
    params = _params(args, 0.7)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(
        f"cumulo chat: {engine.model_name} on {engine.device}. Empty line or Ctrl-D quits, /reset clears.",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        prompt_ids = tok.encode(text, add_special_tokens=False)
        if len(prompt_ids) >= engine.max_model_len - 1:
            print(
                "cumulo: the conversation no longer fits the context; /reset to start over", file=sys.stderr
            )
            messages.pop()
            continue
        sys.stdout.write("assistant> ")
        from cumulo.engine.llm import LLM

        [reply] = LLM(engine).generate([prompt_ids], params, on_output=_echo)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply.text})
