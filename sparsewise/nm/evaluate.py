"""Quality measures for pruned models: perplexity with a fixed window and stride, accuracy.

Perplexity follows the usual sliding-window protocol: windows of ``window`` tokens start every
``stride`` tokens (plus one final window ending at the last token); each window scores only the
tokens not already scored, each predicted from the tokens before it inside the window. With
stride < window every token after the first is scored exactly once with at least
``window - stride`` tokens of context; with stride == window the first token of each window has
no context there and is not scored.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["perplexity", "accuracy"]


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, *, window: int = 512, stride: int = 256,
               progress: bool = False) -> float:
    """exp(mean negative log-likelihood) of a causal LM over ``ids`` (1-D or (1, T) LongTensor).

    ``model(input_ids)`` must return logits (or an object with ``.logits``) of shape (1, t, V).

    >>> class Uniform(nn.Module):
    ...     def forward(self, x):
    ...         return torch.zeros(1, x.shape[-1], 10)
    >>> round(perplexity(Uniform(), torch.arange(40) % 10, window=16, stride=8), 3)
    10.0
    """
    from tqdm.auto import tqdm

    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("ids must be an integer torch.Tensor of token ids")
    ids = ids.reshape(-1).to(torch.int64)
    if not (isinstance(window, int) and isinstance(stride, int)) or window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got window={window}, stride={stride}")
    if ids.numel() < window:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, shorter than one window ({window})")
    was_training = model.training
    model.eval()
    nll, count, scored_to = 0.0, 0, 1  # position of the next token not yet scored
    starts = list(range(0, ids.numel() - window + 1, stride))
    if starts[-1] + window < ids.numel():
        starts.append(ids.numel() - window)  # the tail, so every token is scored
    try:
        for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
            chunk = ids[start:start + window].unsqueeze(0)
            out = model(chunk)
            logits = (out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out)[0]
            first = max(scored_to, start + 1)  # absolute position of the first token to score
            if first >= start + window:
                continue
            targets = ids[first:start + window]
            pred = logits[first - start - 1:window - 1].float()
            if not torch.isfinite(pred).all():
                raise ValueError("the model produced non-finite logits")
            nll += float(F.cross_entropy(pred, targets, reduction="sum"))
            count += targets.numel()
            scored_to = start + window
    finally:
        model.train(was_training)
    return math.exp(nll / count)


@torch.no_grad()
def accuracy(model: nn.Module, batches, *, progress: bool = False) -> float:
    """Top-1 accuracy in percent over ``(inputs, labels)`` batches."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    right = total = 0
    try:
        for x, y in tqdm(batches, desc="accuracy", disable=not progress):
            out = model(x)
            logits = out.logits if hasattr(out, "logits") else out
            right += int((logits.argmax(-1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("no evaluation data")
    return 100.0 * right / total
