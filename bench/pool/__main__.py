"""Pool benchmarks on simulated replicas timed by the chips model.

    python -m bench.pool routing     # prefix-aware vs round-robin: mean TTFT and prefix hit rate
    python -m bench.pool scaling     # served tok/s with 1, 2 and 4 replicas: the 2x and 4x ratios
    python -m bench.pool failover    # a real local Ray pool, a node SIGKILLed under load (vs one bare replica)
    python -m bench.pool real        # served tok/s with 1 vs 2 real replicas on 1-core nodes (vs one 2-core)
    python -m bench.pool pipeline    # a model split in 2 and 3 pipeline stages against the unsplit engine

Each prints a table and the ratios measured in the same run, and writes JSON to bench/results/.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "routing": "bench.pool.routing",
    "scaling": "bench.pool.scaling",
    "placement": "bench.pool.placement",
    "failover": "bench.pool.failover",
    "real": "bench.pool.real",
    "pipeline": "bench.pool.pipeline",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        print(f"usage: python -m bench.pool {{{'|'.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
