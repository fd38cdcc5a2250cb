"""Integrations of fastar's kernels with model libraries (imported on demand)."""
