"""Masked-diffusion LMs (LLaDA, Dream, Fast-dLLM): one parallel-unmasking step, fused, and the per-block schedules.

:func:`diffusion_unmask` replaces what the official per-step code does after the model's forward (Gumbel noise
and a softmax in float64 over ``[B, L, V]``, a gather, a per-row ``topk`` in a Python loop): for every masked
position of the current block, one kernel computes the candidate token and its confidence; a second small step
picks, per row and on the device, the positions to commit and writes them into ``x`` in place. No host sync.
Conventions: ``docs/diffusion.md``.

Invalid logits (a NaN or +inf, or all -inf, at a masked position of the block) and negative ``num_transfer``
counts are detected inside the kernels:

* CPU: the op raises ``ValueError`` before ``x`` is written.
* CUDA: raising would need a device sync, so that row commits nothing and its ``remaining`` is ``-1``. Call
  :func:`check_remaining` to raise for such rows, or turn on :func:`fastar.set_debug_checks` (a sync per call).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch

from . import _common
from ._common import as_int, fake, philox_args
from .acceptance import debug_checks_enabled

__all__ = ["UnmaskResult", "check_remaining", "diffusion_unmask", "maskgit_cosine_counts", "num_transfer_tokens"]

_OP = "fastar.diffusion_unmask"
CONFIDENCES = ("probability", "log_probability", "margin", "neg_entropy", "random")
THRESHOLD_RULES = ("fast_dllm", "dinfer", "dimple")


class UnmaskResult(NamedTuple):
    """What :func:`diffusion_unmask` returns besides the tokens it wrote into ``x``."""

    candidates: torch.Tensor  # int64 [B, Lb]: the candidate of each masked block position, -1 elsewhere
    confidence: torch.Tensor  # float32 [B, Lb]: its confidence, -inf elsewhere
    remaining: torch.Tensor  # int64 [B]: block positions holding mask_id after the step (CUDA: -1, invalid row)


def check_remaining(remaining: torch.Tensor, op: str = _OP) -> None:
    """Raise ``ValueError`` if a kernel marked a row invalid (``remaining < 0``). Synchronises on CUDA."""
    bad = torch.nonzero(remaining < 0).flatten()
    if bad.numel():
        raise ValueError(
            f"{op}: invalid input in batch row {int(bad[0])}: a logit of a masked block position is NaN or +inf, "
            "every logit of one is -inf, or num_transfer is negative"
        )


def diffusion_unmask(
    logits: torch.Tensor,
    x: torch.Tensor,
    *,
    mask_id: int,
    block_start: int,
    block_end: int,
    num_transfer: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
    threshold_rule: str = "fast_dllm",
    confidence: str = "probability",
    confidence_noise: float = 0.0,
    temperature: float = 0.0,
    seed: Optional[int | torch.Tensor] = None,
    offset: int | torch.Tensor = 0,
) -> UnmaskResult:
    """One unmasking step: score the masked positions of ``x[:, block_start:block_end]`` and commit some, in place.

    For every block position ``p`` with ``x[b, p] == mask_id``:

    * candidate: ``argmax(logits[b, p])`` (the lowest index among equal maxima) at ``temperature == 0``, else a
      draw from ``softmax(logits[b, p] / temperature)`` (the distribution of LLaDA's float64 Gumbel-max).
    * confidence (float32): ``"probability"`` of the candidate under ``softmax(logits[b, p])`` (LLaDA's
      ``low_confidence``, Dream's ``maskgit_plus``); ``"margin"`` top-1 minus top-2 probability (Dream's
      ``topk_margin``); ``"neg_entropy"`` ``sum p log p`` (Dream's ``entropy``); ``"random"`` uniform in [0, 1)
      (LLaDA's ``random`` remasking); ``"log_probability"`` the log of ``"probability"`` (MaskGIT). Dream tempers
      its confidences too: pass ``logits / temperature`` with ``temperature=1`` for that.
    * ``confidence_noise = s > 0`` adds ``s * g`` to each confidence, ``g`` a standard Gumbel draw of the position:
      MaskGIT's annealed noise (``s = 4.5 * (1 - ratio)`` on ``"log_probability"``), or Dream's ``alg_temp = s``
      (the top-k of ``c + s g`` is a draw without replacement from ``softmax(c / s)``, Dream's multinomial).

    Then per row, over its ``n`` masked block positions ordered by confidence (ties: the lower position first),
    exactly one rule commits candidates into ``x``:

    * ``num_transfer`` (int64 ``[B]``, LLaDA): the ``min(num_transfer[b], n)`` first;
    * ``threshold`` with ``threshold_rule="fast_dllm"`` (Fast-dLLM): the first, and every one with confidence
      ``>= threshold``; ``"dinfer"`` (dInfer): every one with confidence ``>= min(threshold, top - 1e-5)``;
      ``"dimple"`` (Dimple's confident decoding; needs ``num_transfer`` too): every one with confidence
      ``> threshold``, or if there is none the ``min(num_transfer[b], n)`` first;
    * ``factor`` (Fast-dLLM): the first ``r`` where ``r >= 1`` is the first rank whose confidence is below
      ``1 - factor / (r + 2)``; a stop at the last rank, or none, commits all ``n``.

    Positions outside the block are never read for masks nor written.

    Args:
        logits: ``[B, L, V]`` float32, float16 or bfloat16, unit stride along V (else copied).
        x: int64 ``[B, L]``, contiguous; written in place.
        mask_id: in ``[0, V)``.
        block_start, block_end: ``0 <= block_start < block_end <= L``.
        seed, offset: the Philox stream (``fastar.speculative_sample``'s convention); position ``(b, p)`` uses
            ``(seed, offset, b, p)``. Only read at ``temperature > 0``, with ``confidence="random"`` or with
            ``confidence_noise``; ``None``
            then draws a seed from torch's generator of the logits' device.

    Returns:
        :class:`UnmaskResult` ``(candidates [B, Lb] int64, confidence [B, Lb] float32, remaining [B] int64)``,
        ``Lb = block_end - block_start``. ``remaining`` counts the block positions holding ``mask_id`` after the
        commit (a committed candidate may be ``mask_id`` itself, as in LLaDA's loop): the block is complete when it
        is all zero.

    The same seed gives the same tokens on the CPU, the SIMT emulation and CUDA: softmax sums are fixed-point
    integers and every confidence one double expression of them (``docs/diffusion.md``).
    """
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"{_OP}: threshold_rule must be one of {THRESHOLD_RULES}, got {threshold_rule!r}")
    if threshold_rule == "dimple":
        if threshold is None or num_transfer is None or factor is not None:
            raise ValueError(f"{_OP}: threshold_rule='dimple' needs threshold and num_transfer (and no factor)")
        rule = "dimple"
    else:
        rules = [name for name, v in (("num_transfer", num_transfer), ("threshold", threshold), ("factor", factor))
                 if v is not None]
        if len(rules) != 1:
            raise ValueError(f"{_OP}: give exactly one of num_transfer, threshold or factor, got {rules or 'none'}")
        rule = {"num_transfer": "topk", "threshold": "threshold", "factor": "factor"}[rules[0]]
        if rule == "threshold" and threshold_rule == "dinfer":
            rule = "dinfer"
    if confidence not in CONFIDENCES:
        raise ValueError(f"{_OP}: confidence must be one of {CONFIDENCES}, got {confidence!r}")
    for name, value in (("threshold", threshold), ("factor", factor), ("temperature", temperature),
                        ("confidence_noise", confidence_noise)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise TypeError(f"{_OP}: {name} must be a number, got {type(value).__name__}")
    mask_id = as_int(mask_id, f"{_OP}: mask_id")
    block_start = as_int(block_start, f"{_OP}: block_start")
    block_end = as_int(block_end, f"{_OP}: block_end")
    if seed is None and temperature == 0 and confidence != "random" and confidence_noise == 0:
        seed = 0  # no randomness is read: leave torch's generator alone
    seed_t, offset_t = philox_args(_OP, seed, offset, logits.device)
    candidates, conf, remaining = _common.ops().diffusion_unmask(
        logits, x, num_transfer, mask_id, block_start, block_end, confidence, rule,
        float(threshold if threshold is not None else 0.0), float(factor if factor is not None else 0.0),
        float(temperature), float(confidence_noise), seed_t, offset_t,
    )
    if debug_checks_enabled():
        check_remaining(remaining)
    return UnmaskResult(candidates, conf, remaining)


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: int64 ``[B, steps]``, the masked count of each row of ``mask_index``
    (bool ``[B, Lb]``) split evenly over the steps, the first ``count % steps`` steps one more (32 masked, 10
    steps: ``[4, 4, 3, 3, 3, 3, 3, 3, 3, 3]``). On the device of ``mask_index``, without a host sync."""
    steps = as_int(steps, "num_transfer_tokens: steps", low=1)
    if mask_index.dim() != 2:
        raise ValueError(f"num_transfer_tokens: mask_index must be [B, Lb], got shape {tuple(mask_index.shape)}")
    total = mask_index.sum(dim=1, dtype=torch.int64)
    base, extra = total // steps, total % steps
    step = torch.arange(steps, device=mask_index.device)
    return base[:, None] + (step[None, :] < extra[:, None]).to(torch.int64)


def maskgit_cosine_counts(num_tokens: int, steps: int) -> List[int]:
    """MaskGIT's cosine schedule: how many of ``num_tokens`` masked tokens are committed at each of ``steps``
    steps. After step ``t`` (of ``T``) ``floor(N cos(pi/2 (t + 1) / T))`` stay masked, clamped as MaskGIT does
    (each step commits at least one and leaves at least one masked), and the last step commits the rest."""
    num_tokens = as_int(num_tokens, "maskgit_cosine_counts: num_tokens", low=1)
    steps = as_int(steps, "maskgit_cosine_counts: steps", low=1)
    counts, masked = [], num_tokens
    for t in range(steps):
        if t == steps - 1:
            left = 0
        else:
            left = math.floor(num_tokens * math.cos(math.pi / 2 * (t + 1) / steps))
            left = max(1, min(masked - 1, left))
        counts.append(masked - left)
        masked = left
    return counts


@fake("diffusion_unmask")
def _diffusion_unmask_fake(logits, x, num_transfer, mask_id, block_start, block_end, confidence, rule, threshold,
                           factor, temperature, confidence_noise, seed, offset):
    _common.one_device("diffusion_unmask", logits, x, num_transfer)
    torch._check(logits.dim() == 3, lambda: "logits must be [B, L, V]")
    torch._check(x.dim() == 2, lambda: "x must be [B, L]")
    torch._check(0 <= block_start < block_end <= logits.shape[1], lambda: "invalid block bounds")
    batch, block = logits.shape[0], block_end - block_start
    return (
        logits.new_empty((batch, block), dtype=torch.int64),
        logits.new_empty((batch, block), dtype=torch.float32),
        logits.new_empty((batch,), dtype=torch.int64),
    )
