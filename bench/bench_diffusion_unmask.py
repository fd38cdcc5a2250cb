"""fastar.diffusion_unmask against the per-step PyTorch code of LLaDA's ``generate`` (as Fast-dLLM and most
research repos copy it): Gumbel noise in float64 over the whole [B, L, V] logits (temperature > 0), a float64
softmax over [B, L, V], a gather, -inf past the block, and a per-row ``torch.topk`` in a Python loop.

The case is LLaDA-8B's vocabulary (V = 126464, mask id 126336), a 256-token generation in blocks of 32, 128
steps (2 tokens per step), in the middle of block 2: earlier blocks committed, later ones masked, 20 of the
block's 32 positions still masked. The logits are the model's bfloat16 output.

With ``top_p`` the step is Dream's recipe instead (``alg="entropy"``, temperature 0.2, ``top_p`` 0.95): its
``sample_tokens`` as written (tempered logits, ``top_p_logits``' sort over V, softmax, ``Categorical`` draw, entropy
in the logits' dtype) on the block's masked rows, then ``topk`` over the row; fastar's op with ``top_p`` and
``confidence_source="sampling"``. Dream's shifted-logits copy is left out on both sides."""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastar
from bench import common
from bench.bench_diffusion_generate import dream_sample_tokens
from fastar.reference import add_gumbel_noise

MASK_ID = 126336


@dataclasses.dataclass(frozen=True)
class UnmaskCase:
    B: int
    temperature: float
    V: int = 126464
    gen_length: int = 256
    block_length: int = 32
    block: int = 2  # the current block
    still_masked: int = 20  # of its positions
    per_step: int = 2  # tokens committed per step (LLaDA: steps 128 for 256 tokens)
    dtype: torch.dtype = torch.bfloat16
    top_p: Optional[float] = None  # Dream's recipe (entropy confidence under the tempered, filtered softmax)

    @property
    def id(self) -> str:
        dream = f"-dream-p{self.top_p:g}" if self.top_p is not None else ""
        return f"B{self.B}-V{self.V}-block{self.block_length}-t{self.temperature:g}{dream}"

    @property
    def shape(self) -> str:
        dream = f" Dream top_p {self.top_p:g}" if self.top_p is not None else ""
        return f"B={self.B} L={self.gen_length} V={self.V} block {self.block_length} T={self.temperature:g}{dream}"

    @property
    def mask_id(self) -> int:  # LLaDA's, or the vocabulary's last token for a smaller one
        return min(MASK_ID, self.V - 1)

    @property
    def bounds(self) -> tuple[int, int]:
        return self.block * self.block_length, (self.block + 1) * self.block_length


CASES = [UnmaskCase(1, 0.0), UnmaskCase(8, 0.0), UnmaskCase(1, 1.0), UnmaskCase(8, 1.0),
         UnmaskCase(1, 0.2, top_p=0.95), UnmaskCase(8, 0.2, top_p=0.95)]


def llada_step(logits: torch.Tensor, x: torch.Tensor, num_transfer: torch.Tensor, block_end: int,
               temperature: float, mask_id: int = MASK_ID) -> torch.Tensor:
    """One step of LLaDA's ``generate`` after the forward (its code, low_confidence remasking), on x in place."""
    mask_index = x == mask_id
    logits_with_noise = add_gumbel_noise(logits, temperature=temperature)
    x0 = torch.argmax(logits_with_noise, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    x0_p[:, block_end:] = -np.inf
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer[j]))
        transfer_index[j, select_index] = True
    x[transfer_index] = x0[transfer_index]
    return x


def dream_step(logits: torch.Tensor, x: torch.Tensor, num_transfer: torch.Tensor, bounds: tuple[int, int],
               temperature: float, top_p: float, mask_id: int) -> torch.Tensor:
    """One step of Dream's ``_sample`` after the forward (``alg="entropy"``, its code) over the block's masked
    positions, on x in place."""
    mask_index = x == mask_id
    mask_index[:, :bounds[0]] = False
    mask_index[:, bounds[1]:] = False
    confidence, x0 = dream_sample_tokens(logits[mask_index], temperature, top_p, neg_entropy=True)
    full_confidence = torch.full_like(x, -torch.inf, device=x.device, dtype=logits.dtype)
    full_confidence[mask_index] = confidence
    _, transfer_index = torch.topk(full_confidence, int(num_transfer[0]))
    x_ = torch.zeros_like(x, device=x.device, dtype=torch.long) + mask_id
    x_[mask_index] = x0.clone()
    row_indices = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer_index)
    x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x


def make_inputs(case: UnmaskCase, device: str = "cpu") -> dict:
    gen = torch.Generator(device).manual_seed(0)
    L = case.gen_length
    logits = (torch.randn(case.B, L, case.V, generator=gen, device=device) * 3).to(case.dtype)
    start, end = case.bounds
    x = torch.randint(0, case.mask_id, (case.B, L), generator=gen, device=device)
    x[:, end:] = case.mask_id
    for b in range(case.B):
        x[b, start + torch.randperm(case.block_length, generator=gen)[: case.still_masked]] = case.mask_id
    num_transfer = torch.full((case.B,), case.per_step, dtype=torch.int64, device=device)
    return {"case": case, "logits": logits, "x": x, "num_transfer": num_transfer}


def poison_outputs(case: UnmaskCase, device: str) -> None:
    """Fill memory of the op's outputs' size with -1 and free it, so its outputs likely reuse it."""
    torch.full((case.B, case.block_length), -1, dtype=torch.int64, device=device)
    torch.full((case.B,), -1, dtype=torch.int64, device=device)


def run_fastar(x: dict, seed: int) -> torch.Tensor:
    case = x["case"]
    start, end = case.bounds
    poison_outputs(case, x["x"].device.type)
    out = x["x"].clone()
    dream = {} if case.top_p is None else dict(confidence="neg_entropy", top_p=case.top_p, confidence_source="sampling")
    fastar.diffusion_unmask(x["logits"], out, mask_id=case.mask_id, block_start=start, block_end=end,
                            num_transfer=x["num_transfer"], temperature=case.temperature, seed=seed, **dream)
    return out


def run_torch(x: dict, seed: int) -> torch.Tensor:
    case = x["case"]
    if case.top_p is not None:
        return dream_step(x["logits"], x["x"].clone(), x["num_transfer"], case.bounds, case.temperature, case.top_p,
                          case.mask_id)
    return llada_step(x["logits"], x["x"].clone(), x["num_transfer"], case.bounds[1], case.temperature, case.mask_id)


def check(case: UnmaskCase, x: dict, out: torch.Tensor) -> None:
    """Exactly per_step positions of each row's block committed, to tokens in [0, V); nothing else changed."""
    start, end = case.bounds
    changed = out != x["x"]
    assert not changed[:, :start].any() and not changed[:, end:].any(), "a position outside the block changed"
    assert (changed.sum(1) == case.per_step).all(), f"committed {changed.sum(1).tolist()}, not {case.per_step} a row"
    assert (x["x"][changed] == case.mask_id).all(), "an unmasked position was overwritten"
    assert ((out[changed] >= 0) & (out[changed] < case.V)).all(), "a committed token outside [0, V)"


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """At temperature 0 the same commits as LLaDA's code; with Gumbel sampling both draw (different RNGs), so
    only the checks above apply to each."""
    if x["case"].temperature == 0:
        for a, b in zip(fastar_runs, torch_runs):
            assert torch.equal(a, b), "fastar commits other tokens than LLaDA's step at temperature 0"


def metrics(case: UnmaskCase, x: dict, outputs: list) -> dict:
    """bytes: the logits of the block's masked positions read once."""
    return {"bytes": case.B * case.still_masked * case.V * x["logits"].element_size()}


TABLE = common.Table(
    "diffusion_unmask: fastar.diffusion_unmask vs one step of LLaDA's generate (float64 Gumbel noise over [B, L, V]"
    " at T > 0, float64 softmax, gather, per-row topk loop), or of Dream's (top_p's sort); median time per call,"
    " cold caches; GB/s: the masked block rows' logits read once / time; others: share of the cores other"
    " processes used meanwhile",
    common.op_columns(16, 40, torch_gbps=False),
)

BENCH = common.OpBench("diffusion_unmask", CASES, make_inputs, run_fastar, run_torch, check, agree, metrics, TABLE,
                       goal=20.0)

# ---------------------------------------------------------------------------------------------------------
# pytest-benchmark (`pytest bench`)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_diffusion_unmask_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_diffusion_unmask_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case), rounds=2)


def test_diffusion_unmask_checks_catch_wrong_commits():
    """check rejects a step that commits nothing and one that writes outside the block."""
    case = CASES[0]
    x = inputs(case)
    out = run_fastar(x, 0)
    check(case, x, out)
    with pytest.raises(AssertionError, match="committed"):
        check(case, x, x["x"].clone())
    outside = out.clone()
    outside[:, -1] = 0
    with pytest.raises(AssertionError, match="outside the block"):
        check(case, x, outside)
