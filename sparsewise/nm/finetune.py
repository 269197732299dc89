"""Recovery after pruning: fine-tuning with the N:M mask held fixed, or SR-STE.

- ``mode="masked"``: the pruned positions of every pruned nn.Linear stay exactly zero (gradients
  are masked and the mask is re-applied after each optimizer step, so momentum or weight decay
  cannot revive them). SparseLinear layers keep their pattern by construction.
- ``mode="srste"``: sparse-refined straight-through estimation (Zhou et al. 2021). The forward
  uses W * M with M = the magnitude N:M mask of the *current* dense weights, recomputed every
  step; the gradient reaching W is grad(W * M) + lambda * (1 - M) * W, which decays the pruned
  weights so the mask settles. At the end the weights are left N:M (zeros in place).

Optional distillation from a dense teacher's logits (KL at temperature T, mixed with the task
loss by ``distill_alpha``). Loops for classifiers and causal LMs share one core. Checkpoints
are safetensors files written atomically.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .._util import atomic_path
from .mask import check_nm, is_nm, nm_mask

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "finetune_classifier", "finetune_causal_lm",
           "save_checkpoint", "load_checkpoint", "SRSTE"]


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = "masked"  # "masked" | "srste"
    n: int = 2
    m: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    srste_lambda: float = 2e-4
    distill_alpha: float = 0.0  # weight of the distillation loss (0: task loss only)
    distill_temperature: float = 2.0
    max_steps: int | None = None
    max_minutes: float | None = None
    epochs: int = 1

    def __post_init__(self):
        if self.mode not in ("masked", "srste"):
            raise ValueError(f"FinetuneConfig.mode must be 'masked' or 'srste', got {self.mode!r}")
        check_nm(self.n, self.m)
        for name in ("lr", "distill_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FinetuneConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "srste_lambda"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):  # NaN fails both
                raise ValueError(f"FinetuneConfig.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"FinetuneConfig.distill_alpha must be in [0, 1], got {self.distill_alpha!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"FinetuneConfig.max_steps must be >= 1, got {self.max_steps!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"FinetuneConfig.max_minutes must be > 0, got {self.max_minutes!r}")
        if self.epochs < 1:
            raise ValueError(f"FinetuneConfig.epochs must be >= 1, got {self.epochs!r}")


@dataclass
class FinetuneResult:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)


class SRSTE(torch.autograd.Function):
    """W -> W * M (M: magnitude N:M mask of W); backward: grad * M-free STE + lambda * (1 - M) * W."""

    @staticmethod
    def forward(ctx, w, n, m, lam):
        mask = nm_mask(w.detach().abs().float(), n, m).to(w.dtype)
        ctx.save_for_backward(w, mask)
        ctx.lam = lam
        return w * mask

    @staticmethod
    def backward(ctx, grad):
        w, mask = ctx.saved_tensors
        # straight-through: the dense weight receives the gradient of the masked one everywhere,
        # plus a decay that pulls the currently pruned weights towards zero
        return grad + ctx.lam * (1 - mask) * w, None, None, None


class _SRSTEParam(nn.Module):
    def __init__(self, n: int, m: int, lam: float):
        super().__init__()
        self.n, self.m, self.lam = n, m, lam

    def forward(self, w):
        return SRSTE.apply(w, self.n, self.m, self.lam)


def _target_layers(model: nn.Module, cfg: FinetuneConfig) -> dict[str, nn.Linear]:
    """Linears that carry an N:M pattern (masked mode) or can take one (SR-STE)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.in_features % cfg.m == 0:
            if cfg.mode == "srste" or is_nm(mod.weight.detach(), cfg.n, cfg.m):
                out[name] = mod
    return out


def finetune(model: nn.Module, data: Iterable, loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]],
             config: FinetuneConfig = FinetuneConfig(), *, teacher: nn.Module | None = None,
             checkpoint: str | Path | None = None, progress: bool = True) -> FinetuneResult:
    """The shared loop. ``loss_fn(model, batch) -> (task_loss, logits)``; with a ``teacher`` and
    ``distill_alpha > 0`` the loss is (1 - a) * task + a * T^2 * KL(teacher || student) on the
    logits, the teacher's taken as ``loss_fn(teacher, batch)[1]`` without gradients."""
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if config.distill_alpha > 0 and teacher is None:
        raise ValueError("distill_alpha > 0 needs a teacher model")
    layers = _target_layers(model, config)
    from .linear import SparseLinear

    if not layers and not any(isinstance(mm, SparseLinear) for mm in model.modules()):
        raise ValueError(f"no layer to fine-tune: the model has no {config.n}:{config.m} nn.Linear or SparseLinear"
                         if config.mode == "masked" else "no nn.Linear layer with in_features divisible by m")
    if config.epochs > 1 and iter(data) is data:
        raise ValueError("data is a one-shot iterator: pass a list or a re-iterable loader for epochs > 1")
    masks = {name: (lin.weight.detach() != 0) for name, lin in layers.items()} if config.mode == "masked" else {}
    result = FinetuneResult(layers=list(layers))
    hooks = []
    t0 = time.perf_counter()
    deadline = t0 + 60 * config.max_minutes if config.max_minutes else None
    if teacher is not None:
        teacher.eval()
    model.train()
    try:
        for name, mk in masks.items():
            if layers[name].weight.requires_grad:  # frozen layers get no gradient to mask
                hooks.append(layers[name].weight.register_hook(lambda g, mk=mk: g * mk.to(g.dtype)))
        if config.mode == "srste":
            for lin in layers.values():
                parametrize.register_parametrization(lin, "weight", _SRSTEParam(config.n, config.m, config.srste_lambda))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameter: every parameter has requires_grad=False")
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        done = False
        bar = tqdm(total=config.max_steps, desc=f"finetune ({config.mode})", disable=not progress)
        for _epoch in range(config.epochs):
            for batch in data:
                loss, logits = loss_fn(model, batch)
                if config.distill_alpha > 0:
                    with torch.no_grad():
                        t_logits = loss_fn(teacher, batch)[1]
                    temp = config.distill_temperature
                    kd = F.kl_div(F.log_softmax(logits / temp, -1), F.log_softmax(t_logits / temp, -1),
                                  log_target=True, reduction="batchmean") * temp * temp
                    loss = (1 - config.distill_alpha) * loss + config.distill_alpha * kd
                if not torch.isfinite(loss):
                    raise ValueError(f"non-finite loss at step {result.steps}: lower the learning rate or check the data")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if masks:
                    with torch.no_grad():
                        for name, mk in masks.items():
                            layers[name].weight.mul_(mk.to(layers[name].weight.dtype))
                result.steps += 1
                result.losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
                if (config.max_steps and result.steps >= config.max_steps) or (deadline and time.perf_counter() > deadline):
                    done = True
                    break
            if done:
                break
        bar.close()
    finally:
        model.eval()
        for h in hooks:
            h.remove()
        if config.mode == "srste":
            for lin in layers.values():
                if parametrize.is_parametrized(lin, "weight"):
                    _end_srste(lin, config.n, config.m)
    result.seconds = time.perf_counter() - t0
    if checkpoint is not None:
        save_checkpoint(model, checkpoint)
    return result


def _end_srste(lin: nn.Linear, n: int, m: int) -> None:
    """Drop the SR-STE parametrization, leaving W * M with the final mask (weights end N:M).
    Computed here rather than by re-running the parametrization so that a run that diverged
    (NaN weights) is still cleaned up: NaN ranks as largest and propagates, as in the dense layer."""
    with torch.no_grad():
        w = lin.parametrizations.weight.original.detach()
        mask = nm_mask(w.abs().float().nan_to_num(nan=float("inf")), n, m)
        final = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    with torch.no_grad():
        lin.weight.copy_(final)


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def finetune_classifier(model: nn.Module, loader: Iterable, config: FinetuneConfig = FinetuneConfig(), **kw) -> FinetuneResult:
    """Fine-tune a classifier on ``(inputs, labels)`` batches with cross-entropy."""
    def loss_fn(mdl, batch):
        x, y = batch
        logits = _logits(mdl(x))
        return F.cross_entropy(logits, y), logits

    return finetune(model, loader, loss_fn, config, **kw)


def finetune_causal_lm(model: nn.Module, batches: Iterable[torch.Tensor], config: FinetuneConfig = FinetuneConfig(),
                       **kw) -> FinetuneResult:
    """Fine-tune a causal LM (transformers-style: ``model(ids, labels=ids).loss``) on LongTensor
    batches of token ids; distillation compares next-token logits."""
    def loss_fn(mdl, ids):
        out = mdl(ids, labels=ids)
        return out.loss, out.logits.reshape(-1, out.logits.shape[-1])

    return finetune(model, batches, loss_fn, config, **kw)


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write ``model.state_dict()`` to a safetensors file atomically (shared tensors are copied)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "sparsewise.checkpoint", "version": "1"})
    return Path(path)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a file written by :func:`save_checkpoint` into ``model`` (strict); clear errors for
    missing, truncated or foreign files."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors checkpoint (truncated or corrupted?): {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: does not match the model: {str(exc).splitlines()[0]}") from None
    return model
