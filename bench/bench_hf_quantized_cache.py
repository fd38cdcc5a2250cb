"""One decode step of a Hugging Face model over an int4 KV cache: fastar's FastarQuantizedCache (KIVI int4, G=32,
R=128, read by attn_implementation="fastar") against transformers' QuantizedCache with its quanto and HQQ backends
(nbits=4, the same group and residual sizes, SDPA attention), and beside them transformers' DynamicCache (bfloat16,
SDPA), the "torch" column (issue 14's goal: fastar's step 10x the QuantizedCache's, at 4k and 16k tokens).

The model: a random-initialised Llama of 2 layers with Llama-3-8B's attention (32 query heads over 8 kv heads, head
dim 128) on a slim residual stream (hidden 1024, MLP 1024, vocabulary 4096), so that the KV cache, not the weights,
is most of what a step reads. quanto and HQQ come from requirements-bench.txt (`make bench` installs them); a
backend that is missing is skipped with its reason printed.

Every cache holds the same K/V: one SDPA prefill of the prompt (outside the timed region) into the DynamicCache,
whose K/V then fill the others through their ``update``. A timed call is one ``model(next_token, past_key_values=
cache)`` and then the cache's roll-back to the prompt's length, so every round sees the same context: ``crop(-1)``
for fastar and DynamicCache (fastar's then keeps one more value quantized than after the prefill: a truncate does not
return values to the full-precision window); for QuantizedCache, whose layers have no crop, the layers' attributes
saved after the prefill are put back (its update replaces them, never writes into them). After the prefill the
QuantizedCache's full-precision residual is empty, so the timed step is one of the R - 1 in R that do not requantize
the whole cache.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache, QuantizedCache

import fastar.integrations.huggingface as fastar_hf
from bench import common
from fastar import _common

LAYERS, HIDDEN, HQ, HKV, D, VOCAB = 2, 1024, 32, 8, 128, 4096
GROUP, RESIDUAL = 32, 128  # fastar's KIVI defaults, given to QuantizedCache too (its own default group is 64)
BACKENDS = ["quanto", "hqq"]
# The step's logits within this share of max|logits| of the unquantized cache's: int4's error is a few % of it,
# while a cache of another random prompt moves them by more than max|logits|.
LOGITS_TOL = 0.1
# The QuantizedCache layer attributes that its update replaces (restored after each timed step).
QUANTIZED_STATE = ("keys", "values", "_quantized_keys", "_quantized_values", "cumulative_length")


@dataclasses.dataclass(frozen=True)
class HFCacheCase:
    """One decode step of batch 1 after a prompt of S tokens."""

    S: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        return f"S{self.S}-int4"

    @property
    def shape(self) -> str:
        return f"Llama {LAYERS}L Hq={HQ} Hkv={HKV} D={D} S={self.S} int4"


CASES = [HFCacheCase(4096), HFCacheCase(16384)]


@functools.cache
def models(dtype: torch.dtype, device: str) -> tuple:
    """(SDPA model, fastar model) with the same random weights."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HQ, num_key_value_heads=HKV,
                                      head_dim=D, max_position_embeddings=32768)
    torch.manual_seed(0)
    # transformers mutates the config it is given: one copy per model.
    sdpa = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa",
                                                         dtype=dtype).to(device).eval()
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=fastar_hf.NAME,
                                                          dtype=dtype).to(device).eval()
    model.load_state_dict(sdpa.state_dict())
    return sdpa, model


def fill(cache, kv: list):
    """cache after ``update`` with each layer's prompt K/V."""
    for layer, (k, v) in enumerate(kv):
        cache.update(k, v, layer)
    return cache


@torch.no_grad()
def step(model, cache, token: torch.Tensor) -> torch.Tensor:
    """The next token's logits [1, 1, VOCAB]; appends the token to the cache."""
    return model(input_ids=token, past_key_values=cache).logits


def make_inputs(case: HFCacheCase, device: str = "cpu") -> dict:
    sdpa, model = models(case.dtype, device)
    ids = torch.randint(0, VOCAB, (1, case.S + 1), generator=torch.Generator().manual_seed(case.S)).to(device)
    dynamic = DynamicCache(config=sdpa.config)
    with torch.no_grad():
        sdpa(input_ids=ids[:, : case.S], past_key_values=dynamic, logits_to_keep=1)
    kv = [(layer.keys.clone(), layer.values.clone()) for layer in dynamic.layers]
    # One group of room past the prompt (the capacity is a multiple of the group).
    cache = fastar_hf.FastarQuantizedCache(model.config, format="int4", max_cache_len=case.S + GROUP,
                                           group_size=GROUP, residual=RESIDUAL)
    x = {"sdpa": sdpa, "model": model, "token": ids[:, case.S:], "kv": kv, "dynamic": dynamic,
         "fastar": fill(cache, kv)}
    x["reference"] = step(sdpa, dynamic, x["token"]).float()
    dynamic.crop(-1)
    return x


def run_fastar(x: dict, seed: int):
    out = step(x["model"], x["fastar"], x["token"])
    x["fastar"].crop(-1)
    return out


def run_torch(x: dict, seed: int):
    """transformers' DynamicCache (bfloat16) with SDPA."""
    out = step(x["sdpa"], x["dynamic"], x["token"])
    x["dynamic"].crop(-1)
    return out


def quantized_caches(x: dict) -> tuple[dict, dict]:
    """({backend: QuantizedCache filled with the prompt}, {backend: why it is skipped}) for quanto and HQQ."""
    caches, skipped = {}, {}
    for backend in BACKENDS:
        try:
            cache = QuantizedCache(backend, x["sdpa"].config, nbits=4, q_group_size=GROUP, residual_length=RESIDUAL)
        except ImportError as error:  # the backend's package is not installed
            skipped[backend] = str(error)
            continue
        caches[backend] = fill(cache, x["kv"])
    return caches, skipped


def run_quantized(cache, x: dict, seed: int):
    """transformers' QuantizedCache with SDPA; then the layers' prefill state back."""
    saved = [{name: getattr(layer, name) for name in QUANTIZED_STATE} for layer in cache.layers]
    out = step(x["sdpa"], cache, x["token"])
    for layer, state in zip(cache.layers, saved):
        layer.__dict__.update(state)
    return out


def held_bytes(obj) -> int:
    """Bytes of the tensors in obj (nested tuples, lists, dicts; a tensor subclass, such as quanto's, by the
    tensors it holds)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__"):
            return sum(held_bytes(getattr(obj, name)) for name in obj.__tensor_flatten__()[0])
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(held_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(o) for o in obj.values())
    return 0


def fastar_memory(x: dict) -> int:
    """fastar's cache: codes, scales and zeros, and window (QuantizedKVCache.memory_bytes, over the capacity)."""
    return sum(layer.cache.memory_bytes() for layer in x["fastar"].layers)


class _TimedAttention:
    """An op namespace for fastar._common.using_ops: torch.ops.fastar, with the attention op's wall time summed."""

    def __init__(self):
        self.seconds = 0.0

    def __getattr__(self, name):
        op = getattr(torch.ops.fastar, name)
        if name != "attention":
            return op

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return op(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def attention_share(x: dict, steps: int = 3) -> float:
    """Share of fastar's step (wall time) spent in its attention op (torch.ops.fastar.attention)."""
    ops = _TimedAttention()
    with _common.using_ops(ops):
        start = time.perf_counter()
        for seed in range(steps):
            run_fastar(x, seed)
        wall = time.perf_counter() - start
    return ops.seconds / wall


_printed = set()


def logits_error(x: dict, logits: torch.Tensor) -> float:
    """max|logits - the unquantized cache's| / max|the unquantized cache's|."""
    return ((logits.float() - x["reference"]).abs().max() / x["reference"].abs().max()).item()


def more_baselines(case: HFCacheCase, x: dict, device: str, quick: bool) -> tuple[dict, dict]:
    """quanto and HQQ (those installed: a missing one is printed once and skipped), and the row's fields: each
    cache's memory and its step's logits error, fastar's attention share. Each QuantizedCache's first step runs
    here, outside the timing (quanto builds its CPU extension on its first use on a machine)."""
    caches, skipped = quantized_caches(x)
    for backend, reason in skipped.items():
        if backend not in _printed:
            _printed.add(backend)
            print(f"hf quantized cache: skipping transformers' QuantizedCache({backend!r}): {reason}", flush=True)
    memory = {"fastar": fastar_memory(x), "torch": held_bytes([[layer.keys, layer.values] for layer in
                                                               x["dynamic"].layers])}
    errors = {"fastar": logits_error(x, run_fastar(x, 0))}
    for backend, cache in caches.items():
        memory[backend] = held_bytes([[getattr(layer, name) for name in QUANTIZED_STATE[:4]] for layer in cache.layers])
        errors[backend] = logits_error(x, run_quantized(cache, x, 0))
    fns = {backend: functools.partial(run_quantized, cache) for backend, cache in caches.items()}
    return fns, {"memory_bytes": memory, "logits_error": errors, "skipped": skipped,
                 "fastar_attention_share": attention_share(x)}


def check(case: HFCacheCase, x: dict, out: torch.Tensor) -> None:
    """Every logit written: a new tensor, finite everywhere."""
    assert out.shape == (1, 1, VOCAB) and torch.isfinite(out.float()).all(), "logits not written"


def agree(x: dict, fastar_runs: list, other_runs: list) -> None:
    """fastar's logits and the baseline's within LOGITS_TOL * max|logits| of the unquantized cache's."""
    reference = x["reference"]
    tol = LOGITS_TOL * reference.abs().max().item()
    for run in fastar_runs + other_runs:
        error = (run.float() - reference).abs().max().item()
        assert error <= tol, f"logits {error:.3g} from the unquantized cache's, more than {tol:.3g}"


def metrics(case: HFCacheCase, x: dict, runs: list) -> dict:
    """Bytes a step of fastar's must read: its cache and the model's weights."""
    weights = sum(p.numel() * p.element_size() for p in x["model"].parameters())
    return {"bytes": fastar_memory(x) + weights}


def ratio_cell(name: str):
    return lambda r: f"{r[f'speedup_vs_{name}']:.1f}x" if f"speedup_vs_{name}" in r else "skipped"


def time_cell(name: str):
    return lambda r: common.format_time(r[f"{name}_s"]) if f"{name}_s" in r else "skipped"


def mb_cell(name: str):
    return lambda r: f"{r['memory_bytes'][name] / 2**20:.1f}" if name in r["memory_bytes"] else "-"


TABLE = common.Table(
    "One decode step of a 2-layer random Llama (bf16, batch 1) through transformers: fastar: FastarQuantizedCache"
    " int4 (KIVI, G=32, R=128) with attn_implementation='fastar'; quanto, HQQ: transformers' QuantizedCache, nbits=4,"
    " same G and R, SDPA; bf16: DynamicCache, SDPA; median time per step, cold caches; attn: share of fastar's step"
    " in its attention kernel; MB: KV cache memory (codes, scales, window)",
    [
        ("op", 18, lambda r: r["op"]),
        ("shape", 40, lambda r: r["shape"]),
        ("dtype", 5, lambda r: r["dtype"]),
        ("fastar", 9, lambda r: common.format_time(r["fastar_s"])),
        ("quanto", 9, time_cell("quanto")),
        ("HQQ", 9, time_cell("hqq")),
        ("bf16", 9, lambda r: common.format_time(r["torch_s"])),
        ("vs quanto", 9, ratio_cell("quanto")),
        ("vs HQQ", 7, ratio_cell("hqq")),
        ("vs bf16", 7, lambda r: f"{r['speedup']:.1f}x"),
        ("attn", 4, lambda r: f"{100 * r['fastar_attention_share']:.0f}%"),
        ("MB fastar", 9, mb_cell("fastar")),
        ("MB quanto", 9, mb_cell("quanto")),
        ("MB HQQ", 6, mb_cell("hqq")),
        ("MB bf16", 7, mb_cell("torch")),
        ("others", 6, lambda r: common.format_share(r["others_cpu_share"])),
    ],
)

BENCH = common.OpBench("hf quantized cache", CASES, make_inputs, run_fastar, run_torch, check, agree, metrics, TABLE,
                       more_baselines)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES[:1], ids=lambda c: c.id)


@parametrize_cases
def test_hf_quantized_cache_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))
    assert inputs(case)["fastar"].get_seq_length() == case.S


@parametrize_cases
def test_hf_quantized_cache_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))
    assert inputs(case)["dynamic"].get_seq_length() == case.S


@parametrize_cases
def test_missing_backend_is_skipped(monkeypatch, case):
    """Without quanto and HQQ the bench runs on, naming why each is skipped."""
    monkeypatch.setattr(transformers.cache_utils, "is_optimum_quanto_available", lambda: False)
    monkeypatch.setattr(transformers.cache_utils, "is_hqq_available", lambda: False)
    caches, skipped = quantized_caches(inputs(case))
    assert caches == {} and sorted(skipped) == sorted(BACKENDS)
    assert "optimum-quanto" in skipped["quanto"] and "HQQ" in skipped["hqq"]
