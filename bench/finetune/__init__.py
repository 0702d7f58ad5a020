"""Fine-tuning and multi-LoRA serving benchmarks (issue #14): `python -m bench.finetune`."""
