"""fastar: fused C++/CUDA kernels for decoding in autoregressive and diffusion generation.

Every op is registered as ``torch.ops.fastar.<name>`` with CPU and (when built) CUDA kernels, a fake
implementation for ``torch.compile``, and a plain-PyTorch reference in :mod:`fastar.reference`. The public
names are the ``__all__`` of each family module, :mod:`fastar.masks`, :mod:`fastar.reference` and
:func:`build_info`.
"""
from ._loader import load_extension

_C = load_extension()

from . import (  # noqa: E402,E501
    acceptance,
    diffusion,
    generate,
    masked_attention,
    masks,
    quantized_kvcache,
    reference,
    sampling,
    scale,
    scale_kvcache,
)
from ._common import register_fakes  # noqa: E402
from .acceptance import *  # noqa: E402, F403
from .diffusion import *  # noqa: E402, F403
from .masked_attention import *  # noqa: E402, F403
from .quantized_kvcache import *  # noqa: E402, F403
from .sampling import *  # noqa: E402, F403
from .scale import *  # noqa: E402, F403
from .scale_kvcache import *  # noqa: E402, F403

register_fakes("fastar")


def build_info() -> dict:
    """What this build contains: torch version, CUDA version and archs, CPU ISA, SIMT build present."""
    return _C.build_info()


# The forms of __all__ that type checkers follow.
__all__ = ["build_info", "generate", "masks", "reference"]
__all__ += acceptance.__all__
__all__ += diffusion.__all__
__all__ += masked_attention.__all__
__all__ += quantized_kvcache.__all__
__all__ += sampling.__all__
__all__ += scale.__all__
__all__ += scale_kvcache.__all__
