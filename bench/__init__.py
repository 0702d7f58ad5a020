"""Benchmarks: Cumulo against an anchor measured in the same run, as ratios; never part of the tests or CI.

One package per concern, each run from the repository root: `python -m bench.engine`, `bench.formats`,
`bench.serve`, `bench.chips` (see docs/benchmarks.md). `common` and `anchors` are shared by all of them and
import only the standard library, because workers run them from the llama.cpp anchors' own venv too.
"""
