"""Speculative generation with two Hugging Face models: ``fastar.generate.speculative`` against transformers'
assisted generation (``target.generate(..., assistant_model=draft)``, its defaults: up to 20 draft tokens, the
adaptive confidence threshold) with the same sampling settings, and beside them the target's plain ``generate``
(issue 15's goal: 1.5x assisted generation's tokens/s).

The models, bfloat16, random-initialised (no weights can be downloaded here): a 16-layer Llama (hidden 1024, GQA
16/4, Llama-2's vocabulary size) whose layers past the second add a twentieth of their usual output, and as the
draft its own first two layers and head (self-speculative, LayerSkip-style), so that the draft's argmax agrees
with the target's on about 2 tokens in 3, as a trained drafter's does; the acceptance length is in the table.
Batch 1, a 32-token prompt, 64 new tokens, no eos.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Tuple, Union

import pytest
import torch
import transformers

import fastar.generate
from bench import common

LAYERS, DRAFT_LAYERS, HIDDEN, MLP, HQ, HKV, D, VOCAB = 16, 2, 1024, 2816, 16, 4, 64, 32000
DEEP_SCALE = 0.05  # the output projections of the target's layers past DRAFT_LAYERS are scaled by this
HEAD_SCALE = 8.0  # sharper next-token distributions than the random init's near-uniform ones
PROMPT, NEW_TOKENS = 32, 64
TIE_TOL = 0.02  # share of max|logits| within which two greedy tokens count as a bf16 tie


@dataclasses.dataclass(frozen=True)
class GenerateCase:
    """``shape``: chain drafts of that many tokens (int) or a draft tree's level widths (tuple)."""

    do_sample: bool
    drafts: Union[int, Tuple[int, ...]]
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        mode = "sample" if self.do_sample else "greedy"
        drafts = f"chain{self.drafts}" if isinstance(self.drafts, int) else "tree" + "-".join(map(str, self.drafts))
        return f"{mode}-{drafts}"

    @property
    def shape(self) -> str:
        mode = "sampling T=1" if self.do_sample else "greedy"
        drafts = f"chain of {self.drafts}" if isinstance(self.drafts, int) else f"tree {list(self.drafts)}"
        return f"Llama {LAYERS}L/{DRAFT_LAYERS}L {mode}, {drafts}"

    def kwargs(self) -> dict:
        return {"tree": self.drafts} if isinstance(self.drafts, tuple) else {"num_draft_tokens": self.drafts}


TREE = (4, 2, 2, 1, 1)
CASES = [GenerateCase(False, 4), GenerateCase(False, TREE), GenerateCase(True, 4), GenerateCase(True, TREE)]


@functools.cache
def models(dtype: torch.dtype, device: str) -> tuple:
    """(target, draft): the draft is the target's first DRAFT_LAYERS layers, norm and head."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP,
                                      num_hidden_layers=LAYERS, num_attention_heads=HQ, num_key_value_heads=HKV,
                                      head_dim=D, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    target = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype).to(device).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(HEAD_SCALE)
        for layer in target.model.layers[DRAFT_LAYERS:]:
            layer.self_attn.o_proj.weight.mul_(DEEP_SCALE)
            layer.mlp.down_proj.weight.mul_(DEEP_SCALE)
    config.num_hidden_layers = DRAFT_LAYERS
    draft = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in draft.state_dict()})
    for model in (target, draft):
        model.generation_config.pad_token_id = 0
    return target, draft


def make_inputs(case: GenerateCase, device: str = "cpu") -> dict:
    target, draft = models(case.dtype, device)
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)
    return {"target": target, "draft": draft, "ids": ids, "stats": []}


def sampling(case: GenerateCase) -> dict:
    """transformers' sampling arguments (none but do_sample for greedy runs: it warns about unused ones)."""
    return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if case.do_sample else {"do_sample": False}


def run_fastar(x: dict, seed: int, case: GenerateCase) -> torch.Tensor:
    ids, stats = fastar.generate.speculative(x["target"], x["draft"], x["ids"], max_new_tokens=NEW_TOKENS, seed=seed,
                                             return_stats=True, **sampling(case), **case.kwargs())
    x["stats"].append(stats)
    return ids


def run_assisted(x: dict, seed: int, case: GenerateCase) -> torch.Tensor:
    """transformers' assisted generation, its default assistant settings."""
    torch.manual_seed(seed)
    return x["target"].generate(x["ids"], assistant_model=x["draft"], max_new_tokens=NEW_TOKENS, **sampling(case))


def run_plain(x: dict, seed: int, case: GenerateCase) -> torch.Tensor:
    torch.manual_seed(seed)
    return x["target"].generate(x["ids"], max_new_tokens=NEW_TOKENS, **sampling(case))


def check(case: GenerateCase, x: dict, out: torch.Tensor) -> None:
    """The prompt, then NEW_TOKENS tokens in [0, VOCAB)."""
    assert out.shape == (1, PROMPT + NEW_TOKENS), out.shape
    assert torch.equal(out[:, :PROMPT], x["ids"]) and ((out >= 0) & (out < VOCAB)).all(), "tokens not written"


def agree(x: dict, fastar_runs: list, other_runs: list) -> None:
    """Greedy: the runs equal fastar's first run up to near-ties. bf16 logits of a token scored alone or among
    drafts differ in the last bits, so two greedy loops may part where the target's two best logits are within
    TIE_TOL; past that point the texts differ. Sampled runs differ by design."""
    if not x["greedy"]:
        return
    reference = fastar_runs[0][0]
    for run in fastar_runs + other_runs:
        differ = (run[0] != reference).nonzero()
        if len(differ) == 0:
            continue
        i = int(differ[0])
        with torch.no_grad():
            logits = x["target"](reference[None, :i]).logits[0, -1].float()
        gap = (logits[reference[i]] - logits[run[0, i]]).abs().item()
        assert gap <= TIE_TOL * logits.abs().max().item(), f"greedy generations part at token {i} by {gap:.3g}"


def more_baselines(case: GenerateCase, x: dict, device: str, quick: bool) -> tuple[dict, dict]:
    return {"plain": functools.partial(run_plain, case=case)}, {}


def metrics(case: GenerateCase, x: dict, runs: list) -> dict:
    """Bytes of weights the target's verification passes and the draft's passes read, and the acceptance."""
    stats = x["stats"][-len(runs):]
    weight_bytes = [sum(p.numel() * p.element_size() for p in x[m].parameters()) for m in ("target", "draft")]
    forwards = sum(s.target_forwards for s in stats) / len(stats)
    levels = case.drafts if isinstance(case.drafts, int) else len(case.drafts)
    return {
        "bytes": forwards * (weight_bytes[0] + levels * weight_bytes[1]),
        "acceptance_length": sum(s.acceptance_length for s in stats) / len(stats),
    }


TABLE = common.Table(
    f"Speculative generation, {NEW_TOKENS} new tokens after {PROMPT}, batch 1, bf16 random Llama target "
    f"({LAYERS} layers, hidden {HIDDEN}, V={VOCAB}) with its first {DRAFT_LAYERS} layers as the draft: fastar: "
    "fastar.generate.speculative; assisted: transformers' generate(assistant_model=draft); plain: the target's "
    "generate; accept: tokens per verification pass (fastar)",
    [
        ("op", 18, lambda r: r["op"]),
        ("shape", 40, lambda r: r["shape"]),
        ("dtype", 5, lambda r: r["dtype"]),
        ("fastar", 9, lambda r: common.format_time(r["fastar_s"])),
        ("assisted", 9, lambda r: common.format_time(r["torch_s"])),
        ("plain", 9, lambda r: common.format_time(r["plain_s"])),
        ("vs assisted", 11, lambda r: f"{r['speedup']:.2f}x"),
        ("vs plain", 8, lambda r: f"{r['speedup_vs_plain']:.2f}x"),
        ("accept", 6, lambda r: f"{r['acceptance_length']:.2f}"),
        ("others", 6, lambda r: common.format_share(r["others_cpu_share"])),
    ],
)


def _bound(fn):
    """fn(x, seed, case) as the harness's fn(x, seed), the case read from x."""
    return lambda x, seed: fn(x, seed, x["case"])


def _inputs(case: GenerateCase, device: str = "cpu") -> dict:
    x = make_inputs(case, device)
    x["case"] = case
    x["greedy"] = not case.do_sample
    return x


BENCH = common.OpBench("speculative generate", CASES, _inputs, _bound(run_fastar), _bound(run_assisted), check,
                       agree, metrics, TABLE, more_baselines, goal=1.5)

inputs = functools.cache(_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES[:1], ids=lambda c: c.id)


@parametrize_cases
def test_speculative_generate_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, BENCH.fastar, case, inputs(case), rounds=2)


@parametrize_cases
def test_speculative_generate_assisted(benchmark, case):
    common.benchmark_op(benchmark, BENCH, BENCH.baseline, case, inputs(case), rounds=2)
