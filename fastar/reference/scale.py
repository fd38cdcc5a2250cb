"""Reference of :func:`fastar.scale_attention`: float64 attention over the layout's materialized mask."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..scale import ScaleLayout
from .attention import attention_reference

__all__ = ["scale_attention_reference"]


def _l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x / max(|x|, eps)`` along the last dimension (``torch.nn.functional.normalize``), written out."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def scale_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ScaleLayout,
    *,
    scale: Optional[float] = None,
    qk_norm: bool = False,
    q_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Next-scale attention in float64: ``(out, lse)``.

    q: ``[B, Hq, Lq, D]`` (the last ``Lq`` tokens); k, v: ``[B, Hkv, L, D]``, ``L = layout.num_tokens``.
    ``qk_norm``: q and k are L2-normalised (eps 1e-12) and q multiplied by ``q_scale`` (float ``[Hq]``, None =
    1); the scale then defaults to 1, else to ``1/sqrt(D)``. The mask is ``layout.materialize()``'s last
    ``Lq`` rows.

    Returns out ``[B, Hq, Lq, D]`` in q's dtype and lse float32 ``[B, Hq, Lq]`` (natural log).
    """
    L, Lq = layout.num_tokens, q.shape[2]
    if k.shape[2] != L or Lq > L:
        raise ValueError(f"the layout has {L} tokens; got {k.shape[2]} keys and {Lq} queries")
    q64, k64, v64 = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    if qk_norm:
        q64, k64 = _l2_normalize(q64), _l2_normalize(k64)
        if q_scale is not None:
            q64 = q64 * q_scale.to(torch.float64).view(1, -1, 1, 1)
        scale = 1.0 if scale is None else scale
    elif q_scale is not None:
        raise ValueError("q_scale applies only with qk_norm=True")
    mask = layout.materialize(q.device)[L - Lq :]
    out, lse = attention_reference(q64, k64, v64, mask=mask.view(1, 1, Lq, L), scale=scale)
    return out.to(q.dtype), lse
