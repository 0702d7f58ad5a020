"""Accuracy and speed of every compact number format against fp32 and llama.cpp (`python -m bench.formats`), and
the format kernels' micro-benchmark (`python -m bench.formats.kernels`).

Modules: `__main__` (the driver: converts, serves each format in a fresh `worker` process, runs speed rounds),
`worker` (one format's decode speed, memory and perplexity; its llama.cpp runner runs in the anchors' venv, so
nothing here imports torch at module level), `report` (table, targets, plot), `kernels`.
"""
