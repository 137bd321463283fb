"""Training: Trainer, sharding, pipeline, metrics, checkpoints."""
