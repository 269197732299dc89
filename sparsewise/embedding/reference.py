"""Pure-torch references of the embedding kernels: the fallback and the tests' oracle.

Legend as in kernels.py: F features, B batch size, nnz ids, D a table's dim.
"""
from __future__ import annotations

import math

import torch

from .config import Adagrad, Adam, RowwiseAdagrad, SGD

__all__ = ["reference_pool", "reference_update"]


def reference_pool(rows: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                   weights: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Pool one feature: rows (N, D) fp32 (autograd flows through it), values (nnz,), lengths (B,)
    -> (B, D). sum: sum w*row; mean: sum w*row / L; max: max w*row (0 for an empty bag)."""
    B = lengths.numel()
    D = rows.shape[1]
    g = rows[values.to(torch.int64)]
    if weights is not None:
        g = g * weights.to(rows.dtype)[:, None]
    bag = torch.repeat_interleave(torch.arange(B), lengths.to(torch.int64))
    if pooling in ("sum", "mean"):
        out = torch.zeros(B, D, dtype=rows.dtype).index_add(0, bag, g)
        if pooling == "mean":
            out = out / lengths.clamp(min=1).to(rows.dtype)[:, None]
        return out
    if pooling == "max":
        out = torch.full((B, D), -math.inf, dtype=rows.dtype)
        out = out.scatter_reduce(0, bag[:, None].expand(-1, D), g, reduce="amax", include_self=True)
        return torch.where(lengths[:, None] > 0, out, torch.zeros_like(out))
    raise ValueError(f"unknown pooling {pooling!r}")


def reference_update(weight: torch.Tensor, grad: torch.Tensor, touched: torch.Tensor, opt, states: dict,
                     step: int) -> None:
    """Apply ``opt`` in place to the rows ``touched`` (1-D unique ids) of ``weight`` (N, D) given
    the dense gradient ``grad`` (N, D); ``states`` maps state names to tensors (updated in place)."""
    r = touched.to(torch.int64)
    g = grad[r]
    w = weight[r]
    if isinstance(opt, SGD):
        w = w - opt.lr * g
    elif isinstance(opt, Adagrad):
        s = states["sum"][r] + g * g
        states["sum"][r] = s
        w = w - opt.lr * g / (s.sqrt() + opt.eps)
    elif isinstance(opt, RowwiseAdagrad):
        s = states["sum"][r] + (g * g).mean(dim=1)
        states["sum"][r] = s
        w = w - (opt.lr / (s.sqrt() + opt.eps))[:, None] * g
    elif isinstance(opt, Adam):
        b1, b2 = opt.betas
        m = states["exp_avg"][r]
        v = states["exp_avg_sq"][r]
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        states["exp_avg"][r] = m
        states["exp_avg_sq"][r] = v
        step_size = opt.lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        w = w - step_size * m / (v.sqrt() + opt.eps)
    else:
        raise TypeError(f"unknown optimizer {type(opt).__name__}")
    weight[r] = w
