"""Training: config, the loop, metrics and checkpoints (megatron-core DDP, optimizer, dist_checkpointing)."""
