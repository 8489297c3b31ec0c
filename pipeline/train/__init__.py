"""Training: the Ray Train worker loop around a DeepSpeed engine, checkpoints and resume."""
