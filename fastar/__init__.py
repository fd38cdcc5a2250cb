"""fastar: fused C++/CUDA kernels for decoding in autoregressive and diffusion generation.

Every op is registered as ``torch.ops.fastar.<name>`` with CPU and (when built) CUDA kernels, a fake
implementation for ``torch.compile``, and a plain-PyTorch reference in :mod:`fastar.reference`.
"""
from ._loader import load_extension

_C = load_extension()

from . import masks, reference  # noqa: E402
from ._common import register_fakes  # noqa: E402
from .acceptance import (  # noqa: E402
    check_rows,
    debug_checks_enabled,
    greedy_verify,
    set_debug_checks,
    speculative_sample,
)
from .masked_attention import (  # noqa: E402
    attention,
    attention_with_kvcache,
    patch_sdpa,
    scaled_dot_product_attention,
)
from .sampling import check_tokens, sample_cfg  # noqa: E402
from .scale import ScaleLayout, scale_attention  # noqa: E402
from .scale_kvcache import ScaleKVCache  # noqa: E402

register_fakes("fastar")


def build_info() -> dict:
    """What this build contains: torch version, CUDA version and archs, CPU ISA, SIMT build present."""
    return _C.build_info()


__all__ = [
    "ScaleKVCache",
    "ScaleLayout",
    "attention",
    "attention_with_kvcache",
    "build_info",
    "check_rows",
    "check_tokens",
    "debug_checks_enabled",
    "greedy_verify",
    "masks",
    "patch_sdpa",
    "reference",
    "sample_cfg",
    "scale_attention",
    "scaled_dot_product_attention",
    "set_debug_checks",
    "speculative_sample",
]
