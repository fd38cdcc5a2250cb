"""Plain-PyTorch references of fastar's ops: written for clarity (loops, float64), the tests' oracle."""
from .acceptance import (
    greedy_verify_reference,
    philox4x32_10,
    speculative_output_distribution,
    speculative_sample_reference,
)
from .attention import attention_reference, mask_from_args
from .sampling import cfg_mix, sample_cfg_reference, var_top_k_top_p_
from .scale import scale_attention_reference
from .scale_kvcache import scalekv_keep_reference

__all__ = [
    "attention_reference",
    "cfg_mix",
    "mask_from_args",
    "greedy_verify_reference",
    "philox4x32_10",
    "sample_cfg_reference",
    "speculative_output_distribution",
    "scale_attention_reference",
    "scalekv_keep_reference",
    "speculative_sample_reference",
    "var_top_k_top_p_",
]
