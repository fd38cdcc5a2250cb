"""The test-only SIMT build: fastar's CUDA kernels, run on the CPU by the emulator, as torch.ops.fastar_simt."""
from __future__ import annotations

from ._common import register_fakes
from ._loader import load_extension

_module = None


def load():
    """Import fastar._C_simt (ImportError if it was not built) and register its ops' fakes once."""
    global _module
    if _module is None:
        _module = load_extension("fastar._C_simt")
        register_fakes("fastar_simt")
    return _module
