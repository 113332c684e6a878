"""Training mechanics shared by every trainer: the engine, the loop, checkpoints, metrics."""
