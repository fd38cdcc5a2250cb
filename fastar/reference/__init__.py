"""Plain-PyTorch references of fastar's ops: written for clarity (loops, float64), the tests' oracle.

The public names are the ``__all__`` of each reference module."""
from . import (
    acceptance,
    attention,
    diffusion,
    quantized_kvcache,
    sampling,
    scale,
    scale_kvcache,
    spectr,
    tree_acceptance,
)
from .acceptance import *  # noqa: F403
from .attention import *  # noqa: F403
from .diffusion import *  # noqa: F403
from .quantized_kvcache import *  # noqa: F403
from .sampling import *  # noqa: F403
from .scale import *  # noqa: F403
from .scale_kvcache import *  # noqa: F403
from .spectr import *  # noqa: F403
from .tree_acceptance import *  # noqa: F403

# The forms of __all__ that type checkers follow.
__all__ = []
__all__ += acceptance.__all__
__all__ += attention.__all__
__all__ += diffusion.__all__
__all__ += quantized_kvcache.__all__
__all__ += sampling.__all__
__all__ += scale.__all__
__all__ += scale_kvcache.__all__
__all__ += spectr.__all__
__all__ += tree_acceptance.__all__
