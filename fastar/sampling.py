"""Sampling of visual autoregressive models: classifier-free guidance, top-k/top-p filtering and the draw, fused.

Invalid logit values (a NaN, a +inf, ``inf - inf`` in the guidance mix, or a position where every guided logit is
-inf) are detected inside the kernels, without a host synchronisation:

* CPU: the op raises ``ValueError`` naming the first bad (batch row, position).
* CUDA: raising would need a device sync, so the kernel writes token ``-1`` at that position instead. Call
  :func:`check_tokens` to raise for such tokens, or turn on :func:`fastar.set_debug_checks` (or
  ``FASTAR_DEBUG_CHECKS=1``): then every call checks its tokens and raises, at the cost of a sync.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common
from ._common import as_int, fake, philox_args
from .acceptance import debug_checks_enabled

__all__ = ["check_tokens", "sample_cfg"]

_OP = "fastar.sample_cfg"


def check_tokens(tokens: torch.Tensor, op: str = _OP) -> None:
    """Raise ``ValueError`` if a kernel marked a position invalid (token ``-1``). Synchronises on CUDA."""
    bad = torch.nonzero(tokens < 0)
    if bad.numel():
        where = bad[0].tolist()
        at = f"batch row {where[0]}" + (f", position {where[1]}" if len(where) > 1 else "")
        raise ValueError(
            f"{op}: invalid logits at {at}: a guided logit is NaN or +inf (a NaN or inf input, or inf - inf in the "
            "mix), or every guided logit is -inf"
        )


def _check_number(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{_OP}: {name} must be a number, got {type(value).__name__}")


def sample_cfg(
    logits: torch.Tensor,
    *,
    cfg: float,
    schedule: str = "var",
    scale_index: Optional[int] = None,
    num_scales: Optional[int] = None,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: Optional[int | torch.Tensor] = None,
    offset: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Classifier-free guidance of a doubled batch, top-k/top-p filtering and sampling, in one pass.

    Replaces VAR's ``(1 + t) * cond - t * uncond`` followed by ``sample_with_top_k_top_p_`` (and LlamaGen's
    ``uncond + cfg * (cond - uncond)`` followed by its top-k/top-p sampler): no sort, nothing materialised.

    1. Guidance, in float32: ``schedule="var"``: ``(1 + t) * cond - t * uncond`` with
       ``t = cfg * scale_index / (num_scales - 1)``; ``schedule="constant"`` (LlamaGen):
       ``uncond + cfg * (cond - uncond)``. Then divided by ``temperature``. (Both are computed as
       ``fma(w_c, cond, w_u * uncond)`` with the two weights rounded once from float64.)
    2. Top-k (``top_k > 0``): keep the logits ``>= `` the k-th largest one. **Ties**: every token equal to the
       k-th largest logit is kept (VAR masks ``logits < topk(...).values.amin()``), so more than k may remain.
       ``top_k >= V`` keeps everything.
    3. Top-p (``top_p < 1``), on the softmax of the logits top-k kept: a token is dropped when the probability
       mass of the tokens with a strictly larger logit is ``>= top_p``. This is VAR's rule: it sorts ascending
       and drops ``cumsum(softmax) <= 1 - top_p``. **Boundary**: a token whose ascending cumsum equals
       ``1 - top_p`` exactly (mass above it exactly ``top_p``) is dropped. **Ties** are decided by value: tokens
       with equal logits are all kept or all dropped. The largest logit is always kept, whatever ``top_p``.
    4. A token is drawn from the softmax of the kept logits.

    Args:
        logits: ``[2B, V]`` or ``[2B, L, V]`` (VAR samples all ``L = pn²`` tokens of a scale at once),
            float32, float16 or bfloat16, any strides; rows ``0..B-1`` conditional, ``B..2B-1`` unconditional.
        cfg: guidance scale, finite and ``>= 0``.
        schedule: ``"var"`` (needs ``scale_index`` and ``num_scales >= 2``, ``0 <= scale_index < num_scales``)
            or ``"constant"`` (no ``scale_index``/``num_scales``).
        top_k: ``0`` (no top-k) or the number of largest logits kept.
        top_p: in ``(0, 1]``; ``1`` means no top-p (VAR's ``top_p=0`` for "off" is ``1`` here).
        temperature: ``> 0``.
        seed: int or int64 scalar tensor (on the CPU or the logits' device; a device tensor is read by the
            kernel, so CUDA graphs can replay with new values). ``None`` draws one from torch's default
            generator of the logits' device (``torch.manual_seed`` makes runs repeatable).
        offset: int or int64 scalar tensor, advanced by the caller between calls (VAR: e.g. the first token
            index of the scale).

    Returns:
        int64 tokens ``[B]`` or ``[B, L]`` (the dtype of ``torch.multinomial``). On CUDA an invalid position
        holds ``-1`` (see the module docs and :func:`check_tokens`).

    Randomness: Philox4x32-10 keyed by ``(seed, offset, batch row, position)``, the generator of
    :func:`fastar.speculative_sample`. **The same seed gives identical tokens on the CPU, the SIMT emulation
    and CUDA**: the softmax weights are ``exp(x - max)`` by one polynomial on every backend, turned into 40-bit
    fixed point; the top-k count, the top-p mass and the inverse CDF are exact integer sums.
    """
    _check_number("cfg", cfg)
    _check_number("top_p", top_p)
    _check_number("temperature", temperature)
    # Integral scalars (Python or numpy integers) as Python ints; their ranges are checked by the op.
    top_k = as_int(top_k, f"{_OP}: top_k")
    if scale_index is not None:
        scale_index = as_int(scale_index, f"{_OP}: scale_index")
    if num_scales is not None:
        num_scales = as_int(num_scales, f"{_OP}: num_scales")
    if not isinstance(schedule, str):
        raise TypeError(f"{_OP}: schedule must be 'var' or 'constant', got {type(schedule).__name__}")
    seed_t, offset_t = philox_args(_OP, seed, offset, logits.device)
    tokens = _common.ops().sample_cfg(
        logits, float(cfg), schedule, scale_index, num_scales, top_k, float(top_p), float(temperature), seed_t, offset_t
    )
    if debug_checks_enabled():
        check_tokens(tokens)
    return tokens


@fake("sample_cfg")
def _sample_cfg_fake(logits, cfg, schedule, scale_index, num_scales, top_k, top_p, temperature, seed, offset):
    torch._check(logits.dim() in (2, 3), lambda: "logits must be [2B, V] or [2B, L, V]")
    torch._check(logits.shape[0] % 2 == 0, lambda: "the first dimension of logits must be even")
    return logits.new_empty((logits.shape[0] // 2, *logits.shape[1:-1]), dtype=torch.int64)
