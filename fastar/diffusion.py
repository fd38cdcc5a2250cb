"""Masked-diffusion LMs (LLaDA, Dream, Fast-dLLM): one parallel-unmasking step, fused, the per-block schedules, and
the whole loops on top of them: :func:`generate` (LLaDA's / Fast-dLLM's), :func:`generate_blocks` (block
diffusion) and :func:`generate_dream` (Dream's); not in ``__all__``: ``fastar.generate`` is the speculative-decoding
module.

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
THRESHOLD_RULES = ("fast_dllm", "dinfer", "dimple", "sdar")


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
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    confidence_source: str = "logits",
    seed: Optional[int | torch.Tensor] = None,
    offset: int | torch.Tensor = 0,
) -> UnmaskResult:
    """One unmasking step: score the masked positions of ``x[:, block_start:block_end]`` and commit some, in place.

    For every block position ``p`` with ``x[b, p] == mask_id``:

    * candidate: ``argmax(logits[b, p])`` (the lowest index among equal maxima) at ``temperature == 0``, else a
      draw from ``softmax(logits[b, p] / temperature)`` (the distribution of LLaDA's float64 Gumbel-max).
    * filters (Dream's ``top_p_logits`` then ``top_k_logits``, fused): ``top_p`` keeps the nucleus of
      ``softmax(logits / temperature)`` (temperature 0: 1): a token is kept while the mass of the tokens with a
      larger logit is ``<= top_p`` (so the most likely token always is); ``top_k`` keeps the logits ``>=`` the
      ``top_k``-th largest. Both are taken over the whole row, and a token is kept when both keep it; tokens tied
      with the last kept one are kept too. The candidate is drawn from the kept tokens (the argmax always is one).
    * confidence (float32): ``"probability"`` of the candidate; ``"margin"`` top-1 minus top-2 probability (Dream's
      ``topk_margin``); ``"neg_entropy"`` ``sum p log p`` (Dream's ``entropy``); ``"random"`` uniform in [0, 1)
      (LLaDA's ``random`` remasking); ``"log_probability"`` the log of ``"probability"`` (MaskGIT). The
      probabilities are ``softmax(logits[b, p])`` with ``confidence_source="logits"`` (LLaDA's ``low_confidence``,
      whatever the temperature and filters), or with ``"sampling"`` the candidate's own distribution: tempered and
      filtered (Dream's ``sample_tokens``: ``maskgit_plus``, ``topk_margin``, ``entropy``).
    * ``confidence_noise = s > 0`` adds ``s * g`` to each confidence, ``g`` a standard Gumbel draw of the position:
      MaskGIT's annealed noise (``s = 4.5 * (1 - ratio)`` on ``"log_probability"``), or Dream's ``alg_temp = s``
      (the top-k of ``c + s g`` is a draw without replacement from ``softmax(c / s)``, Dream's multinomial).

    Then per row, over its ``n`` masked block positions ordered by confidence (ties: the lower position first),
    exactly one rule commits candidates into ``x``:

    * ``num_transfer`` (int64 ``[B]``, LLaDA): the ``min(num_transfer[b], n)`` first;
    * ``threshold`` with ``threshold_rule="fast_dllm"`` (Fast-dLLM): the first, and every one with confidence
      ``>= threshold``; ``"dinfer"`` (dInfer): every one with confidence ``>= min(threshold, top - 1e-5)``;
      ``"dimple"`` (Dimple's confident decoding; needs ``num_transfer`` too): every one with confidence
      ``> threshold``, or if there is none the ``min(num_transfer[b], n)`` first; ``"sdar"`` (SDAR's
      ``low_confidence_dynamic``; needs ``num_transfer`` too): the ``min(num_transfer[b], n)`` first, or every one
      with confidence ``> threshold`` if they are more;
    * ``factor`` (Fast-dLLM): the first ``r`` where ``r >= 1`` is the first rank whose confidence is below
      ``1 - factor / (r + 2)``; a stop at the last rank, or none, commits all ``n``.

    Positions outside the block are never read for masks nor written. ``top_p`` in ``(0, 1]`` (``None`` or 1: no
    nucleus; it is rounded up to a multiple of ``2**-64``); ``top_k >= 1`` (``None``, or ``>= V``: no top-k).

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
    if threshold_rule in ("dimple", "sdar"):
        if threshold is None or num_transfer is None or factor is not None:
            raise ValueError(f"{_OP}: threshold_rule={threshold_rule!r} needs threshold and num_transfer (and no "
                             "factor)")
        rule = threshold_rule
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
    if confidence_source not in ("logits", "sampling"):
        raise ValueError(f"{_OP}: confidence_source must be 'logits' or 'sampling', got {confidence_source!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool)
                              or not 0 < top_p <= 1):
        raise ValueError(f"{_OP}: top_p must be None or a number in (0, 1], got {top_p!r}")
    top_k = 0 if top_k is None else as_int(top_k, f"{_OP}: top_k", low=1)
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
        float(temperature), float(confidence_noise), float(top_p if top_p is not None else 1.0), top_k,
        confidence_source, seed_t, offset_t,
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


REMASKINGS = {"low_confidence": "probability", "random": "random"}
CACHES = (None, "prefix", "dual")
_GEN = "fastar.diffusion.generate"


def _logits_of(out) -> torch.Tensor:
    """The logits of a model's output: its ``.logits`` (transformers' outputs) or the output itself."""
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{_GEN}: the model must return a tensor of logits or an output with .logits, got "
                        f"{type(out).__name__}")
    return logits


def _crop(past, length: int):
    """A KV cache cut to its first ``length`` positions: a transformers ``Cache`` in place (``.crop`` by a negative
    count: the tokens to drop, in every transformers version), or a legacy tuple of per-layer ``(k, v)``
    ``[B, H, L, D]`` sliced."""
    if hasattr(past, "crop"):
        excess = past.get_seq_length() - length
        if excess > 0:
            past.crop(-excess)
        return past
    return tuple(tuple(t[:, :, :length] for t in layer) for layer in past)


def generate(
    model,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int,
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
    cache: Optional[str] = None,
    seed: Optional[int] = None,
    return_nfe: bool = False,
    threshold_rule: str = "fast_dllm",
):
    """LLaDA's ``generate`` (and Fast-dLLM's threshold / factor rules and prefix / dual KV caches) with every step's
    sampling and commit done by :func:`diffusion_unmask` on the device.

    ``prompt`` (int64 ``[B, P]``) is followed by ``gen_length`` masked positions, filled block by block
    (``block_length`` each, left to right). Per block, one rule decides what each step commits:

    * neither ``threshold`` nor ``factor`` (LLaDA): exactly ``steps // num_blocks`` steps, the block's masked count
      split by :func:`num_transfer_tokens`; no host sync but one per block (the invalid-row check);
    * ``threshold`` or ``factor`` (Fast-dLLM; ``threshold_rule="dinfer"``: dInfer's threshold): steps until no
      position of the block holds ``mask_id``; one host sync per step (that test);
    * ``threshold`` with ``threshold_rule="sdar"`` (SDAR's dynamic rule): at most ``steps // num_blocks`` steps, each
      committing the schedule's count or every position with confidence above ``threshold`` if they are more;
      one host sync per step (the block-complete test).

    ``remasking``: ``"low_confidence"`` (the candidate's probability) or ``"random"``. ``temperature``: 0 takes the
    argmax (ties: the lowest token id), else a draw from ``softmax(logits / temperature)``. ``cfg_scale > 0``:
    classifier-free guidance, the batch doubled with the prompt masked in the second half,
    ``un + (cfg_scale + 1) * (cond - un)``. ``cache``: ``None`` (a full forward per step), ``"prefix"`` or
    ``"dual"`` (Fast-dLLM's approximate caches; the model protocol is in ``docs/diffusion.md``). ``seed``: the
    Philox stream of the random draws (step ``s`` of the whole run uses offset ``s``); ``None`` draws one from
    torch's CPU generator.

    ``model(ids)`` returns logits ``[B, len, V]`` (float32, float16 or bfloat16) or an output with ``.logits``.
    Returns ``x`` int64 ``[B, P + gen_length]``, and the number of model calls with ``return_nfe``.
    """
    if not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.int64 or prompt.dim() != 2:
        raise ValueError(f"{_GEN}: prompt must be an int64 [B, P] tensor")
    steps = as_int(steps, f"{_GEN}: steps", low=1)
    gen_length = as_int(gen_length, f"{_GEN}: gen_length", low=1)
    block_length = as_int(block_length, f"{_GEN}: block_length", low=1)
    mask_id = as_int(mask_id, f"{_GEN}: mask_id", low=0)
    if gen_length % block_length:
        raise ValueError(f"{_GEN}: block_length {block_length} must divide gen_length {gen_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"{_GEN}: steps {steps} must be a multiple of the number of blocks {num_blocks}")
    if remasking not in REMASKINGS:
        raise ValueError(f"{_GEN}: remasking must be one of {tuple(REMASKINGS)}, got {remasking!r}")
    if cache not in CACHES:
        raise ValueError(f"{_GEN}: cache must be one of {CACHES}, got {cache!r}")
    if threshold is not None and factor is not None:
        raise ValueError(f"{_GEN}: give threshold or factor, not both")
    _check_loop_threshold_rule(_GEN, threshold_rule, threshold)
    for name, value in (("temperature", temperature), ("cfg_scale", cfg_scale)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{_GEN}: {name} must be a finite number >= 0, got {value!r}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and mask_id >= vocab:  # else checked on the first logits
        raise ValueError(f"{_GEN}: mask_id {mask_id} is outside the vocabulary of {vocab} tokens")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    scheduled = threshold is None and factor is None
    counted = scheduled or threshold_rule == "sdar"  # steps take the schedule's counts
    steps_per_block = steps // num_blocks
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.int64, device=prompt.device)
    x[:, :prompt_len] = prompt
    prompt_index = x != mask_id
    nfe = 0

    def forward(start: int, end: int, **kwargs):
        """The model on ``x[:, start:end]`` (and its unconditional copy under CFG): (logits, the model's output)."""
        nonlocal nfe
        nfe += 1
        ids = x[:, start:end]
        if cfg_scale > 0:
            ids = torch.cat([ids, x.masked_fill(prompt_index, mask_id)[:, start:end]])
        out = model(ids, **kwargs)
        logits = _logits_of(out)
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(f"{_GEN}: the model returned logits of shape {tuple(logits.shape)} for input ids of "
                             f"shape {tuple(ids.shape)}; expected [B, len, V]")
        if mask_id >= logits.shape[-1]:
            raise ValueError(f"{_GEN}: mask_id {mask_id} is outside the vocabulary of {logits.shape[-1]} tokens")
        if cfg_scale > 0:
            cond, un = logits.chunk(2)
            logits = un + (cfg_scale + 1) * (cond - un)
        return logits, out

    rule = {"threshold": threshold, "threshold_rule": threshold_rule} if threshold is not None else \
        {"factor": factor} if factor is not None else {}
    step = 0  # over the whole run: the Philox offset
    for block in range(num_blocks):
        start = prompt_len + block * block_length
        end = start + block_length
        if counted:
            counts = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block).t().contiguous()
        past = None
        for i in range(steps_per_block if counted else block_length + 1):
            if not counted and i == block_length:
                raise RuntimeError(f"{_GEN}: block {block} still holds mask_id after {block_length} steps (the model "
                                   "keeps predicting mask_id at a masked position)")
            if cache is None or i == 0:
                logits, out = forward(0, x.shape[1], **({"use_cache": True} if cache else {}))
                if cache is not None:
                    past = out.past_key_values
                    if cache == "prefix":
                        past = _crop(past, start)
                view, lo, hi = x, start, end
            else:
                view_end = x.shape[1] if cache == "prefix" else end
                kwargs = {"past_key_values": past, "use_cache": True}
                if cache == "dual":
                    rows = batch * (2 if cfg_scale > 0 else 1)
                    replace = torch.zeros(rows, x.shape[1], dtype=torch.bool, device=x.device)
                    replace[:, start:end] = True
                    kwargs["replace_position"] = replace
                logits, _ = forward(start, view_end, **kwargs)
                if cache == "prefix":
                    _crop(past, start)  # a transformers cache the model appended to
                view, lo, hi = x[:, start:view_end].contiguous(), 0, block_length
            res = diffusion_unmask(logits, view, mask_id=mask_id, block_start=lo, block_end=hi,
                                   confidence=REMASKINGS[remasking], temperature=float(temperature), seed=seed,
                                   offset=step, **(dict(num_transfer=counts[i], **rule) if counted else rule))
            step += 1
            if view is not x:
                x[:, start:start + view.shape[1]] = view
            if not scheduled:
                low, high = torch.stack([res.remaining.min(), res.remaining.max()]).tolist()
                if low < 0:
                    check_remaining(res.remaining, _GEN)
                if high == 0:
                    break
        if counted:
            check_remaining(res.remaining, _GEN)
    return (x, nfe) if return_nfe else x


def _check_loop_threshold_rule(op: str, threshold_rule: str, threshold: Optional[float]) -> None:
    """The loops take Fast-dLLM's, dInfer's and SDAR's threshold rules (Dimple's may commit fewer positions than the
    schedule, which would leave a block unfinished)."""
    if threshold_rule not in ("fast_dllm", "dinfer", "sdar"):
        raise ValueError(f"{op}: threshold_rule must be one of ('fast_dllm', 'dinfer', 'sdar'), got "
                         f"{threshold_rule!r}")
    if threshold_rule != "fast_dllm" and threshold is None:
        raise ValueError(f"{op}: threshold_rule={threshold_rule!r} needs threshold")


@fake("diffusion_unmask")
def _diffusion_unmask_fake(logits, x, num_transfer, mask_id, block_start, block_end, confidence, rule, threshold,
                           factor, temperature, confidence_noise, top_p, top_k, confidence_source, seed, offset):
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


_BLOCKS = "fastar.diffusion.generate_blocks"


def _block_causal_mask(batch: int, past: int, n: int, block_length: int, device) -> torch.Tensor:
    """bool ``[B, 1, n, past + n]``, True where query ``past + i`` may see key ``j``: ``j`` lies in the query's block
    or an earlier one (blocks of ``block_length`` from position 0). An expanded view."""
    q = torch.arange(past, past + n, device=device) // block_length
    k = torch.arange(past + n, device=device) // block_length
    return (k[None, :] <= q[:, None]).expand(batch, 1, n, past + n)


@torch.no_grad()
def generate_blocks(
    model,
    prompt: torch.Tensor,
    *,
    gen_length: int,
    block_length: int,
    steps_per_block: int,
    mask_id: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
    threshold_rule: str = "fast_dllm",
    use_cache: bool = True,
    seed: Optional[int] = None,
    return_nfe: bool = False,
):
    """Block-diffusion decoding (SDAR, Fast-dLLM v2, BD3-LM): blocks of ``block_length`` positions, counted from
    position 0, are denoised one after the other under block-causal attention, each step's sampling and commit done
    by :func:`diffusion_unmask` on the device. The protocol and the alignment of the prompt: ``docs/diffusion.md``.

    The prompt's whole blocks are committed; its last partial block (if ``P % block_length``) is the first block
    denoised, its prompt positions kept (SDAR's alignment). Then blocks follow until ``gen_length`` positions
    after the prompt are generated; the last block then overhangs the returned ``P + gen_length`` positions by
    ``block_length - P % block_length`` (generated and dropped, as SDAR does).

    Per block, at most ``steps_per_block`` forwards over the block's positions against the KV cache of the
    committed blocks, the first also over the last committed block, whose keys and values it adds to the cache
    (``use_cache=False``: every forward over the whole prefix and the block, the baseline):

    * neither ``threshold`` nor ``factor``: the block's masked count split over ``min(steps_per_block, count)``
      steps by :func:`num_transfer_tokens`; the loop reads the device once per block (the block-complete check);
    * ``threshold`` or ``factor`` (Fast-dLLM's rules, at least one position per step; ``threshold_rule="dinfer"``:
      dInfer's threshold): steps until the block holds no ``mask_id``, the ``steps_per_block``-th committing all
      that is left; one read of the device per step (the block-complete check);
    * ``threshold`` with ``threshold_rule="sdar"`` (SDAR's ``low_confidence_dynamic``): each step commits the
      schedule's count, or every position with confidence above ``threshold`` if they are more, until the block is
      complete; one read of the device per step.

    A block still holding ``mask_id`` after its last step (the model committed ``mask_id`` itself) raises
    ``RuntimeError``. ``remasking``, ``temperature`` and ``seed`` as in :func:`generate` (step ``s`` of the run uses
    Philox offset ``s``, position ``p`` of the block its counter ``p``: the same draws with and without the cache).

    ``model(ids, attention_mask=m, position_ids=p, past_key_values=c, use_cache=True)`` (without the cache, the
    first two only): ``m`` bool ``[B, 1, n, past + n]`` block-causal, ``p`` the absolute positions; it returns the
    logits ``[B, n, V]`` (or of the last ``block_length <= m' <= n`` positions) or an output with ``.logits`` and
    ``.past_key_values`` (a transformers ``Cache`` such as ``DynamicCache``, or a tuple of per-layer ``(k, v)``).
    Returns ``x`` int64 ``[B, P + gen_length]``, and the number of model calls with ``return_nfe``.
    """
    if not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.int64 or prompt.dim() != 2:
        raise ValueError(f"{_BLOCKS}: prompt must be an int64 [B, P] tensor")
    gen_length = as_int(gen_length, f"{_BLOCKS}: gen_length", low=1)
    block_length = as_int(block_length, f"{_BLOCKS}: block_length", low=1)
    steps_per_block = as_int(steps_per_block, f"{_BLOCKS}: steps_per_block", low=1)
    mask_id = as_int(mask_id, f"{_BLOCKS}: mask_id", low=0)
    if gen_length % block_length:
        raise ValueError(f"{_BLOCKS}: block_length {block_length} must divide gen_length {gen_length}")
    if remasking not in REMASKINGS:
        raise ValueError(f"{_BLOCKS}: remasking must be one of {tuple(REMASKINGS)}, got {remasking!r}")
    if threshold is not None and factor is not None:
        raise ValueError(f"{_BLOCKS}: give threshold or factor, not both")
    _check_loop_threshold_rule(_BLOCKS, threshold_rule, threshold)
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature)
            or temperature < 0):
        raise ValueError(f"{_BLOCKS}: temperature must be a finite number >= 0, got {temperature!r}")
    if (prompt == mask_id).any():
        raise ValueError(f"{_BLOCKS}: the prompt holds mask_id {mask_id}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    scheduled = threshold is None and factor is None
    counted = scheduled or threshold_rule == "sdar"  # steps take the schedule's counts
    batch, prompt_len = prompt.shape
    device = prompt.device
    first = prompt_len // block_length  # the first block with a masked position
    num_blocks = -(-(prompt_len + gen_length) // block_length)
    x = torch.full((batch, num_blocks * block_length), mask_id, dtype=torch.int64, device=device)
    x[:, :prompt_len] = prompt
    commit_all = torch.full((batch,), block_length, dtype=torch.int64, device=device)
    past, cached = None, 0  # the cache holds the keys and values of x[:, :cached], whole committed blocks
    nfe = step = 0
    for block in range(first, num_blocks):
        start, end = block * block_length, (block + 1) * block_length
        num_steps = min(steps_per_block, end - max(start, prompt_len))
        if counted:
            counts = num_transfer_tokens(x[:, start:end] == mask_id, num_steps).t().contiguous()
        for i in range(num_steps):
            lo = cached if use_cache else 0
            ids = x[:, lo:end]
            kwargs = {"attention_mask": _block_causal_mask(batch, lo, end - lo, block_length, device),
                      "position_ids": torch.arange(lo, end, device=device).expand(batch, -1)}
            if use_cache:
                kwargs.update(past_key_values=past, use_cache=True)
            out = model(ids, **kwargs)
            nfe += 1
            logits = getattr(out, "logits", out)
            if (not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] != batch
                    or not block_length <= logits.shape[1] <= ids.shape[1]):
                raise ValueError(f"{_BLOCKS}: the model must return logits [B, m, V] of the last m of its "
                                 f"{ids.shape[1]} positions, {block_length} <= m (or an output with .logits), for "
                                 f"input ids of shape {tuple(ids.shape)}; got "
                                 f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__}")
            if mask_id >= logits.shape[-1]:
                raise ValueError(f"{_BLOCKS}: mask_id {mask_id} is outside the vocabulary of {logits.shape[-1]} tokens")
            if use_cache:
                past = getattr(out, "past_key_values", None)
                if past is None:
                    raise ValueError(f"{_BLOCKS}: with use_cache the model must return .past_key_values")
                past, cached = _crop(past, start), start
            if counted:
                rule = {"num_transfer": counts[i]}
                if not scheduled:
                    rule.update(threshold=threshold, threshold_rule=threshold_rule)
            elif i == num_steps - 1:
                rule = {"num_transfer": commit_all}
            else:
                rule = {"threshold": threshold, "threshold_rule": threshold_rule} if threshold is not None else \
                    {"factor": factor}
            view = x[:, start:end].contiguous()
            res = diffusion_unmask(logits[:, -block_length:], view, mask_id=mask_id, block_start=0,
                                   block_end=block_length, confidence=REMASKINGS[remasking],
                                   temperature=float(temperature), seed=seed, offset=step, **rule)
            step += 1
            x[:, start:end] = view
            if not scheduled or i == num_steps - 1:  # the block-complete check: the only host sync of a step
                low, high = torch.stack([res.remaining.min(), res.remaining.max()]).tolist()
                if low < 0:
                    check_remaining(res.remaining, _BLOCKS)
                if high == 0:
                    break
                if i == num_steps - 1:
                    raise RuntimeError(f"{_BLOCKS}: block {block} still holds mask_id after {num_steps} steps (the "
                                       "model committed mask_id at a masked position)")
    x = x[:, :prompt_len + gen_length]
    return (x, nfe) if return_nfe else x


_DREAM = "fastar.diffusion.generate_dream"
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
_DREAM_CONFIDENCE = {"maskgit_plus": "probability", "topk_margin": "margin", "entropy": "neg_entropy"}


@torch.no_grad()
def generate_dream(
    model,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    steps: int,
    mask_id: int,
    alg: str = "maskgit_plus",
    alg_temp: Optional[float] = None,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    eps: float = 1e-3,
    attention_mask: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    return_nfe: bool = False,
):
    """Dream's ``diffusion_generate`` (``DreamGenerationMixin._sample``) with every step's sampling and commit done
    by :func:`diffusion_unmask` on the device.

    ``input_ids`` (int64 ``[B, P]``, ``P >= 1``, no ``mask_id``) is followed by ``max_new_tokens`` masked positions;
    ``steps`` full forwards over ``x``, step ``i`` going from time ``t`` to ``s`` of ``linspace(1, eps, steps + 1)``.
    Position ``j`` is scored by the model's logits row ``j - 1`` (Dream's shift), which the loop reads through a view
    of the logits. ``alg``:

    * ``"maskgit_plus"`` / ``"topk_margin"`` / ``"entropy"``: every masked position gets a candidate (the argmax,
      or at ``temperature > 0`` a draw from ``softmax(logits / temperature)``) and a confidence under that tempered
      softmax (the candidate's probability, top-1 minus top-2, ``sum p log p``); a row with ``n`` masked positions
      commits its ``int(n * (1 - s / t))`` most confident (all at the last step), or with ``alg_temp > 0`` that many
      drawn without replacement from ``softmax(confidence / alg_temp)`` (Gumbel-top-k);
    * ``"origin"``: each masked position is committed with probability ``1 - s / t`` (all at the last step), to a
      draw from ``softmax(logits / temperature)`` (the argmax at 0); ``alg_temp`` is ignored, as Dream does.

    ``top_p`` / ``top_k``: Dream's filters of the tempered logits (also at ``temperature == 0``, where they change the
    confidences), fused into :func:`diffusion_unmask` (tokens tied with the last kept one are kept). The loop reads
    nothing from the device but once at the end (the invalid-row check). ``seed``: the Philox
    stream of every random draw, step ``i`` at offset ``i``, generated position ``p`` its counter ``p``; ``None``
    draws a seed from torch's CPU generator.

    ``attention_mask`` (``[B, P]``, 0 at left padding): as Dream, if it holds a 0 the model is called as
    ``model(x, attention_mask=m, position_ids=p)``, ``m`` bool ``[B, 1, L, L]`` true where query and key are both
    not padding, ``p`` the positions counted from each row's first token; else as ``model(x)``.

    The model returns logits ``[B, P + max_new_tokens, V]`` (float32, float16 or bfloat16) or an output with
    ``.logits``. Returns ``x`` int64 ``[B, P + max_new_tokens]`` (a position whose committed token is ``mask_id``
    stays masked, as in Dream), and the number of model calls (``steps``) with ``return_nfe``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64 or input_ids.dim() != 2:
        raise ValueError(f"{_DREAM}: input_ids must be an int64 [B, P] tensor")
    if input_ids.shape[1] < 1:
        raise ValueError(f"{_DREAM}: input_ids must hold at least one token (position j is scored by row j - 1)")
    max_new_tokens = as_int(max_new_tokens, f"{_DREAM}: max_new_tokens", low=1)
    steps = as_int(steps, f"{_DREAM}: steps", low=1)
    mask_id = as_int(mask_id, f"{_DREAM}: mask_id", low=0)
    if alg not in DREAM_ALGS:
        raise ValueError(f"{_DREAM}: alg must be one of {DREAM_ALGS}, got {alg!r}")

    def number(name, value, ok, need):
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or not ok(value)):
            raise ValueError(f"{_DREAM}: {name} must be {need}, got {value!r}")
        return float(value)

    temperature = number("temperature", temperature, lambda v: v >= 0, "a finite number >= 0")
    eps = number("eps", eps, lambda v: 0 <= v < 1, "a number in [0, 1)")
    if alg_temp is not None:
        alg_temp = number("alg_temp", alg_temp, lambda v: v >= 0, "None or a finite number >= 0")
    if top_p is not None:
        top_p = number("top_p", top_p, lambda v: 0 < v <= 1, "None or a number in (0, 1]")
    if top_k is not None:
        top_k = as_int(top_k, f"{_DREAM}: top_k", low=1)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and mask_id >= vocab:  # else checked on the first logits
        raise ValueError(f"{_DREAM}: mask_id {mask_id} is outside the vocabulary of {vocab} tokens")
    if (input_ids == mask_id).any():
        raise ValueError(f"{_DREAM}: input_ids hold mask_id {mask_id}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    length = prompt_len + max_new_tokens
    model_kwargs = {}
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"{_DREAM}: attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}")
        if (attention_mask == 0).any():  # Dream's padded-batch path
            keep_mask = torch.nn.functional.pad(attention_mask.to(device).bool(), (0, max_new_tokens), value=True)
            position_ids = (keep_mask.long().cumsum(-1) - 1).masked_fill_(~keep_mask, 1)
            model_kwargs = dict(attention_mask=keep_mask[:, None, None, :] & keep_mask[:, None, :, None],
                                position_ids=position_ids)
    x = torch.full((batch, length), mask_id, dtype=torch.int64, device=device)
    x[:, :prompt_len] = input_ids
    timesteps = torch.linspace(1, eps, steps + 1, device=device)  # float32 on x's device, as Dream's
    keep = timesteps[1:] / timesteps[:-1]  # s / t of every step
    keep_host = keep.tolist() if alg == "origin" else None  # origin's thresholds: one read before the loop
    left = torch.full((batch,), max_new_tokens, dtype=torch.int64, device=device)  # masked count of each row
    worst = left.clone()  # the minimum of every step's remaining: -1 marks a row a CUDA kernel found invalid
    for i in range(steps):
        logits = _logits_of(model(x, **model_kwargs))
        if logits.dim() != 3 or logits.shape[:2] != x.shape:
            raise ValueError(f"{_DREAM}: the model returned logits of shape {tuple(logits.shape)} for input ids of "
                             f"shape {tuple(x.shape)}; expected [B, len, V]")
        if mask_id >= logits.shape[-1]:
            raise ValueError(f"{_DREAM}: mask_id {mask_id} is outside the vocabulary of {logits.shape[-1]} tokens")
        scores = logits[:, prompt_len - 1:length - 1]  # row j - 1 for generated position j: a view
        gen = x[:, prompt_len:]
        view = gen if gen.is_contiguous() else gen.contiguous()
        last = i == steps - 1
        # Dream's confidences are under the tempered, filtered softmax its candidates are drawn from.
        step = dict(mask_id=mask_id, block_start=0, block_end=max_new_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, confidence_source="sampling", seed=seed, offset=i)
        if alg == "origin" and not last:  # each masked position committed with probability 1 - s / t
            res = diffusion_unmask(scores, view, confidence="random", threshold_rule="dimple",
                                   threshold=keep_host[i], num_transfer=torch.zeros_like(left), **step)
        else:
            count = left if last else (left.to(torch.float32) * (1 - keep[i])).to(torch.int64)
            res = diffusion_unmask(scores, view, confidence=_DREAM_CONFIDENCE.get(alg, "random"), num_transfer=count,
                                   confidence_noise=alg_temp if alg_temp and alg != "origin" else 0.0, **step)
        left = res.remaining
        torch.minimum(worst, left, out=worst)
        if view is not gen:
            gen.copy_(view)
    check_remaining(worst, _DREAM)
    return (x, steps) if return_nfe else x
