"""Float64 reference of SpecTr's K-SEQ (Sun et al., NeurIPS 2023; docs/acceptance.md "SpecTr"), written from the
paper's formulas and independent of the kernels' fixed-point solve: rho* by bisection, the acceptance probability,
the residual and the law of the emitted token.
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["spectr_beta", "spectr_level", "spectr_rho"]


def spectr_beta(p: torch.Tensor, q: torch.Tensor, rho: float) -> float:
    """beta(rho) = sum_x min(q(x), p(x) / rho)."""
    return float(torch.minimum(q.double(), p.double() / rho).sum())


def spectr_rho(p: torch.Tensor, q: torch.Tensor, k: int, iterations: int = 200) -> float:
    """The smallest rho >= 1 with 1 - (1 - beta(rho))^k <= rho beta(rho), by bisection on [1, k] (the condition holds
    at rho = k since k beta >= 1 - (1 - beta)^k, and rho beta(rho) - (1 - (1 - beta(rho))^k) grows with rho)."""

    def ok(rho: float) -> bool:
        beta = spectr_beta(p, q, rho)
        return 1.0 - (1.0 - beta) ** k <= rho * beta

    if ok(1.0):
        return 1.0
    lo, hi = 1.0, float(k)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def spectr_level(p: torch.Tensor, q: torch.Tensor, k: int, rho: float | None = None) -> Dict[str, object]:
    """One K-SEQ level over k i.i.d. drafts from q: rho (rho* unless given), beta, P(accept) = 1 - (1 - beta)^k,
    first[i] = P(the i-th draft is the first accepted), the residual law (zeros when P(accept) = 1) and the law of the
    emitted token, accepted draft or residual sample (equal to p for any rho >= rho*)."""
    p, q = p.double(), q.double()
    rho = spectr_rho(p, q, k) if rho is None else rho
    m = torch.minimum(q, p / rho)
    beta = float(m.sum())
    accept = 1.0 - (1.0 - beta) ** k
    first = torch.tensor([(1.0 - beta) ** i * beta for i in range(k)], dtype=torch.float64)
    accepted_law = m * (accept / beta) if beta > 0 else torch.zeros_like(p)
    leftover = (p - accepted_law).clamp_min(0)
    residual = leftover / leftover.sum() if leftover.sum() > 0 else torch.zeros_like(p)
    output = accepted_law + (1.0 - accept) * residual
    return {"rho": rho, "beta": beta, "accept": accept, "first": first, "residual": residual, "output": output}
