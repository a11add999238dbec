"""Training: the DeepSpeed config, the per-worker loop, and the Ray Train launcher."""
