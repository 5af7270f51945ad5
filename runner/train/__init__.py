"""Training under Ray Train: the per-worker loop and its metrics."""
