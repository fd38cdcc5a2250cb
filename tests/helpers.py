"""Helpers shared by the tests."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck

# hypothesis settings of the per-backend property tests: fixed examples (the suite is deterministic),
# no example database, and fixtures (the backend) shared across examples.
HYPOTHESIS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_same(got, want, msg=""):
    tokens, num_accepted = got
    ref_tokens, ref_num_accepted = want
    assert tokens.dtype == torch.int32 and num_accepted.dtype == torch.int32
    assert tokens.shape == ref_tokens.shape and num_accepted.shape == ref_num_accepted.shape
    if not torch.equal(num_accepted, ref_num_accepted) or not torch.equal(tokens, ref_tokens):
        bad = (tokens != ref_tokens).any(-1) | (num_accepted != ref_num_accepted)
        row = int(torch.nonzero(bad)[0])
        raise AssertionError(
            f"{msg} first differing row {row}: got {tokens[row].tolist()} / {int(num_accepted[row])}, "
            f"reference {ref_tokens[row].tolist()} / {int(ref_num_accepted[row])} "
            f"({int(bad.sum())} of {bad.numel()} rows differ)"
        )
