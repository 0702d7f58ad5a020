"""The service under load against the llama.cpp server, and the gateway's own added latency
(`python -m bench.serve`; `--overhead-only` for the gateway part alone).

Modules: `__main__` (the driver and `cumulo serve` as a subprocess), `load` (the streaming load generator and
its TTFT/TPOT/ITL statistics), `overhead` (the gateway against a bare FastAPI app, in-process).
"""
