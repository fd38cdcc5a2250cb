"""Collect the bench_*.py files as test modules, so `pytest bench` runs their pytest-benchmark tests."""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
