"""The whole masked-diffusion loop: ``fastar.diffusion.generate`` against LLaDA's ``generate`` as its repository
writes it (float64 Gumbel noise over ``[B, L, V]`` at T > 0, a float64 softmax, a gather, a per-row ``topk`` in a
Python loop; Fast-dLLM's ``get_transfer_index`` for the threshold rule), and ``fastar.diffusion.generate_dream``
against Dream's ``_sample`` loop (the shifted ``[B, L, V]`` copy, ``sample_tokens`` on the masked rows in the
logits' dtype, ``topk``), on the same model.

The model is LLaDA-shaped and random-initialised (no weights can be downloaded here): LLaDA-8B's vocabulary
(V = 126464, mask id 126336), bidirectional attention, RMSNorm, RoPE, SwiGLU, but 2 layers of hidden 128, so that
it runs on this machine. Two departures make its confidences look like a trained model's: a random absolute
position embedding (else every masked position predicts nearly the same distribution) and a head scaled so that
the threshold rule at 0.9 commits 2-3 tokens a step. bfloat16. Batch 1, a 32-token prompt, blocks of 32; 256 new
tokens in 64 steps, or 64 in 16 (the ``L64`` cases, for a quick run). ``tok/fwd``: new tokens per model call.
The model's forward is most of fastar's time: the speed-up grows as the model shrinks relative to V."""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastar
from bench import common
from fastar.reference import add_gumbel_noise, dream_generate_reference, llada_num_transfer_tokens

MASK_ID, VOCAB = 126336, 126464
HIDDEN, HEADS, MLP, LAYERS = 128, 4, 344, 2
HEAD_SCALE = 50.0  # threshold 0.9 then commits 2-3 tokens a step (a random head gives top probabilities ~1e-4)
PROMPT = 32
MAX_LENGTH = 512


@dataclasses.dataclass(frozen=True)
class GenerateCase:
    temperature: float
    threshold: Optional[float] = None
    gen_length: int = 256
    steps: int = 64
    block_length: int = 32
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        rule = f"thr{self.threshold:g}" if self.threshold is not None else f"steps{self.steps}"
        return f"L{self.gen_length}-block{self.block_length}-{rule}-t{self.temperature:g}"

    @property
    def shape(self) -> str:
        rule = f"threshold {self.threshold:g}" if self.threshold is not None else f"{self.steps} steps"
        return f"{self.gen_length} tok, block {self.block_length}, {rule}, T={self.temperature:g}"

    def kwargs(self) -> dict:
        return dict(steps=self.steps, gen_length=self.gen_length, block_length=self.block_length,
                    temperature=self.temperature, threshold=self.threshold)


CASES = [GenerateCase(0.0), GenerateCase(1.0), GenerateCase(0.0, threshold=0.9, steps=8),
         GenerateCase(0.0, gen_length=64, steps=16), GenerateCase(1.0, gen_length=64, steps=16),
         GenerateCase(0.0, threshold=0.9, gen_length=64, steps=2)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 500000.0) -> torch.Tensor:
    half = x.shape[-1] // 2
    angles = positions[:, None].float() / base ** (torch.arange(half, device=x.device).float() / half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(HIDDEN), RMSNorm(HIDDEN)
        self.qkv, self.out = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False), nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate_up, self.down = nn.Linear(HIDDEN, 2 * MLP, bias=False), nn.Linear(MLP, HIDDEN, bias=False)

    def forward(self, h, positions):
        batch, n, _ = h.shape
        q, k, v = (t.view(batch, n, HEADS, -1).transpose(1, 2) for t in self.qkv(self.attn_norm(h)).chunk(3, -1))
        attn = F.scaled_dot_product_attention(rope(q, positions), rope(k, positions), v)  # non-causal
        h = h + self.out(attn.transpose(1, 2).reshape(batch, n, HIDDEN))
        gate, up = self.gate_up(self.mlp_norm(h)).chunk(2, -1)
        return h + self.down(F.silu(gate) * up)


@dataclasses.dataclass
class Output:
    logits: torch.Tensor


class LLaDALike(nn.Module):
    """``model(ids).logits``: bfloat16 ``[B, n, V]``, as LLaDA's model returns them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Embedding(MAX_LENGTH, HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm, self.head = RMSNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB, bias=False)

    @torch.no_grad()
    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.position(positions)
        for layer in self.layers:
            h = layer(h, positions)
        return Output(self.head(self.norm(h)))


@functools.cache
def model(device: str) -> LLaDALike:
    torch.manual_seed(0)
    m = LLaDALike()
    with torch.no_grad():
        m.head.weight.mul_(HEAD_SCALE)
    return m.to(torch.bfloat16).to(device).eval()


def llada_generate(model, prompt, steps, gen_length, block_length, temperature, threshold):
    """LLaDA's ``generate`` (low_confidence remasking, no CFG) as its repository writes it; with ``threshold``
    Fast-dLLM's ``generate``: steps until the block is complete, ``get_transfer_index``'s threshold rule.
    Returns (x, model calls)."""
    x = torch.full((1, prompt.shape[1] + gen_length), MASK_ID, dtype=torch.long, device=prompt.device)
    x[:, : prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    nfe = 0
    for num_block in range(num_blocks):
        block_start = prompt.shape[1] + num_block * block_length
        block_end = block_start + block_length
        block_mask_index = x[:, block_start:block_end] == MASK_ID
        num_transfer_tokens = llada_num_transfer_tokens(block_mask_index.cpu(), steps)
        i = 0
        while True:
            mask_index = x == MASK_ID
            logits = model(x).logits
            nfe += 1
            logits_with_noise = add_gumbel_noise(logits, temperature=temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, block_end:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for j in range(confidence.shape[0]):
                k = int(mask_index[j, :block_end].sum()) if threshold is not None else int(num_transfer_tokens[j, i])
                _, select_index = torch.topk(confidence[j], k=k)
                transfer_index[j, select_index] = True
                if threshold is not None:
                    for r in range(1, k):
                        if confidence[j, select_index[r]] < threshold:
                            transfer_index[j, select_index[r]] = False
            x[transfer_index] = x0[transfer_index]
            i += 1
            if (i == steps) if threshold is None else (x[:, block_start:block_end] == MASK_ID).sum() == 0:
                break
    return x, nfe


def make_inputs(case: GenerateCase, device: str = "cpu") -> dict:
    prompt = torch.randint(0, MASK_ID, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)
    return {"case": case, "model": model(device), "prompt": prompt, "nfe": []}


def run_fastar(x: dict, seed: int) -> torch.Tensor:
    out, nfe = fastar.diffusion.generate(x["model"], x["prompt"], mask_id=MASK_ID, seed=seed, return_nfe=True,
                                         **x["case"].kwargs())
    x["nfe"].append(nfe)
    return out


def run_torch(x: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return llada_generate(x["model"], x["prompt"], **x["case"].kwargs())[0]


def check(case: GenerateCase, x: dict, out: torch.Tensor) -> None:
    """The prompt kept, then gen_length tokens in [0, V), none of them the mask."""
    assert out.shape == (1, PROMPT + case.gen_length), out.shape
    assert torch.equal(out[:, :PROMPT], x["prompt"]), "the prompt changed"
    new = out[:, PROMPT:]
    assert ((new >= 0) & (new < VOCAB) & (new != MASK_ID)).all(), "a position left masked or out of range"


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """At temperature 0 the same tokens as LLaDA's loop; sampled runs differ by design (other RNGs)."""
    if x["case"].temperature == 0:
        for a, b in zip(fastar_runs, torch_runs):
            assert torch.equal(a, b), "fastar generates other tokens than LLaDA's loop at temperature 0"


def metrics(case: GenerateCase, x: dict, outputs: list) -> dict:
    """bytes: the model's weights read once per call (the head dominates); tok/fwd: new tokens per call."""
    nfe = x["nfe"][-len(outputs):]
    weights = sum(p.numel() * p.element_size() for p in x["model"].parameters())
    forwards = sum(nfe) / len(nfe)
    return {"bytes": forwards * weights, "tokens_per_forward": case.gen_length / forwards}


TABLE = common.Table(
    f"Diffusion generation, batch 1, {PROMPT}-token prompt, bf16 random LLaDA-shaped model ({LAYERS} layers, hidden "
    f"{HIDDEN}, V={VOCAB}): fastar: fastar.diffusion.generate; torch: LLaDA's generate loop (Fast-dLLM's for the "
    "threshold rule), same model; tok/fwd: new tokens per model call",
    [
        ("op", 18, lambda r: r["op"]),
        ("shape", 40, lambda r: r["shape"]),
        ("dtype", 5, lambda r: r["dtype"]),
        ("fastar", 9, lambda r: common.format_time(r["fastar_s"])),
        ("torch", 9, lambda r: common.format_time(r["torch_s"])),
        ("speed-up", 8, lambda r: f"{r['speedup']:.2f}x"),
        ("tok/fwd", 7, lambda r: f"{r['tokens_per_forward']:.2f}"),
        ("others", 6, lambda r: common.format_share(r["others_cpu_share"])),
    ],
)

BENCH = common.OpBench("diffusion generate", CASES, make_inputs, run_fastar, run_torch, check, agree, metrics, TABLE,
                       goal=2.0)

# ---------------------------------------------------------------------------------------------------------
# Dream's loop (``DreamGenerationMixin._sample``) on the same model: every step a full forward over prompt and
# generated positions.


@dataclasses.dataclass(frozen=True)
class DreamCase:
    alg: str
    temperature: float = 0.0
    top_p: Optional[float] = None
    max_new_tokens: int = 64
    steps: int = 16
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        top_p = f"-p{self.top_p:g}" if self.top_p is not None else ""
        return f"{self.alg}-L{self.max_new_tokens}-steps{self.steps}-t{self.temperature:g}{top_p}"

    @property
    def shape(self) -> str:
        top_p = f", top_p {self.top_p:g}" if self.top_p is not None else ""
        return f"{self.alg}, {self.max_new_tokens} tok, {self.steps} steps, T={self.temperature:g}{top_p}"

    def kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, steps=self.steps, alg=self.alg, temperature=self.temperature,
                    top_p=self.top_p)


DREAM_CASES = [DreamCase("maskgit_plus"), DreamCase("entropy", 0.2, 0.95), DreamCase("origin", 1.0)]


def dream_sample_tokens(logits, temperature, top_p, margin_confidence=False, neg_entropy=False):
    """Dream's ``sample_tokens`` (with ``top_p_logits``; no ``top_k``) in the logits' dtype, as it is written."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, sorted_indices_to_remove)
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:
            x0 = torch.distributions.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except ValueError:  # Dream's fallback (a bare except there): bf16 rows whose sums fail Simplex's tolerance
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def dream_generate(model, input_ids, max_new_tokens, steps, alg, temperature, top_p, alg_temp=None, eps=1e-3):
    """Dream's ``_sample`` loop (no attention mask, no hooks) as its repository writes it."""
    x = F.pad(input_ids, (0, max_new_tokens), value=MASK_ID)
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    for i in range(steps):
        mask_index = x == MASK_ID
        logits = model(x).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], device=x.device, dtype=torch.long) + MASK_ID
            transfer_index_t_s = torch.rand(*x0.shape, device=x.device) < p_transfer
            _, x0[transfer_index_t_s] = dream_sample_tokens(mask_logits[transfer_index_t_s], temperature, top_p)
            x[mask_index] = x0.clone()
            continue
        confidence, x0 = dream_sample_tokens(mask_logits, temperature, top_p, margin_confidence=alg == "topk_margin",
                                             neg_entropy=alg == "entropy")
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, device=x.device, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if number_transfer_tokens > 0:
            if alg_temp is None or alg_temp == 0:
                _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
            else:
                full_confidence = F.softmax(full_confidence / alg_temp, dim=-1)
                transfer_index = torch.multinomial(full_confidence, num_samples=number_transfer_tokens)
            x_ = torch.zeros_like(x, device=x.device, dtype=torch.long) + MASK_ID
            x_[mask_index] = x0.clone()
            row_indices = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer_index)
            x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x


def make_dream_inputs(case: DreamCase, device: str = "cpu") -> dict:
    prompt = torch.randint(0, MASK_ID, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)
    return {"case": case, "model": model(device), "prompt": prompt}


def run_fastar_dream(x: dict, seed: int) -> torch.Tensor:
    return fastar.diffusion.generate_dream(x["model"], x["prompt"], mask_id=MASK_ID, seed=seed, **x["case"].kwargs())


def run_torch_dream(x: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return dream_generate(x["model"], x["prompt"], **x["case"].kwargs())


def check_dream(case: DreamCase, x: dict, out: torch.Tensor) -> None:
    """The prompt kept, then max_new_tokens tokens in [0, V), none of them the mask."""
    assert out.shape == (1, PROMPT + case.max_new_tokens), out.shape
    assert torch.equal(out[:, :PROMPT], x["prompt"]), "the prompt changed"
    new = out[:, PROMPT:]
    assert ((new >= 0) & (new < VOCAB) & (new != MASK_ID)).all(), "a position left masked or out of range"


def agree_dream(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """At temperature 0 the same tokens as ``fastar.reference.dream_generate_reference`` (Dream's loop with float64
    confidences). Not Dream's own loop: it orders bfloat16 confidences, which tie or round across where fastar's
    float32 ones do not (on this model 18 of the 64 tokens differ). Sampled runs differ by design (other RNGs)."""
    if x["case"].temperature == 0:
        want, _ = dream_generate_reference(x["model"], x["prompt"].cpu(), mask_id=MASK_ID, **x["case"].kwargs())
        for a in fastar_runs:
            assert torch.equal(a, want), "fastar generates other tokens than Dream's loop in float64 at temperature 0"


def dream_metrics(case: DreamCase, x: dict, outputs: list) -> dict:
    """bytes: the model's weights read once per call (the head dominates)."""
    weights = sum(p.numel() * p.element_size() for p in x["model"].parameters())
    return {"bytes": case.steps * weights}


DREAM_TABLE = common.Table(
    f"Dream's diffusion generation, batch 1, {PROMPT}-token prompt, the same bf16 random model: fastar: "
    "fastar.diffusion.generate_dream; torch: Dream's _sample loop as its generation_utils.py writes it",
    [
        ("op", 18, lambda r: r["op"]),
        ("shape", 44, lambda r: r["shape"]),
        ("dtype", 5, lambda r: r["dtype"]),
        ("fastar", 9, lambda r: common.format_time(r["fastar_s"])),
        ("torch", 9, lambda r: common.format_time(r["torch_s"])),
        ("speed-up", 8, lambda r: f"{r['speedup']:.2f}x"),
        ("others", 6, lambda r: common.format_share(r["others_cpu_share"])),
    ],
)

DREAM_BENCH = common.OpBench("dream generate", DREAM_CASES, make_dream_inputs, run_fastar_dream, run_torch_dream,
                             check_dream, agree_dream, dream_metrics, DREAM_TABLE)
BENCHES = [BENCH, DREAM_BENCH]

# ---------------------------------------------------------------------------------------------------------
# pytest-benchmark (`pytest bench`)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES[3:4], ids=lambda c: c.id)


@parametrize_cases
def test_diffusion_generate_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case), rounds=2)


@parametrize_cases
def test_diffusion_generate_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case), rounds=2)
