"""Pool benchmarks: prefix-aware routing against round-robin, and throughput as replicas are added
(`python -m bench.pool routing|scaling`)."""
