"""MoE decode benchmark (issue 13): a seeded random Qwen3-MoE as a Q8_0 GGUF, Cumulo's decode against the
bandwidth roof of its active bytes and against llama.cpp's server on the same file, and resident memory against
packed weights + KV cache. Run `python -m bench.moe [--quick]`."""
