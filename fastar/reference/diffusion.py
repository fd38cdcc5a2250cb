"""Reference of fastar.diffusion_unmask: plain float64 PyTorch transcriptions of the official per-step rules of
masked-diffusion LMs, shared with the tests and the benchmark.

* LLaDA (``generate.py``): ``get_num_transfer_tokens``, ``add_gumbel_noise`` (float64), low-confidence /
  random remasking and the per-row ``topk`` over the masked positions of the current block;
* Fast-dLLM (``get_transfer_index``, ``get_transfer_index_dynamic``): the threshold and factor rules;
* Dream (``sample_tokens``): the ``maskgit_plus`` / ``topk_margin`` / ``entropy`` confidences, and its whole loop
  (``DreamGenerationMixin._sample``, with ``top_p_logits`` / ``top_k_logits``);
* dInfer's threshold (``min(threshold, max confidence - 1e-5)``) and Dimple's confident decoding (every confidence
  above the threshold, else the scheduled count);
* MaskGIT: the cosine schedule of masked counts, and its annealed Gumbel noise on the log-probabilities;
* the whole loop: LLaDA's ``generate`` and Fast-dLLM's ``generate`` / ``generate_with_prefix_cache`` /
  ``generate_with_dual_cache``.

Ties: where the official code calls ``torch.topk`` (whose order among equal values is unspecified), this
reference takes equal confidences by the lowest position (a stable descending sort); ``argmax`` takes the lowest
index, as ``torch.argmax`` does on the CPU.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

__all__ = [
    "add_gumbel_noise",
    "diffusion_confidence_reference",
    "diffusion_unmask_reference",
    "dream_filter_keep",
    "dream_generate_reference",
    "dream_sampling_probs",
    "fast_dllm_factor_thresholds",
    "llada_generate_reference",
    "llada_num_transfer_tokens",
    "maskgit_masked_counts",
]


def llada_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: each row's masked count split over ``steps``, the first
    ``count % steps`` steps one more. int64 ``[B, steps]``."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : int(remainder[i])] += 1
    return num_transfer_tokens


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator] = None):
    """LLaDA's Gumbel-max in float64: ``exp(logits) / (-log u) ** temperature``, whose argmax is a draw from
    ``softmax(logits / temperature)``; the logits unchanged at temperature 0."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def diffusion_confidence_reference(logits: torch.Tensor, x0: torch.Tensor, kind: str) -> torch.Tensor:
    """float64 ``[B, L]`` confidence of candidates ``x0`` under ``softmax(logits)`` (float64): ``"probability"``
    (LLaDA's gather of ``x0_p``, Dream's ``maskgit_plus``), ``"margin"`` (Dream's ``topk_margin``: top-1 minus
    top-2 probability), ``"neg_entropy"`` (Dream's ``entropy``: ``sum p log(p + 1e-10)``), ``"log_probability"``
    (MaskGIT's ``log(probs)`` of the sampled token)."""
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    if kind == "probability":
        return torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    if kind == "log_probability":
        return torch.gather(torch.log_softmax(logits.to(torch.float64), dim=-1), -1, x0.unsqueeze(-1)).squeeze(-1)
    if kind == "margin":
        sorted_probs, _ = torch.sort(p, dim=-1, descending=True)
        return sorted_probs[..., 0] - sorted_probs[..., 1]
    if kind == "neg_entropy":
        return torch.sum(p * torch.log(p + 1e-10), dim=-1)
    raise ValueError(kind)


def dream_filter_keep(logits: torch.Tensor, temperature: float = 0.0, top_p: Optional[float] = None,
                      top_k: Optional[int] = None) -> torch.Tensor:
    """bool ``[..., V]``: the tokens Dream's ``top_p_logits`` then ``top_k_logits`` keep, decided by value (the
    convention of fastar.diffusion_unmask): a token is kept when the mass of ``softmax(logits / temperature)``
    (temperature 0: 1) over the tokens with a strictly larger logit is ``<= top_p``, and when its logit is ``>=``
    the ``top_k``-th largest. Tokens tied with a kept logit are kept (Dream's sort keeps some of them)."""
    x = logits.to(torch.float64)
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_p is not None and top_p < 1:
        p = torch.softmax(x / (temperature if temperature > 0 else 1.0), dim=-1)
        flat_x, flat_p, flat_keep = x.reshape(-1, x.shape[-1]), p.reshape(-1, x.shape[-1]), keep.view(-1, x.shape[-1])
        for r in range(flat_x.shape[0]):
            larger = flat_x[r][None, :] > flat_x[r][:, None]  # [i, j]: token j's logit is larger than token i's
            flat_keep[r] &= (larger.to(torch.float64) * flat_p[r][None, :]).sum(-1) <= top_p
    if top_k is not None and top_k < x.shape[-1]:
        keep &= x >= torch.topk(x, top_k, dim=-1).values[..., -1:]
    return keep


def dream_sampling_probs(logits: torch.Tensor, temperature: float = 0.0, top_p: Optional[float] = None,
                         top_k: Optional[int] = None) -> torch.Tensor:
    """float64 ``[..., V]``: the distribution Dream's ``sample_tokens`` draws from and scores with:
    ``softmax(logits / temperature)`` (temperature 0: 1) over the tokens :func:`dream_filter_keep` keeps, 0
    elsewhere."""
    x = logits.to(torch.float64) / (temperature if temperature > 0 else 1.0)
    x = x.masked_fill(~dream_filter_keep(logits, temperature, top_p, top_k), -math.inf)
    return torch.softmax(x, dim=-1)


def fast_dllm_factor_thresholds(n: int, factor: float) -> List[float]:
    """Fast-dLLM's factor thresholds for ``n`` masked positions: ``1 - factor / (r + 2)`` at rank ``r``, the first
    one -1 (at least one token is committed)."""
    threshs = [1 - factor / (k + 1) for k in range(1, n + 1)]
    threshs[0] = -1
    return threshs


def _descending(conf_row: torch.Tensor) -> torch.Tensor:
    """Positions by decreasing confidence, equal ones by the lowest position (torch.topk with a tie rule)."""
    return torch.sort(conf_row, descending=True, stable=True).indices


def diffusion_unmask_reference(
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
    random_confidence: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the official loop (LLaDA's ``generate`` body, Fast-dLLM's ``get_transfer_index`` /
    ``get_transfer_index_dynamic``, dInfer's and Dimple's thresholds, MaskGIT's noisy confidence): returns
    ``(new x, x0, confidence)``, the confidence float64 ``[B, L]`` (-inf off the masked block positions).
    ``random_confidence`` ``[B, L]`` stands for ``torch.rand`` of the random remasking, and is the uniform of
    MaskGIT's Gumbel noise ``confidence_noise * -log(-log u)``."""
    x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)
    if confidence == "random":
        x0_p = random_confidence.to(torch.float64)
    else:
        x0_p = diffusion_confidence_reference(logits, x0, confidence)
        if confidence_noise:
            u = random_confidence.to(torch.float64).clamp(min=2.0**-54)  # the kernels' stand-in for u = 0
            x0_p = x0_p + confidence_noise * -torch.log(-torch.log(u))
    mask_index = x == mask_id
    mask_index[:, :block_start] = False
    mask_index[:, block_end:] = False
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, x0_p, torch.full_like(x0_p, -math.inf))
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(conf.shape[0]):
        n = int(mask_index[j].sum())
        order = _descending(conf[j])
        if threshold_rule == "dimple":  # every one above the threshold, else the scheduled count
            above = order[:n][conf[j, order[:n]] > threshold]
            transfer_index[j, above if len(above) else order[: int(num_transfer[j])]] = True
        elif threshold_rule == "sdar":  # SDAR's dynamic rule: above the threshold if at least the count, else top-k
            high = conf[j] > threshold
            if int(high.sum()) >= int(num_transfer[j]):
                transfer_index[j] = high
            else:
                transfer_index[j, order[: int(num_transfer[j])]] = True  # SDAR's topk, ties to the lower position
        elif num_transfer is not None:  # LLaDA
            select_index = order[: int(num_transfer[j])]
            transfer_index[j, select_index] = True
        elif threshold is not None and threshold_rule == "dinfer":  # dInfer: the top-1 within 1e-5 always passes
            if n:
                bar = min(threshold, float(conf[j, order[0]]) - 1e-5)
                transfer_index[j, order[:n][conf[j, order[:n]] >= bar]] = True
        elif threshold is not None:  # Fast-dLLM: top-1, then the others above the threshold
            select_index = order[:n]
            transfer_index[j, select_index] = True
            for k in range(1, n):
                if conf[j, select_index[k]] < threshold:
                    transfer_index[j, select_index[k]] = False
        else:  # Fast-dLLM's factor rule
            if n == 0:
                continue
            threshs = fast_dllm_factor_thresholds(n, factor)
            sorted_confidence = torch.sort(conf[j][mask_index[j]], descending=True)[0]
            for top_i in range(len(threshs)):
                if sorted_confidence[top_i] < threshs[top_i]:
                    break
            if top_i == 0 or top_i == len(threshs) - 1:
                top_i += 1
            transfer_index[j, order[:top_i]] = True
    transfer_index &= mask_index  # a k beyond the masked count picks -inf positions, where x0 = x: no change
    new_x = x.clone()
    new_x[transfer_index] = x0[transfer_index]
    return new_x, x0, conf


def llada_generate_reference(
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
    generator: Optional[torch.Generator] = None,
    random_confidence: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    threshold_rule: str = "fast_dllm",
) -> Tuple[torch.Tensor, int]:
    """LLaDA's ``generate`` (``threshold`` / ``factor`` / ``cache``: Fast-dLLM's loops), each step by
    :func:`diffusion_unmask_reference` (float64). Returns ``(x, model calls)``.

    Without a rule, ``steps // num_blocks`` steps per block on LLaDA's schedule; with one, steps until the block
    holds no ``mask_id`` (``threshold_rule="sdar"``: the schedule's counts with the threshold, at most
    ``steps // num_blocks`` steps, until the block is complete). ``cache="prefix"``: per block one full forward
    with ``use_cache=True`` whose cache is cut to the block start, then forwards of ``x[:, block_start:]`` on it;
    ``"dual"``: the full cache kept, forwards of the block with ``replace_position``. ``random_confidence(step,
    x_view)`` gives the random remasking's values for the positions of the tokens the step scores (default
    ``torch.rand``); step counts over the whole run."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    nfe, step = 0, 0
    scheduled = threshold is None and factor is None
    counted = scheduled or threshold_rule == "sdar"

    def logits_of(start, end, **kwargs):
        nonlocal nfe
        nfe += 1
        if cfg_scale > 0.0:
            un_x = x.clone()
            un_x[prompt_index] = mask_id
            x_ = torch.cat([x[:, start:end], un_x[:, start:end]], dim=0)
            out = model(x_, **kwargs)
            logits, un_logits = torch.chunk(getattr(out, "logits", out), 2, dim=0)
            return un_logits + (cfg_scale + 1) * (logits - un_logits), out
        out = model(x[:, start:end], **kwargs)
        return getattr(out, "logits", out), out

    def commit(logits, start, end, block_start, block_end, num_transfer):
        nonlocal step
        view = x[:, start:end].clone()
        rand = None
        if remasking == "random":
            rand = (random_confidence(step, view) if random_confidence is not None
                    else torch.rand(view.shape, dtype=torch.float64, generator=generator))
        confidence = "probability" if remasking == "low_confidence" else "random"
        new_view, _, _ = diffusion_unmask_reference(
            logits, view, mask_id=mask_id, block_start=block_start - start, block_end=block_end - start,
            num_transfer=num_transfer, threshold=threshold, factor=factor, confidence=confidence,
            threshold_rule=threshold_rule, temperature=temperature, random_confidence=rand, generator=generator)
        x[:, start:end] = new_view
        step += 1

    for num_block in range(num_blocks):
        block_start = prompt.shape[1] + num_block * block_length
        block_end = block_start + block_length
        block_mask_index = x[:, block_start:block_end] == mask_id
        num_transfer_tokens = llada_num_transfer_tokens(block_mask_index, steps)

        def count(i, table=num_transfer_tokens):
            return table[:, i] if counted else None

        def done(i, lo=block_start, hi=block_end):
            complete = bool((x[:, lo:hi] == mask_id).sum() == 0)
            return (i == steps or complete) if threshold_rule == "sdar" else (i == steps) if scheduled else complete

        if cache is None:
            i = 0
            while True:
                logits, _ = logits_of(0, x.shape[1])
                commit(logits, 0, x.shape[1], block_start, block_end, count(i))
                i += 1
                if done(i):
                    break
            continue
        logits, output = logits_of(0, x.shape[1], use_cache=True)
        past_key_values = output.past_key_values
        if cache == "prefix":
            past_key_values = tuple(tuple(t[:, :, :block_start] for t in layer) for layer in past_key_values)
        commit(logits, 0, x.shape[1], block_start, block_end, count(0))
        i = 1
        while not done(i):
            if cache == "prefix":
                logits, _ = logits_of(block_start, x.shape[1], past_key_values=past_key_values, use_cache=True)
                commit(logits, block_start, x.shape[1], block_start, block_end, count(i))
            else:
                replace_position = torch.zeros(x.shape[0] * (2 if cfg_scale > 0 else 1), x.shape[1],
                                               dtype=torch.bool)
                replace_position[:, block_start:block_end] = True
                logits, _ = logits_of(block_start, block_end, past_key_values=past_key_values, use_cache=True,
                                      replace_position=replace_position)
                commit(logits, block_start, block_end, block_start, block_end, count(i))
            i += 1
    return x, nfe


def maskgit_masked_counts(num_tokens: int, steps: int) -> List[int]:
    """MaskGIT's cosine schedule (``parallel_decode``): the tokens still masked after each step,
    ``max(1, min(unknown - 1, floor(N cos(pi/2 (t + 1) / T))))``, and none after the last step (whose
    sampled tokens are the output)."""
    masked, out = num_tokens, []
    for step in range(steps):
        ratio = (step + 1) / steps
        mask_len = math.floor(num_tokens * math.cos(math.pi / 2 * ratio))
        mask_len = max(1, min(masked - 1, mask_len))
        masked = 0 if step == steps - 1 else mask_len
        out.append(masked)
    return out


def _dream_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Dream's ``top_p_logits``: outside the nucleus (cumulative probability above ``top_p``, shifted by one so
    that the first token stays) set to the dtype's lowest value."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
    sorted_indices_to_remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask = mask.scatter_(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _dream_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dream's ``top_k_logits``: logits below the k-th largest set to the dtype's lowest value."""
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


def _dream_sample_tokens(logits, temperature, top_p, top_k, kind, generator):
    """Dream's ``sample_tokens`` on rows ``[N, V]`` (float64): ``(confidence, x0)``, the confidence ``kind`` of
    :func:`diffusion_confidence_reference` under the tempered, filtered softmax; at temperature 0 the argmax (the
    lowest index among ties)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _dream_top_p(logits, top_p)
    if top_k is not None:
        logits = _dream_top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        x0 = torch.argmax(probs, dim=-1)
    return diffusion_confidence_reference(logits, x0, kind), x0


def dream_generate_reference(
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
    generator: Optional[torch.Generator] = None,
    rand: Optional[Callable[[int, torch.Size], torch.Tensor]] = None,
) -> Tuple[torch.Tensor, int]:
    """Dream's ``DreamGenerationMixin._sample`` (no hooks, no history), the logits in float64,
    the random draws from ``generator`` (``torch.rand``, ``torch.multinomial``). ``rand(step, x.shape)`` gives
    ``origin``'s uniforms of every position instead (float64 ``[B, L]``). Returns ``(x, model calls)``.

    As Dream: timesteps ``linspace(1, eps, steps + 1)`` in float32; the logits shifted by one position; the
    transfer count ``int(mean masked count * (1 - s / t))`` in float32, one count for every row; ``topk`` of the
    confidences (here by the lowest position among ties), or with ``alg_temp`` a ``multinomial`` without
    replacement from ``softmax(confidence / alg_temp)``."""
    kinds = {"maskgit_plus": "probability", "topk_margin": "margin", "entropy": "neg_entropy"}
    x = torch.nn.functional.pad(input_ids, (0, max_new_tokens), value=mask_id)
    kwargs = {}
    if attention_mask is not None and torch.any(attention_mask == 0.0):
        attention_mask = torch.nn.functional.pad(attention_mask, (0, max_new_tokens), value=1.0)
        tok_idx = attention_mask.long().cumsum(-1) - 1
        tok_idx.masked_fill_(attention_mask == 0, 1)
        attention_mask = torch.logical_and(
            attention_mask.unsqueeze(1).unsqueeze(-2),
            attention_mask.unsqueeze(1).unsqueeze(-1),
        )
        kwargs = dict(attention_mask=attention_mask, position_ids=tok_idx)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        out = model(x, **kwargs)
        logits = getattr(out, "logits", out).to(torch.float64)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_id
            u = (rand(i, x.shape)[mask_index] if rand is not None
                 else torch.rand(x0.shape, dtype=torch.float64, generator=generator))
            transfer_index_t_s = u < p_transfer
            _, x0[transfer_index_t_s] = _dream_sample_tokens(mask_logits[transfer_index_t_s], temperature, top_p,
                                                             top_k, "probability", generator)
            x[mask_index] = x0
            continue
        confidence, x0 = _dream_sample_tokens(mask_logits, temperature, top_p, top_k, kinds[alg], generator)
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full(x.shape, -math.inf, dtype=torch.float64)
        full_confidence[mask_index] = confidence
        if number_transfer_tokens > 0:
            if alg_temp is None or alg_temp == 0:
                transfer_index = torch.stack([_descending(row)[:number_transfer_tokens] for row in full_confidence])
            else:
                weights = torch.softmax(full_confidence / alg_temp, dim=-1)
                transfer_index = torch.multinomial(weights, number_transfer_tokens, generator=generator)
            x_ = torch.zeros_like(x) + mask_id
            x_[mask_index] = x0
            row_indices = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
            x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x, steps
