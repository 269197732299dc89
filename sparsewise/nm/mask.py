"""N:M masks: keep N of every M consecutive weights along the input dimension.

Legend: O = out_features (rows), K = in_features (columns), G = K / M groups per row.
"""
from __future__ import annotations

import torch

__all__ = ["check_nm", "nm_mask", "is_nm"]


def check_nm(n, m) -> tuple[int, int]:
    """Validate an N:M pattern (0 < n < m <= 16) and return it as ints."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"N:M pattern: {name} must be an int, got {type(v).__name__}")
    if not 0 < n < m <= 16:
        raise ValueError(f"N:M pattern must satisfy 0 < n < m <= 16, got {n}:{m}")
    return n, m


def _groups(t: torch.Tensor, m: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 1:
        raise ValueError(f"{what} must have at least one dimension")
    k = t.shape[-1]
    if k % m != 0:
        raise ValueError(f"{what}: the last dimension ({k}) is not divisible by m={m}")
    return t.reshape(*t.shape[:-1], k // m, m)


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``scores`` in every group of ``m`` along the last dim.

    Ties are broken towards the lower position, so the mask is deterministic.

    >>> w = torch.tensor([[0.1, -3.0, 2.0, 0.5]])
    >>> nm_mask(w.abs(), 2, 4)
    tensor([[False,  True,  True, False]])
    """
    n, m = check_nm(n, m)
    g = _groups(scores, m, "scores")
    if not (g.dtype.is_floating_point or g.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"scores must be a real-valued tensor, got {scores.dtype}")
    if g.dtype.is_floating_point and torch.isnan(g).any():
        raise ValueError("scores contain NaN: cannot rank weights")
    # stable sort descending keeps the lower position first among equal scores
    order = torch.sort(g.to(torch.float64) if g.dtype.is_floating_point else g, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(g.shape, dtype=torch.bool, device=g.device)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(scores.shape)


def is_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every group of ``m`` consecutive weights (last dim) has at most ``n`` non-zeros.

    >>> is_nm(torch.tensor([[0.0, 1.0, 2.0, 0.0]]), 2, 4)
    True
    """
    n, m = check_nm(n, m)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 1 or weight.shape[-1] % m != 0:
        return False
    g = _groups(weight, m, "weight")
    return bool(((g != 0).sum(-1) <= n).all())
