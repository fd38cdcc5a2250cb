"""Block-diffusion decoding (SDAR, Fast-dLLM v2 style): ``fastar.diffusion.generate_blocks`` with the KV cache of
the committed blocks (each step runs the model over the current block only) against the same loop without it
(``use_cache=False``: each step runs the whole prefix under the block-causal mask, as block-diffusion code without
a cache does). Issue 16's goal: 2x.

The model: a random-initialised transformers Llama (float32, 8 layers, hidden 512, GQA 8/2, Llama-2's vocabulary
size) driven through the protocol of docs/diffusion.md (a 4-D boolean block-causal attention mask, position ids and
a DynamicCache); its head is scaled so that its next-token distributions are peaked, as a trained model's are.
Both loops ask it for the logits of the current block only (``logits_to_keep``), so the speed-up is the cache's
alone. Batch 1, a 70-token prompt (ending inside a block, as SDAR aligns it), 256 generated tokens, greedy; blocks
of 32 (Fast-dLLM v2, SDAR's large blocks) and of 4 (SDAR's default).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import pytest
import torch
import transformers

import fastar
from bench import common

LAYERS, HIDDEN, MLP, HQ, HKV, D, VOCAB = 8, 512, 1408, 8, 2, 64, 32000
MASK_ID = VOCAB - 1
HEAD_SCALE = 16.0  # peaked next-token distributions
PROMPT, GEN = 70, 256


@dataclasses.dataclass(frozen=True)
class BlockCase:
    block_length: int
    steps_per_block: int
    threshold: Optional[float] = None
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        rule = f"-t{self.threshold}" if self.threshold is not None else ""
        return f"block{self.block_length}-steps{self.steps_per_block}{rule}"

    @property
    def shape(self) -> str:
        rule = f", threshold {self.threshold}" if self.threshold is not None else ""
        return f"block {self.block_length}, {self.steps_per_block} steps/block{rule}"


CASES = [BlockCase(32, 8), BlockCase(4, 2)]


@functools.cache
def model(device: str) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP,
                                      num_hidden_layers=LAYERS, num_attention_heads=HQ, num_key_value_heads=HKV,
                                      head_dim=D, max_position_embeddings=1024, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    llama = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        llama.lm_head.weight.mul_(HEAD_SCALE)
    return llama


def make_inputs(case: BlockCase, device: str = "cpu") -> dict:
    ids = torch.randint(0, MASK_ID, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)
    return {"model": model(device), "ids": ids, "case": case, "nfe": []}


def run(x: dict, seed: int, use_cache: bool) -> torch.Tensor:
    case = x["case"]
    llama = functools.partial(x["model"], logits_to_keep=case.block_length)
    out, nfe = fastar.diffusion.generate_blocks(
        llama, x["ids"], gen_length=GEN, block_length=case.block_length, steps_per_block=case.steps_per_block,
        threshold=case.threshold, mask_id=MASK_ID, use_cache=use_cache, seed=seed, return_nfe=True)
    if use_cache:
        x["nfe"].append(nfe)
    return out


def check(case: BlockCase, x: dict, out: torch.Tensor) -> None:
    """The prompt, then GEN tokens in [0, VOCAB), none of them the mask."""
    assert out.shape == (1, PROMPT + GEN), out.shape
    assert torch.equal(out[:, :PROMPT], x["ids"]), "the prompt changed"
    assert ((out >= 0) & (out < MASK_ID)).all(), "a position is not generated"


def agree(x: dict, fastar_runs: list, other_runs: list) -> None:
    """Greedy: the cached and uncached loops give the same tokens (their float32 logits differ in the last bits,
    which moves no commit of this model)."""
    for run_ in fastar_runs + other_runs:
        assert torch.equal(run_, fastar_runs[0]), "the cached and uncached generations differ"


def metrics(case: BlockCase, x: dict, runs: list) -> dict:
    """The weights every model call reads, and the tokens generated per model call."""
    weight_bytes = sum(p.numel() * p.element_size() for p in x["model"].parameters())
    nfe = x["nfe"][-1]
    return {"bytes": nfe * weight_bytes, "nfe": nfe, "tokens_per_forward": GEN / nfe}


TABLE = common.Table(
    f"Block diffusion, {GEN} tokens after {PROMPT}, batch 1, greedy, f32 random Llama ({LAYERS} layers, hidden "
    f"{HIDDEN}, V={VOCAB}): fastar: fastar.diffusion.generate_blocks with the KV cache of the committed blocks; "
    "no cache: the same loop recomputing the prefix every step; tok/fwd: tokens per model call",
    [
        ("op", 18, lambda r: r["op"]),
        ("shape", 36, lambda r: r["shape"]),
        ("dtype", 5, lambda r: r["dtype"]),
        ("fastar", 9, lambda r: common.format_time(r["fastar_s"])),
        ("no cache", 9, lambda r: common.format_time(r["torch_s"])),
        ("speedup", 7, lambda r: f"{r['speedup']:.2f}x"),
        ("calls", 5, lambda r: str(r["nfe"])),
        ("tok/fwd", 7, lambda r: f"{r['tokens_per_forward']:.2f}"),
        ("others", 6, lambda r: common.format_share(r["others_cpu_share"])),
    ],
)

BENCH = common.OpBench("block diffusion", CASES, make_inputs, functools.partial(run, use_cache=True),
                       functools.partial(run, use_cache=False), check, agree, metrics, TABLE, goal=2.0)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES[:1], ids=lambda c: c.id)


@parametrize_cases
def test_diffusion_blocks_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, BENCH.fastar, case, inputs(case), rounds=2)


@parametrize_cases
def test_diffusion_blocks_no_cache(benchmark, case):
    common.benchmark_op(benchmark, BENCH, BENCH.baseline, case, inputs(case), rounds=2)
