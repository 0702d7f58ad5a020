"""The chip performance model against this machine: `python -m bench.chips` checks predictions against the brief's
claims and against the engine; `python -m bench.chips.bandwidth` measures the memory and matmul roofs."""
