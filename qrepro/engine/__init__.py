"""Training engine: loop, hooks, checkpoints, run records."""
