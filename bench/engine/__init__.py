"""The engine against llama.cpp and HF transformers on the same GGUF (`python -m bench.engine`), and decode
attention's fused CPU kernel against the engine's PyTorch path (`python -m bench.engine.attention`).

Modules: `__main__` (the driver and the child workers' entry), `systems` (how each system is run), `workers`
(the in-process systems, in their own child processes), `report` (table, ratios, JSON and plot). Nothing here
imports torch or llama_cpp at module level: the llama-cpp-python worker runs in the anchors' venv.
"""
