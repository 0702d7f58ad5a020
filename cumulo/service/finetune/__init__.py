"""Fine-tuning on the service side (issue #14): uploaded files, the durable job state machine, its events and
checkpoints, the queue a worker claims from, plan terms and training-token metering. Training itself runs in
a worker process (`cumulo finetune worker`), because the service may not import models or the trainer."""
