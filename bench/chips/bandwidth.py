"""Measures this machine's memory read bandwidth and fp32 matmul rate: the two roofs that decode tok/s sits under.

Decoding one token reads every weight once, so `bandwidth / bytes_per_token` is the fastest any engine can
decode a single stream here; the benchmark reports each system's fraction of that roof.
Run `python -m bench.chips.bandwidth` to print the numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bench.common import best_interleaved

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class MachineRoofs:
    read_gb_s_1_thread: float  # GB = 1e9 bytes, as chip datasheets quote it
    read_gb_s: float  # with `threads` threads: the roof used for the roofline fraction
    matmul_gflop_s: float  # fp32, with `threads` threads
    threads: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def read_bandwidth_gb_s(threads: int, size_bytes: int = GIB, repeats: int = 5) -> float:
    """Best-of-N time to sum a buffer far larger than the caches; a sum reads each byte once and writes nothing."""
    import torch  # noqa: PLC0415 - heavy, only when measuring

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(size_bytes // 4, dtype=torch.float32)
        seconds = best_interleaved({"sum": buf.sum}, repeats)["sum"]
    finally:
        torch.set_num_threads(previous)
    return size_bytes / seconds / 1e9


def matmul_gflop_s(threads: int, n: int = 2048, repeats: int = 5) -> float:
    import torch  # noqa: PLC0415

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        seconds = best_interleaved({"mm": lambda: torch.mm(a, b)}, repeats)["mm"]
    finally:
        torch.set_num_threads(previous)
    return 2 * n**3 / seconds / 1e9


def measure(threads: int = 2, size_bytes: int = GIB, repeats: int = 5) -> MachineRoofs:
    return MachineRoofs(
        read_gb_s_1_thread=read_bandwidth_gb_s(1, size_bytes, repeats),
        read_gb_s=read_bandwidth_gb_s(threads, size_bytes, repeats),
        matmul_gflop_s=matmul_gflop_s(threads, repeats=repeats),
        threads=threads,
    )


def main() -> None:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m bench.chips.bandwidth", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gib", type=float, default=1.0, help="buffer size for the read test")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    roofs = measure(args.threads, int(args.gib * GIB), args.repeats)
    print(f"memory read, 1 thread:   {roofs.read_gb_s_1_thread:6.1f} GB/s")
    print(f"memory read, {roofs.threads} threads:  {roofs.read_gb_s:6.1f} GB/s")
    print(f"fp32 matmul, {roofs.threads} threads:  {roofs.matmul_gflop_s:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
