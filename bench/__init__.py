"""Benchmarks of fastar's ops against the plain-PyTorch code they replace: `python -m bench` (the table,
JSON and PNG under bench/results/) or `pytest bench` (pytest-benchmark)."""
