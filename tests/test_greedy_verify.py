"""Tests of fastar.greedy_verify (docs/acceptance.md, vLLM's greedy rule) on every backend.

Oracle: ``fastar.reference.greedy_verify_reference`` (torch.argmax over float64, one position at a time),
plus hand-written vLLM cases. Each op call goes through the ``backend`` fixture (cpu / simt / cuda).
"""
from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastar
from fastar import _common, _simt
from fastar.reference import greedy_verify_reference
from helpers import HYPOTHESIS, assert_same

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATUS_BAD_NUM_DRAFT, STATUS_BAD_ID, STATUS_BAD_VALUE = 1, 2, 4


def logits_with_argmax(argmax_rows, vocab, seed=0, margin=4.0):
    """float32 logits [B, n+1, V] whose argmax at every position is the given token."""
    target = torch.tensor(argmax_rows)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*target.shape, vocab, generator=gen)
    logits.scatter_(-1, target[..., None], float(logits.max()) + margin)
    return logits


def make_case(gen, batch, n, vocab, *, dtype=torch.float32, ids_dtype=torch.int64, ragged=None, ties=False, infs=False):
    """Random logits and drafts that copy the target argmax for a random prefix (varied acceptance)."""
    if ties:  # few distinct integer values: repeated maxima, argmax is the smallest index among them
        logits = torch.randint(-3, 3, (batch, n + 1, vocab), generator=gen).float()
    else:
        logits = torch.randn(batch, n + 1, vocab, generator=gen) * 3
    if infs:
        inf = float("inf")
        pick = torch.rand(batch, n + 1, 1, generator=gen)
        some = torch.rand(batch, n + 1, vocab, generator=gen) < 0.05
        logits = torch.where(pick < 0.15, -inf, logits)  # whole rows of -inf: argmax 0
        logits = torch.where(some & (pick >= 0.15) & (pick < 0.3), -inf, logits)
        logits = torch.where(some & (pick > 0.8), inf, logits)  # some +inf: the first one wins
    logits = logits.to(dtype)
    argmax = torch.argmax(logits.double(), -1)  # [B, n+1]
    prefix = torch.randint(0, n + 2, (batch,), generator=gen)
    random_ids = torch.randint(0, vocab, (batch, n), generator=gen)
    copy = torch.arange(n)[None, :] < prefix[:, None]
    drafts = torch.where(copy, argmax[:, :n], random_ids).to(ids_dtype)
    num_draft = None
    if ragged is not None:
        num_draft = torch.randint(0, n + 1, (batch,), generator=gen).to(ragged)
    return drafts, logits, num_draft


def assert_well_formed(tokens, num_accepted, drafts, vocab, num_draft=None):
    batch, n = drafts.shape
    assert tokens.shape == (batch, n + 1) and num_accepted.shape == (batch,)
    k = torch.full((batch,), n) if num_draft is None else num_draft.long()
    na = num_accepted.long()
    assert ((na >= 0) & (na <= k)).all()
    pos = torch.arange(n + 1).expand(batch, n + 1)
    padded = torch.cat([drafts.long(), torch.zeros(batch, 1, dtype=torch.long)], 1)
    assert torch.equal(tokens.long()[pos < na[:, None]], padded[pos < na[:, None]])
    last = tokens.long().gather(1, na[:, None]).squeeze(1)
    assert ((last >= 0) & (last < vocab)).all()
    assert (tokens[pos > na[:, None]] == -1).all()


# ----------------------------------------------------------------------------------------------------
# 1. vLLM's cases
# ----------------------------------------------------------------------------------------------------

VLLM_CASES = [
    # (drafts, target argmax per position, expected tokens, expected num_accepted)
    ([[1, 2, 3]], [[1, 5, 3, 4]], [[1, 5, -1, -1]], [1]),  # docs/acceptance.md: early mismatch
    ([[1, 2, 3]], [[1, 2, 3, 4]], [[1, 2, 3, 4]], [3]),  # perfect match: bonus token
    ([[1, 2, 3]], [[6, 2, 3, 4]], [[6, -1, -1, -1]], [0]),  # mismatch at the first position
    ([[1, 2, 3]], [[1, 2, 7, 4]], [[1, 2, 7, -1]], [2]),  # mismatch at the last draft: no bonus
    ([[1, 2, 3], [4, 5, 6]], [[1, 2, 7, 6], [4, 8, 6, 9]], [[1, 2, 7, -1], [4, 8, -1, -1]], [2, 1]),
    ([[7]], [[7, 2]], [[7, 2]], [1]),  # a single draft
    ([[5, 5]], [[5, 5, 5]], [[5, 5, 5]], [2]),  # repeated tokens
    ([[0, 9]], [[0, 9, 0]], [[0, 9, 0]], [2]),  # the first and the last token id
]


@pytest.mark.parametrize("case", range(len(VLLM_CASES)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_vllm_cases(backend, case, dtype):
    drafts, argmax, want_tokens, want_accepted = VLLM_CASES[case]
    logits = logits_with_argmax(argmax, 10, seed=case).to(dtype)
    tokens, num_accepted = backend.greedy_verify(torch.tensor(drafts, dtype=torch.int32), logits)
    assert tokens.tolist() == want_tokens
    assert num_accepted.tolist() == want_accepted
    assert tokens.dtype == torch.int32 and num_accepted.dtype == torch.int32


def test_vllm_ragged_and_empty(backend):
    # vLLM: drafts [[1, 2], [3], []] with target argmax [1, 2, 5], [3, 4], [5]
    drafts = torch.tensor([[1, 2], [3, 9], [9, 9]], dtype=torch.int64)
    logits = logits_with_argmax([[1, 2, 5], [3, 4, 0], [5, 1, 1]], 10, seed=1)
    for nd_dtype in (torch.int32, torch.int64):
        tokens, num_accepted = backend.greedy_verify(
            drafts, logits, num_draft_tokens=torch.tensor([2, 1, 0], dtype=nd_dtype)
        )
        assert tokens.tolist() == [[1, 2, 5], [3, 4, -1], [5, -1, -1]]
        assert num_accepted.tolist() == [2, 1, 0]


def test_zero_drafts(backend):
    logits = logits_with_argmax([[5], [0], [9]], 10, seed=2)
    tokens, num_accepted = backend.greedy_verify(torch.zeros(3, 0, dtype=torch.int64), logits)
    assert tokens.tolist() == [[5], [0], [9]] and num_accepted.tolist() == [0, 0, 0]


def test_empty_batch(backend):
    tokens, num_accepted = backend.greedy_verify(
        torch.zeros(0, 4, dtype=torch.int32), torch.randn(0, 5, 17), num_draft_tokens=torch.zeros(0, dtype=torch.int64)
    )
    assert tokens.shape == (0, 5) and tokens.dtype == torch.int32
    assert num_accepted.shape == (0,) and num_accepted.dtype == torch.int32


def test_ties_and_infinities(backend):
    # torch.argmax: the first maximum wins; -0.0 == 0.0; a row of -inf gives 0; +inf beats everything.
    inf = float("inf")
    rows = [
        [1.0, 3.0, 3.0, 2.0],  # tie -> 1
        [-inf, -inf, -inf, -inf],  # all -inf -> 0
        [-1.0, -0.0, 0.0, -2.0],  # -0.0 and 0.0 tie -> 1
        [0.0, inf, 5.0, inf],  # first +inf -> 1
        [7.0, 7.0, 7.0, 7.0],  # constant -> 0
    ]
    logits = torch.tensor(rows)[:, None, :]  # n = 0: every row is a bonus row
    want = [int(torch.argmax(torch.tensor(r, dtype=torch.float64))) for r in rows]
    assert want == [1, 0, 1, 1, 0]
    for dtype in FLOAT_DTYPES:
        tokens, num_accepted = backend.greedy_verify(torch.zeros(5, 0, dtype=torch.int32), logits.to(dtype))
        assert tokens[:, 0].tolist() == want, dtype
    # and as the target of drafts: the draft must equal the smallest maximising index to be accepted
    drafts = torch.tensor([[2], [1]])
    logits = torch.tensor([[[1.0, 3.0, 3.0], [0.0, 0.0, 1.0]], [[-inf, -inf, -inf], [0.0, 0.0, 0.0]]])
    tokens, num_accepted = backend.greedy_verify(drafts, logits)
    assert tokens.tolist() == [[1, -1], [0, -1]] and num_accepted.tolist() == [0, 0]


# ----------------------------------------------------------------------------------------------------
# 2. exact agreement with the reference
# ----------------------------------------------------------------------------------------------------


def vocab_sizes(backend):
    return [1, 7, 300] if backend.name == "simt" else [1, 7, 33, 257, 1000, 4099]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "ids_dtype,ragged",
    [(torch.int32, None), (torch.int64, torch.int32), (torch.int32, torch.int64)],
    ids=["ids32", "ids64-nd32", "ids32-nd64"],
)
@pytest.mark.parametrize("kind", ["normal", "ties", "infs"])
def test_matches_reference(backend, dtype, ids_dtype, ragged, kind):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{ids_dtype}{ragged}{kind}".encode()))
    batch = 12 if backend.name == "simt" else 40
    all_na, all_k = [], []
    for vocab in vocab_sizes(backend):
        n = 4
        drafts, logits, num_draft = make_case(
            gen, batch, n, vocab, dtype=dtype, ids_dtype=ids_dtype, ragged=ragged,
            ties=kind == "ties", infs=kind == "infs",
        )
        got = backend.greedy_verify(drafts, logits, num_draft_tokens=num_draft)
        want = greedy_verify_reference(drafts, logits, num_draft)
        assert_same(got, want, f"V={vocab}")
        assert_well_formed(*got, drafts, vocab, num_draft)
        if vocab > 1:
            all_na.append(want[1].long())
            all_k.append(num_draft.long() if num_draft is not None else torch.full((batch,), n))
    # the data exercises every acceptance length class: rejection at 0, in between, all accepted
    na, k = torch.cat(all_na), torch.cat(all_k)
    na, k = na[k > 0], k[k > 0]
    assert (na == k).any() and (na == 0).any() and ((na > 0) & (na < k)).any()


@pytest.mark.parametrize("layout", ["transposed", "sliced", "last_dim_strided"])
def test_non_contiguous(backend, layout):
    gen = torch.Generator().manual_seed(5)
    batch, n, vocab = 10, 3, 70
    drafts, logits, num_draft = make_case(gen, batch, n, vocab, ragged=torch.int64)
    if layout == "transposed":
        l2 = logits.transpose(0, 1).contiguous().transpose(0, 1)
        d2 = drafts.t().contiguous().t()
    elif layout == "sliced":  # NaN padding outside the viewed region must never be read
        big = torch.full((2 * batch, n + 2, vocab + 9), float("nan"))
        big[::2, 1:, 3 : vocab + 3] = logits
        l2 = big[::2, 1:, 3 : vocab + 3]
        d2 = torch.stack([drafts, drafts], 2)[..., 1]
    else:
        l2 = logits.transpose(1, 2).contiguous().transpose(1, 2)
        d2 = drafts
    assert torch.equal(l2, logits) and torch.equal(d2, drafts)
    got = backend.greedy_verify(d2, l2, num_draft_tokens=num_draft)
    assert_same(got, greedy_verify_reference(drafts, logits, num_draft))


def test_long_drafts(backend):
    # n + 1 > 256 (more positions than CUDA threads per block)
    gen = torch.Generator().manual_seed(6)
    batch, n, vocab = 3, 300, 9
    logits = torch.randn(batch, n + 1, vocab, generator=gen)
    argmax = torch.argmax(logits, -1)
    drafts = argmax[:, :n].clone()
    drafts[1, 280] = (drafts[1, 280] + 1) % vocab
    drafts[2, 0] = (drafts[2, 0] + 1) % vocab
    got = backend.greedy_verify(drafts, logits)
    assert_same(got, greedy_verify_reference(drafts, logits))
    assert got[1].tolist() == [n, 280, 0]


@settings(max_examples=20, **HYPOTHESIS)
@given(
    batch=st.integers(0, 6),
    n=st.integers(0, 6),
    vocab=st.integers(1, 300),
    dtype=st.sampled_from(FLOAT_DTYPES),
    ragged=st.sampled_from([None, torch.int32, torch.int64]),
    ids_dtype=st.sampled_from([torch.int32, torch.int64]),
    ties=st.booleans(),
    infs=st.booleans(),
    data_seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_hypothesis(backend, batch, n, vocab, dtype, ragged, ids_dtype, ties, infs, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    drafts, logits, num_draft = make_case(
        gen, batch, n, vocab, dtype=dtype, ids_dtype=ids_dtype, ragged=ragged, ties=ties, infs=infs
    )
    got = backend.greedy_verify(drafts, logits, num_draft_tokens=num_draft)
    assert_same(got, greedy_verify_reference(drafts, logits, num_draft))
    assert_well_formed(*got, drafts, vocab, num_draft)


def test_cpu_and_simt_identical():
    try:
        _simt.load()
    except ImportError as exc:
        pytest.skip(f"SIMT build not present: {exc}")
    gen = torch.Generator().manual_seed(8)
    for dtype in FLOAT_DTYPES:
        for ties in (False, True):
            drafts, logits, num_draft = make_case(gen, 32, 4, 513, dtype=dtype, ragged=torch.int32, ties=ties,
                                                  infs=True)
            cpu = fastar.greedy_verify(drafts, logits, num_draft_tokens=num_draft)
            with _common.using_ops(torch.ops.fastar_simt):
                simt = fastar.greedy_verify(drafts, logits, num_draft_tokens=num_draft)
            assert_same(simt, cpu, str(dtype))


# A vocabulary of several 16-byte-load tiles and few rows: the CUDA kernel splits each row over several blocks
# (the emulator counts 4 SMs, so 1 row of 3 positions of V = 9001 takes 5 chunks of 2048 tokens).
SPLIT_VOCAB = 9001


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "unaligned"])
def test_rows_split_over_blocks(backend, dtype, layout):
    """Maxima planted in every chunk, ties across a chunk boundary (the lowest index wins), -inf rows; rows
    whose start is not 16-byte aligned (a padded vocabulary) take the element-wise loads."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{layout}".encode()))
    vocab, n = SPLIT_VOCAB, 2
    for where in ([5, 2047, 2048], [4095, 8191, vocab - 1], [6143, 100, 9000]):
        logits = torch.randn(2, n + 1, vocab, generator=gen).to(dtype)
        for i, t in enumerate(where):
            logits[:, i, t] = 50.0
        logits[1, 1, [3000, 7000]] = 60.0  # a tie in two chunks
        logits[1, 2] = float("-inf")  # argmax 0
        if layout == "unaligned":
            padded = torch.zeros(2, n + 1, vocab + 1, dtype=dtype)
            padded[..., 1:] = logits
            logits = padded[..., 1:]
        argmax = torch.argmax(logits.double(), -1)
        drafts = argmax[:, :n].clone()
        drafts[0, 1] = (drafts[0, 1] + 1) % vocab  # row 0 stops at position 1
        got = backend.greedy_verify(drafts, logits)
        assert_same(got, greedy_verify_reference(drafts, logits))
        assert got[1].tolist() == [1, n] and got[0][1, 1] == 3000 and got[0][1, 2] == 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_in_any_chunk_of_a_split_row(backend, dtype):
    logits = torch.randn(1, 2, SPLIT_VOCAB, generator=torch.Generator().manual_seed(31)).to(dtype)
    drafts = torch.argmax(logits[:, :1].double(), -1)  # accepted: the bonus row is read too
    for position, t in ((0, 0), (0, 4500), (1, 2048), (1, SPLIT_VOCAB - 1)):
        bad = logits.clone()
        bad[0, position, t] = float("nan")
        with pytest.raises(ValueError, match="batch row 0: .*NaN logit"):
            backend.checked(backend.greedy_verify, drafts, bad)
    bad = logits.clone()
    bad[0, 1, 7000] = float("nan")  # after a mismatch at position 0: never read
    wrong = (drafts + 1) % SPLIT_VOCAB
    assert_same(backend.checked(backend.greedy_verify, wrong, bad), greedy_verify_reference(wrong, logits))


def test_cpu_and_simt_identical_split_rows():
    try:
        _simt.load()
    except ImportError as exc:
        pytest.skip(f"SIMT build not present: {exc}")
    gen = torch.Generator().manual_seed(30)
    for dtype in FLOAT_DTYPES:
        drafts, logits, num_draft = make_case(gen, 2, 3, 20000, dtype=dtype, ragged=torch.int64, ties=True)
        cpu = fastar.greedy_verify(drafts, logits, num_draft_tokens=num_draft)
        with _common.using_ops(torch.ops.fastar_simt):
            simt = fastar.greedy_verify(drafts, logits, num_draft_tokens=num_draft)
        assert_same(simt, cpu, str(dtype))


def test_outputs_fully_written_over_poisoned_memory(backend):
    gen = torch.Generator().manual_seed(9)
    batch, n, vocab = 33, 6, 40
    drafts, logits, num_draft = make_case(gen, batch, n, vocab, ragged=torch.int32)
    for _ in range(3):
        poison = [torch.full((batch, n + 1), 0x7F7F7F7F, dtype=torch.int32, device=backend.device) for _ in range(4)]
        poison += [torch.full((batch,), 0x7F7F7F7F, dtype=torch.int32, device=backend.device) for _ in range(4)]
        del poison
        tokens, num_accepted = backend.greedy_verify(drafts, logits, num_draft_tokens=num_draft)
        assert not (tokens == 0x7F7F7F7F).any() and not (num_accepted == 0x7F7F7F7F).any()
        assert_well_formed(tokens, num_accepted, drafts, vocab, num_draft)
        assert_same((tokens, num_accepted), greedy_verify_reference(drafts, logits, num_draft))


# ----------------------------------------------------------------------------------------------------
# 3. bad input
# ----------------------------------------------------------------------------------------------------


def valid_case(batch=3, n=3, vocab=8, seed=12):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, n + 1, vocab, generator=gen)
    drafts = torch.argmax(logits[:, :n], -1)  # every draft accepted: every row is read
    return drafts, logits


def test_bad_shapes_and_dtypes(backend):
    drafts, logits = valid_case()
    call = lambda d=drafts, lg=logits, **kw: backend.checked(backend.greedy_verify, d, lg, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="draft_token_ids must have 2 dimension"):
        call(d=drafts[0])
    with pytest.raises(ValueError, match="target_logits must be 3-D"):
        call(lg=logits[0])
    with pytest.raises(TypeError, match="draft_token_ids must be int32 or int64"):
        call(d=drafts.float())
    with pytest.raises(TypeError, match="target_logits must be float32, float16 or bfloat16"):
        call(lg=logits.double())
    with pytest.raises(TypeError, match="target_logits must be float32, float16 or bfloat16"):
        call(lg=logits.int())
    with pytest.raises(ValueError, match=r"target_logits must have shape \[B, n\+1, V\]"):
        call(lg=logits[:, :3])
    with pytest.raises(ValueError, match=r"target_logits must have shape \[B, n\+1, V\]"):
        call(lg=logits[:2])
    with pytest.raises(ValueError, match="vocabulary dimension of target_logits is empty"):
        call(lg=logits[..., :0])
    with pytest.raises(ValueError, match=r"num_draft_tokens must have shape \[B\]"):
        call(num_draft_tokens=torch.tensor([1, 2, 3, 0]))
    with pytest.raises(ValueError, match="num_draft_tokens must have 1 dimension"):
        call(num_draft_tokens=torch.ones(3, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="num_draft_tokens must be int32 or int64"):
        call(num_draft_tokens=torch.ones(3, dtype=torch.float32))


@pytest.mark.parametrize(
    "value,position,exc,message",
    [
        (-1, 0, IndexError, "batch row 1: a draft token id outside"),
        (8, 1, IndexError, "batch row 1: a draft token id outside"),
        (2**31 - 1, 2, IndexError, "batch row 1: a draft token id outside"),
    ],
)
def test_bad_token_ids(backend, value, position, exc, message):
    drafts, logits = valid_case()
    drafts[1, position] = value
    if position > 0:  # validated even after the first mismatch
        drafts[1, 0] = (int(torch.argmax(logits[1, 0])) + 1) % 8
    for ids_dtype in (torch.int32, torch.int64):
        with pytest.raises(exc, match=message):
            backend.checked(backend.greedy_verify, drafts.to(ids_dtype), logits)


@pytest.mark.parametrize("value", [-1, 4])
def test_bad_num_draft_tokens(backend, value):
    drafts, logits = valid_case()
    with pytest.raises(ValueError, match="batch row 2: num_draft_tokens outside"):
        backend.checked(backend.greedy_verify, drafts, logits, num_draft_tokens=torch.tensor([3, 0, value]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_in_read_row(backend, dtype):
    _, logits = valid_case()
    logits = logits.to(dtype)
    drafts = torch.argmax(logits[:, :3].double(), -1)  # every draft matches: every row is read
    for position in range(4):  # the bonus row included
        bad = logits.clone()
        bad[2, position, 5] = float("nan")
        with pytest.raises(ValueError, match="batch row 2: .*NaN logit"):
            backend.checked(backend.greedy_verify, drafts, bad)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_anywhere_in_read_row(backend, dtype):
    vocab = 21
    logits = torch.randn(2, 2, vocab, generator=torch.Generator().manual_seed(13)).to(dtype)
    drafts = torch.argmax(logits[:, :1].double(), -1)  # accepted: the bonus row is read too
    for position in range(2):
        for t in range(vocab):
            bad = logits.clone()
            bad[1, position, t] = float("nan")
            with pytest.raises(ValueError, match="batch row 1: .*NaN logit"):
                backend.checked(backend.greedy_verify, drafts, bad)


def test_nan_in_unread_row(backend):
    # rows after the first mismatch are never read: a NaN there is no error (without debug checks)
    drafts, logits = valid_case()
    drafts[0, 1] = (drafts[0, 1] + 1) % 8  # row 0 stops at position 1
    bad = logits.clone()
    bad[0, 2, 3] = float("nan")
    bad[0, 3, 0] = float("nan")
    got = backend.checked(backend.greedy_verify, drafts, bad)
    assert_same(got, greedy_verify_reference(drafts, logits))
    assert got[1].tolist() == [1, 3, 3]


def test_debug_checks(backend, debug_checks):
    drafts, logits = valid_case()
    drafts[0, 1] = (drafts[0, 1] + 1) % 8
    bad = logits.clone()
    bad[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="target_logits holds a NaN"):
        backend.greedy_verify(drafts, bad)
    d = drafts.clone()
    d[2, 2] = 8
    with pytest.raises(IndexError, match="draft token id outside"):
        backend.greedy_verify(d, logits)
    with pytest.raises(ValueError, match="num_draft_tokens outside"):
        backend.greedy_verify(drafts, logits, num_draft_tokens=torch.tensor([0, 4, 0]))
    assert_same(backend.greedy_verify(drafts, logits), greedy_verify_reference(drafts, logits))


def test_invalid_rows_are_marked(backend):
    gen = torch.Generator().manual_seed(14)
    batch, n, vocab = 7, 3, 20
    logits = torch.randn(batch, n + 1, vocab, generator=gen)
    drafts = torch.argmax(logits[:, :n], -1)
    drafts[5, 2] = (drafts[5, 2] + 1) % vocab
    num_draft = torch.tensor([3, 3, 3, 3, 3, 3, 1])
    good = (drafts.clone(), logits.clone(), num_draft.clone())
    want_status = torch.zeros(batch, dtype=torch.int32)
    num_draft[1] = 4
    want_status[1] = STATUS_BAD_NUM_DRAFT
    drafts[2, 2] = -7
    want_status[2] = STATUS_BAD_ID
    logits[3, 1, 0] = float("nan")
    want_status[3] = STATUS_BAD_VALUE
    drafts[6, 2] = 10**5  # unused: row 6 has one draft
    good[0][6, 2] = 10**5
    logits[5, 3, 1] = float("nan")  # unread: row 5 stops at position 2
    if not backend.marks_invalid_rows:
        with pytest.raises(ValueError, match="batch row 1: num_draft_tokens outside"):
            backend.greedy_verify(drafts, logits, num_draft_tokens=num_draft)
        return
    tokens, num_accepted = backend.greedy_verify(drafts, logits, num_draft_tokens=num_draft)
    bad = want_status != 0
    assert torch.equal(num_accepted[bad], -want_status[bad])
    assert (tokens[bad] == -1).all()
    ref_tokens, ref_num_accepted = greedy_verify_reference(*good)
    assert torch.equal(tokens[~bad], ref_tokens[~bad]) and torch.equal(num_accepted[~bad], ref_num_accepted[~bad])
    with pytest.raises(ValueError, match="batch row 1: num_draft_tokens outside"):
        fastar.check_rows(num_accepted)
