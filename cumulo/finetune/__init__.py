"""Fine-tuning: LoRA training on Cumulo's own model definitions, chat-data validation and packing, PEFT-format
adapters. The seam the service's worker calls is `cumulo.finetune.api`."""
