"""``nm_linear``: y = x @ W.T + b with W packed N:M; checks inputs, picks the backend, autograd.

Backward keeps the mask fixed: gradients flow to the input, the kept values and the bias
(pruned positions stay exactly zero), so a packed layer can be fine-tuned.
"""
from __future__ import annotations

import torch

from .kernels import nm_matmul, reference_matmul
from .tensor import NMTensor

__all__ = ["nm_linear", "check_linear_inputs"]


def check_linear_inputs(x: torch.Tensor, weight: NMTensor, bias: torch.Tensor | None) -> None:
    """Raise a clear TypeError/ValueError before any kernel runs."""
    if not isinstance(weight, NMTensor):
        raise TypeError(f"weight must be an NMTensor, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {weight.dtype} (as in F.linear, they must match)")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 'no'} features in its last dimension, "
                         f"the weight expects in_features={weight.shape[1]}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias is {bias.dtype} but the weight is {weight.dtype}")


def _forward(x: torch.Tensor, weight: NMTensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.shape[1])
    if backend == "reference" or x.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        y = reference_matmul(x2, weight)
        if bias is not None:
            y += bias.to(torch.float32)
    else:
        b32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
        y = nm_matmul(x2, weight, b32)
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


class _NMLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, weight, backend):
        w = weight if values is weight.values else weight.with_values(values)
        ctx.save_for_backward(x, values, bias)
        ctx.weight = w
        return _forward(x, w, bias, backend)

    @staticmethod
    def backward(ctx, gy):
        x, values, bias = ctx.saved_tensors
        w = ctx.weight
        k = w.shape[1]
        g2 = gy.reshape(-1, w.shape[0]).to(torch.float32)
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ w.to_dense().to(torch.float32)).to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            # gradient of each kept value only: (gy^T x) sampled at the kept positions
            full = g2.T @ x.reshape(-1, k).to(torch.float32)
            gv = torch.gather(full, 1, w.positions()).to(values.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(bias.dtype)
        return gx, gv, gb, None, None


def nm_linear(x: torch.Tensor, weight: NMTensor, bias: torch.Tensor | None = None, *,
              values: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``x @ weight.T + bias`` with ``weight`` packed N:M, for ``x`` of shape (..., in_features).

    ``values`` (optional) replaces ``weight.values`` and receives gradients (what SparseLinear
    passes as its parameter). ``backend``: "auto" (numba kernels on CPU, torch elsewhere) or
    "reference" (pure torch).

    >>> w = NMTensor.from_dense(torch.randn(6, 8))
    >>> nm_linear(torch.randn(3, 8), w).shape
    torch.Size([3, 6])
    """
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend must be 'auto' or 'reference', got {backend!r}")
    check_linear_inputs(x, weight, bias)
    if values is not None:
        if not isinstance(values, torch.Tensor) or values.shape != weight.values.shape or values.dtype != weight.dtype:
            raise ValueError(f"values must be a {weight.dtype} tensor of shape {tuple(weight.values.shape)}")
    else:
        values = weight.values
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                               or (bias is not None and bias.requires_grad))
    if not needs_grad:  # inference: skip autograd bookkeeping (it costs as much as a small layer)
        return _forward(x, weight if values is weight.values else weight.with_values(values), bias, backend)
    return _NMLinearFn.apply(x, values, bias, weight, backend)
