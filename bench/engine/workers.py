"""The in-process systems of the engine benchmark, each measured inside its own child process.

Every runner answers the same three questions on the same token ids: how fast does one stream decode, how long
until the first token of a long prompt, and how many output tokens per second come out with C sequences at once.
Heavy imports (torch, transformers, llama_cpp, cumulo) happen inside each runner: the llama-cpp-python worker
runs in the anchors' venv, which has no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bench.common import SystemResult, Workload, emit, prompt_token_ids

# generate(prompts, max_tokens) runs them to completion with ignore_eos and greedy sampling, and returns
# (seconds from call to first token of the first request or None, seconds from first to last token or None).
Generate = Callable[[list[list[int]], int], tuple[float | None, float | None]]


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(system: str, generate: Generate, workload: Workload, batched: bool, result: SystemResult) -> None:
    """The common protocol: warm up, then decode, prefill and throughput. Fills `result` in place."""
    generate([prompt_token_ids(8, seed=999)], 4)  # warm-up: thread pools, allocator, lazy init

    # Decode: tokens after the first, over the time after the first. Where a system cannot time its first token,
    # subtract a 1-token run of an equal-length prompt (which is then prefill + one step). Best of `repeats`.
    n = workload.decode_tokens
    best_decode_s = best_ttft_s = float("inf")
    for rep in range(workload.repeats):
        prompt = prompt_token_ids(workload.decode_prompt_len, seed=1 + 10 * rep)
        start = time.perf_counter()
        _, decode_s = generate([prompt], n)
        total_s = time.perf_counter() - start
        if decode_s is None:
            one = prompt_token_ids(workload.decode_prompt_len, seed=2 + 10 * rep)
            decode_s = total_s - _timed(lambda one=one: generate([one], 1))
        best_decode_s = min(best_decode_s, decode_s)
        # TTFT on the long prompt: the whole call for one output token (what a client would wait).
        long_prompt = prompt_token_ids(workload.prefill_prompt_len, seed=3 + 10 * rep)
        best_ttft_s = min(best_ttft_s, _timed(lambda long_prompt=long_prompt: generate([long_prompt], 1)))
    result.decode_tok_s = (n - 1) / best_decode_s
    result.ttft_s = best_ttft_s
    result.prefill_tok_s = workload.prefill_prompt_len / best_ttft_s

    for c in workload.concurrency:
        if c > 1 and not batched:
            continue
        prompts = [prompt_token_ids(workload.batch_prompt_len, seed=100 + c * 1000 + i) for i in range(c)]
        seconds = _timed(lambda prompts=prompts: generate(prompts, workload.batch_output_len))
        result.throughput_tok_s[str(c)] = c * workload.batch_output_len / seconds
    if not batched:
        result.notes.append("runs one sequence at a time: throughput only at concurrency 1")


def cumulo_generate(model: Path, threads: int, dtype: str) -> Generate:
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    try:
        from cumulo.contracts import SamplingParams  # noqa: PLC0415
        from cumulo.engine.llm import LLM  # noqa: PLC0415
    except ImportError as exc:
        raise RuntimeError(f"Cumulo's engine is not importable yet (cumulo.engine.llm.LLM): {exc}") from exc
    llm = LLM(str(model), device="cpu", dtype=dtype, threads=threads)

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[float | None, float | None]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params)
        wrong = [len(o.token_ids) for o in outs if len(o.token_ids) != max_tokens]
        if wrong:
            raise RuntimeError(f"asked for {max_tokens} tokens with ignore_eos, got {wrong[:4]}")
        m = outs[0]
        if m.first_token_time is None or m.finished_time is None:
            return None, None
        return m.first_token_time - m.arrival_time, m.finished_time - m.first_token_time

    return generate


def hf_generate(model: Path, threads: int) -> Generate:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.set_num_threads(threads)
    # transformers dequantizes the GGUF's Q4_1 tensors to fp32 on load.
    hf = AutoModelForCausalLM.from_pretrained(
        str(model.parent), gguf_file=model.name, torch_dtype=torch.float32
    )
    hf.eval()

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[float | None, float | None]:
        ids = torch.tensor(prompts)  # equal lengths: no padding needed
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        if out.shape[1] - ids.shape[1] != max_tokens:
            raise RuntimeError(f"asked for {max_tokens} tokens, got {out.shape[1] - ids.shape[1]}")
        return None, None

    return generate


def llama_cpp_python_generate(model: Path, threads: int, n_ctx: int) -> Generate:
    from llama_cpp import Llama  # noqa: PLC0415

    from bench.anchors import binding_without_repack  # noqa: PLC0415

    binding_without_repack()
    llm = Llama(
        model_path=str(model),
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[float | None, float | None]:
        first_s = decode_s = None
        for prompt in prompts:  # the binding serves one sequence at a time
            llm.reset()  # no prefix reuse from the previous prompt
            start = time.perf_counter()
            first = None
            # Llama.generate never stops on EOS by itself, so this is ignore_eos.
            for i, _token in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), start=1):
                if first is None:
                    first = time.perf_counter()
                if i == max_tokens:
                    break
            end = time.perf_counter()
            if first_s is None:
                first_s, decode_s = first - start, end - first
        return first_s, decode_s

    return generate


def main(system: str, model: Path, threads: int, workload: Workload, cumulo_dtype: str) -> None:
    result = SystemResult(system=system)
    try:
        if system == "cumulo":
            generate, batched = cumulo_generate(model, threads, cumulo_dtype), True
            result.notes.append(f"dtype {cumulo_dtype}")
        elif system == "hf":
            generate, batched = hf_generate(model, threads), True
            result.notes.append("transformers generate, GGUF dequantized to fp32")
        elif system == "llama-cpp-python":
            n_ctx = max(workload.prefill_prompt_len, workload.decode_prompt_len + workload.decode_tokens) + 64
            generate, batched = llama_cpp_python_generate(model, threads, n_ctx), False
        else:
            raise ValueError(f"no in-process runner for {system}")
        measure(system, generate, workload, batched, result)
    except Exception as exc:  # noqa: BLE001 - a broken system is a row in the table, not a crash of the run
        result.error = f"{type(exc).__name__}: {exc}"
    emit(result)
