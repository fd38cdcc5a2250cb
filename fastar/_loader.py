"""Load the compiled extension, or say exactly how to rebuild it.

A C++ extension only works with the torch it was compiled against; loading it with another one gives an
undefined-symbol crash (the best-known complaint about flash-attn, vLLM and sgl-kernel). The extension
carries the build's torch version as a marker string, which is read from the file before it is loaded.
"""
from __future__ import annotations

import importlib
import importlib.util
import re

import torch

REBUILD_HINT = (
    "Rebuild fastar for the installed torch, from the fastar source folder:\n"
    "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
    "(or `pip install --no-build-isolation -e .` for a development checkout, or `make test`)."
)
_MARKER = re.compile(rb"fastar-built-with-torch:([^\x00]+)\x00")


def check_torch_version(built: str, installed: str) -> None:
    """Raise ImportError unless the installed torch is the one fastar was built against."""
    if built != installed:
        raise ImportError(
            f"fastar was built against torch {built}, but torch {installed} is installed; "
            f"its compiled kernels cannot be loaded with this torch.\n{REBUILD_HINT}"
        )


def built_torch_version(path: str) -> str | None:
    with open(path, "rb") as f:
        m = _MARKER.search(f.read())
    return m.group(1).decode() if m else None


def load_extension(name: str = "fastar._C"):
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"fastar's compiled extension {name} has not been built.\n{REBUILD_HINT}")
    built = built_torch_version(spec.origin)
    if built is not None:
        check_torch_version(built, torch.__version__)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"fastar's extension {name} failed to load: {exc}\n{REBUILD_HINT}") from exc
