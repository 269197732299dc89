"""One-shot N:M pruning: magnitude, Wanda and SparseGPT, in place on nn.Linear weights.

Weights keep their nn.Linear home; the pruned positions become exact zeros in an N:M pattern
(``sparsify_`` then packs them). Calibration is gathered with forward hooks. For Wanda and
SparseGPT the model is pruned block by block: block i is calibrated on the outputs of the
already-pruned blocks before it (the inputs of each block are captured once with their keyword
arguments, e.g. attention masks, and replayed through the pruned block to feed the next one).

Legend: O = out_features, K = in_features, T = calibration tokens (rows of a layer's input).

References (algorithms as published, implemented here from their descriptions):
Wanda: Sun et al. 2023, score |W_ij| * ||X_j||_2. SparseGPT: Frantar & Alistarh 2023, OBS updates
with a Cholesky factor of the inverse Hessian, processed in column blocks, N:M masks chosen per
group of M columns by w^2 / [H^-1]_jj^2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .mask import check_nm, nm_mask

__all__ = ["prune_", "PruneReport", "METHODS", "sparsegpt_prune_weight", "wanda_scores", "skip_lm_head",
           "skip_head_and_routers"]

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class PruneReport:
    method: str
    pattern: str
    pruned: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    # experts of a stack that received no calibration token: pruned by magnitude instead
    magnitude_fallback: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.method} {self.pattern}: pruned {len(self.pruned)} layer(s), skipped {len(self.skipped)}"]
        lines += [f"  skipped {k}: {v}" for k, v in self.skipped.items()]
        if self.magnitude_fallback:
            lines.append(f"  no calibration tokens, pruned by magnitude: {', '.join(self.magnitude_fallback)}")
        return "\n".join(lines)


def skip_lm_head(name: str, module: nn.Module) -> bool:
    """Prune every Linear except a language model's output head (``lm_head``), which the
    published methods leave dense (it maps to the vocabulary and is very sensitive)."""
    return name.rsplit(".", 1)[-1] != "lm_head"


_GATES = ("lm_head", "gate", "router", "shared_expert_gate", "shared_gate")


def skip_head_and_routers(name: str, module: nn.Module) -> bool:
    """The default filter: like :func:`skip_lm_head`, and also keeps MoE routing layers dense
    (``gate``/``router`` Linears that score experts, ``shared_expert_gate``): they are tiny, and
    zeroing half their inputs changes which experts every token reaches. Expert weights and a
    LLaMA-style ``gate_proj`` are pruned."""
    return name.rsplit(".", 1)[-1] not in _GATES


# ---------------------------------------------------------------- per-layer algorithms

def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 with ``input_sq_norms`` the per-input-feature sums of squares (K,)."""
    return weight.abs().to(torch.float32) * input_sq_norms.to(torch.float32).clamp_min(0).sqrt().unsqueeze(0)


def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, *,
                           blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """Return the SparseGPT N:M-pruned copy of ``weight`` (O, K) given H = X^T X (K, K).

    Columns are visited left to right in blocks; at the first column of every group of ``m``
    the mask keeps, per row, the ``n`` weights with the largest w^2 / [H^-1]_jj^2; each pruned
    column's error is spread over the columns to its right through the inverse Hessian.
    """
    n, m = check_nm(n, m)
    o, k = weight.shape
    if k % m:
        raise ValueError(f"in_features ({k}) is not divisible by m={m}")
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be ({k}, {k}), got {tuple(hessian.shape)}")
    if blocksize % m:
        blocksize = max(m, blocksize // m * m)
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=h.dtype) * (percdamp * torch.diag(h).mean())
    # upper Cholesky factor of H^-1: row i holds the update direction for column i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                score = w1[:, i:i + m] ** 2 / torch.diag(h1)[i:i + m].unsqueeze(0) ** 2
                drop = torch.topk(score, m - n, dim=1, largest=False).indices
                pruned[:, i:i + m].scatter_(1, drop, True)
            col = w1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(col), col)
            q1[:, i] = q
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)


# ---------------------------------------------------------------- model-level driver

def _call(model: nn.Module, batch: Any):
    args, kwargs = _as_call(batch)
    return model(*args, **kwargs)


def _linears(module: nn.Module, prefix: str, n: int, m: int, filter_fn, report: PruneReport) -> dict[str, nn.Linear]:
    out = {}
    for name, sub in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if not isinstance(sub, nn.Linear):
            continue
        if filter_fn is not None and not filter_fn(full, sub):
            report.skipped[full] = "excluded by filter_fn"
        elif sub.in_features % m:
            report.skipped[full] = f"in_features={sub.in_features} is not divisible by m={m}"
        else:
            out[full] = sub
    return out


def _hidden(args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor | None]:
    """Where a block's hidden states arrive: positional 0, or the keyword that carries them."""
    if args:
        return 0, args[0] if isinstance(args[0], torch.Tensor) else None
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "hidden_states", kwargs["hidden_states"]
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return key, value
    return 0, None


def _is_sequential(model: nn.Module, stack: nn.ModuleList, batch) -> bool:
    """True if, on one calibration batch, each block's input is exactly the previous block's output
    (a layer stack), not a list of parallel modules (heads, experts)."""
    ins, outs, handles = {}, {}, []
    for i, blk in enumerate(stack):
        def pre(mod, args, kwargs, i=i):
            ins.setdefault(i, _hidden(args, kwargs)[1])

        def post(mod, args, kwargs, out, i=i):
            outs.setdefault(i, out[0] if isinstance(out, (tuple, list)) else out)

        handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(blk.register_forward_hook(post, with_kwargs=True))
    try:
        _run(model, [batch])
    finally:
        for h in handles:
            h.remove()
    for i in range(len(stack) - 1):
        a, b = outs.get(i), ins.get(i + 1)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)):
            return False
    return len(ins) == len(stack)


def _find_blocks(model: nn.Module, batch) -> tuple[str, nn.ModuleList] | None:
    """The longest nn.ModuleList of Linear-holding blocks that runs as a sequential layer stack."""
    candidates = [(name, sub) for name, sub in model.named_modules()
                  if isinstance(sub, nn.ModuleList) and len(sub) > 1
                  and all(any(isinstance(x, nn.Linear) or _expert_stack(x) is not None for x in blk.modules())
                          for blk in sub)]
    for name, sub in sorted(candidates, key=lambda c: -len(c[1])):
        if _is_sequential(model, sub, batch):
            return name, sub
    return None


class _Stop(Exception):
    pass


class _Stats:
    """Accumulates what one method needs from a Linear layer's inputs.

    Layers fed the same tensor (q/k/v, gate/up) share one computation through ``memo``, which
    holds that tensor (so its memory cannot be reused by another one while it is the key). Each
    call's X^T X is a float32 product (a few hundred rows), summed over calls in float64.
    """

    def __init__(self, layer: nn.Linear, method: str, memo: dict | None = None):
        k = layer.in_features
        self.method, self.rows = method, 0
        self.memo = {} if memo is None else memo
        self.sq = torch.zeros(k, dtype=torch.float64) if method == "wanda" else None
        self.h = torch.zeros(k, k, dtype=torch.float64) if method == "sparsegpt" else None

    def __call__(self, module, args):
        x, memo = args[0], self.memo
        if memo.get("x") is x and memo.get("version") == x._version:
            rows, sq, xtx = memo["value"]
        else:
            x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32).cpu()
            if not torch.isfinite(x2).all():
                raise ValueError("calibration activations contain NaN/Inf: check the model and the calibration data")
            rows = x2.shape[0]
            sq = (x2.to(torch.float64) ** 2).sum(0) if self.sq is not None else None
            xtx = (x2.T @ x2).to(torch.float64) if self.h is not None else None
            memo.update(x=x, version=x._version, value=(rows, sq, xtx))
        self.rows += rows
        if self.sq is not None:
            self.sq += sq
        if self.h is not None:
            self.h += xtx


def _prune_layers(layers: dict[str, nn.Linear], stats: dict[str, _Stats] | None, method: str, n: int, m: int,
                  report: PruneReport, backup: dict | None = None) -> None:
    for name, lin in layers.items():
        w = lin.weight.data
        st = stats[name] if stats is not None else None
        if st is not None and st.rows == 0:
            report.skipped[name] = _OFF_PATH
            continue
        new = _pruned(w, method, *((st.sq, st.h, st.rows) if st is not None else (None, None, None)), n, m)
        if backup is not None:
            backup.setdefault(lin.weight, w.detach().clone())
        with torch.no_grad():
            lin.weight.copy_(new)
        report.pruned.append(name)


_OFF_PATH = "received no calibration input (not on the forward path)"


def _pruned(w: torch.Tensor, method: str, sq, h, rows: int | None, n: int, m: int) -> torch.Tensor:
    if method == "magnitude":
        return w * nm_mask(w.abs().to(torch.float32), n, m).to(w.dtype)
    if method == "wanda":
        return w * nm_mask(wanda_scores(w, sq), n, m).to(w.dtype)
    return sparsegpt_prune_weight(w.cpu(), 2.0 * h / rows, n, m).to(w.device)


# ---------------------------------------------------------------- stacked experts

class _ExpertStack:
    """Experts kept as stacked 3-D weights (``gate_up`` (E, R, D), ``down`` (E, D, H)): each
    expert's two matrices are pruned on their own, calibrated on the tokens routed to that expert
    (the ``down`` matrix on the activations those tokens produce). Two layouts: sparsewise's
    :class:`~sparsewise.moe.Experts` (called with ``(x, plan)``) and transformers' (>= 5) stacked
    experts (``gate_up_proj``/``down_proj``, called with ``(hidden_states, top_k_index, ...)``).
    """

    def __init__(self, module: nn.Module, params: tuple[str, str], transposed: bool, act, routes):
        self.module, self.params, self.transposed = module, params, transposed
        self.act, self.routes = act, routes

    @property
    def num_experts(self) -> int:
        return getattr(self.module, self.params[0]).shape[0]

    def param(self, part: str) -> torch.Tensor:
        return getattr(self.module, self.params[0] if part == "gate_up" else self.params[1])

    def weight(self, part: str, e: int) -> torch.Tensor:
        """Expert ``e``'s matrix as (out_features, in_features) (a view of the parameter)."""
        w = self.param(part).data[e]
        return w.T if self.transposed else w

    def in_features(self, part: str) -> int:
        return self.weight(part, 0).shape[1]


def _expert_stack(sub: nn.Module) -> _ExpertStack | str | None:
    """The adapter for a module that holds stacked experts, a reason string when it holds them in
    a form this cannot prune, None when it holds none."""
    from ..moe.experts import Experts
    from ..moe.kernels import activate

    if isinstance(sub, Experts):
        if sub.packed is not None:
            return f"already packed {sub.weights_format}"

        def routes(args, kwargs):
            x = args[0] if args else kwargs["x"]
            plan = args[1] if len(args) > 1 else kwargs["plan"]
            off = plan.offsets.tolist()
            return x, [(e, plan.token_index[off[e]:off[e + 1]]) for e in range(plan.num_experts) if off[e + 1] > off[e]]

        return _ExpertStack(sub, ("gate_up", "down"), False, lambda h: activate(h, sub.activation), routes)
    gu, dn = getattr(sub, "gate_up_proj", None), getattr(sub, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3):
        return None
    if getattr(sub, "has_bias", False):
        return "experts with biases are not supported"
    act_fn = getattr(sub, "act_fn", None)
    if act_fn is None:
        return "no act_fn: cannot compute the down projection's inputs"
    interleaved = getattr(sub, "is_concatenated", True) is False

    def act(h):
        g, u = (h[..., 0::2], h[..., 1::2]) if interleaved else h.chunk(2, dim=-1)
        return act_fn(g) * u

    def routes(args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        top = args[1] if len(args) > 1 else kwargs["top_k_index"]
        top = top.reshape(x.reshape(-1, x.shape[-1]).shape[0], -1)
        # an index of E or more marks an assignment that was dropped
        return x, [(e, idx) for e in range(gu.shape[0])
                   if (idx := (top == e).any(-1).nonzero().squeeze(1)).numel()]

    return _ExpertStack(sub, ("gate_up_proj", "down_proj"), bool(getattr(sub, "is_transposed", False)), act, routes)


def _expert_stacks(module: nn.Module, prefix: str, n: int, m: int, filter_fn, report: PruneReport,
                   exclude: set[int] = frozenset()) -> dict[str, _ExpertStack]:
    out = {}
    for name, sub in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if id(sub) in exclude:
            continue
        st = _expert_stack(sub)
        if st is None:
            continue
        if isinstance(st, str):
            report.skipped[full] = st
        elif filter_fn is not None and not filter_fn(full, sub):
            report.skipped[full] = "excluded by filter_fn"
        elif any(st.in_features(part) % m for part in ("gate_up", "down")):
            report.skipped[full] = (f"expert in_features ({st.in_features('gate_up')}, {st.in_features('down')}) "
                                    f"not divisible by m={m}")
        else:
            out[full] = st
    return out


class _ExpertStats:
    """Per-expert input statistics of one matrix of a stack (experts that get rows only)."""

    def __init__(self, stack: _ExpertStack, part: str, method: str):
        self.stack, self.part, self.method = stack, part, method
        self.rows: dict[int, int] = {}
        self.acc: dict[int, torch.Tensor] = {}

    def __call__(self, module, args, kwargs):
        x, groups = self.stack.routes(args, kwargs)
        x = x.detach().reshape(-1, x.shape[-1])
        for e, idx in groups:
            xe = x.index_select(0, idx.to(x.device)).to(torch.float32).cpu()
            if self.part == "down":  # what this expert's down matrix receives, with gate_up as it is now
                xe = self.stack.act(xe @ self.stack.weight("gate_up", e).to(torch.float32).cpu().T)
            if not torch.isfinite(xe).all():
                raise ValueError("calibration activations contain NaN/Inf: check the model and the calibration data")
            v = (xe.to(torch.float64) ** 2).sum(0) if self.method == "wanda" else (xe.T @ xe).to(torch.float64)
            self.acc[e] = self.acc[e] + v if e in self.acc else v
            self.rows[e] = self.rows.get(e, 0) + xe.shape[0]


def _prune_experts(name: str, stack: _ExpertStack, part: str, stats: _ExpertStats | None, method: str,
                   n: int, m: int, report: PruneReport, backup: dict | None) -> None:
    if stats is not None and not stats.rows:  # the forward never called these experts
        report.skipped[name] = _OFF_PATH
        return
    param = stack.param(part)
    if backup is not None:
        backup.setdefault(param, param.detach().clone())
    label = f"{name}.{stack.params[0 if part == 'gate_up' else 1]}"
    for e in range(stack.num_experts):
        w = stack.weight(part, e)
        rows = 0 if stats is None else stats.rows.get(e, 0)
        if method != "magnitude" and rows == 0:
            report.magnitude_fallback.append(f"{label}[{e}]")
            new = _pruned(w, "magnitude", None, None, 0, n, m)
        else:
            acc = None if stats is None else stats.acc[e]
            new = _pruned(w, method, acc, acc, rows, n, m)
        with torch.no_grad():
            w.copy_(new)
    report.pruned.append(f"{label} ({stack.num_experts} experts)")


@torch.no_grad()
def prune_(model: nn.Module, method: str = "magnitude", n: int = 2, m: int = 4,
           calibration: Iterable | None = None,
           filter_fn: Callable[[str, nn.Module], bool] | None = skip_head_and_routers,
           progress: bool = True) -> PruneReport:
    """Prune every nn.Linear of ``model`` in place to N:M (zeros in the weight), and every stack of
    experts kept as 3-D weights (sparsewise's ``Experts``, transformers' Mixtral/Qwen2-MoE experts):
    each expert's matrices on their own, calibrated on the tokens the router sends to that expert
    (an expert no calibration token reaches is pruned by magnitude and listed in the report).

    ``calibration``: an iterable of model inputs (a LongTensor (1, T) of token ids for a causal
    LM; a tensor, tuple or dict of whatever ``model`` takes otherwise); needed by "wanda" and
    "sparsegpt". ``filter_fn(name, module)`` returns False for layers to keep dense (default:
    :func:`skip_head_and_routers`: the LM head and MoE routing gates stay dense; pass ``None`` to
    prune every Linear).

    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> print(prune_(model, "magnitude", progress=False))
    magnitude 2:4: pruned 2 layer(s), skipped 0
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n, m = check_nm(n, m)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    report = PruneReport(method, f"{n}:{m}")
    if method == "magnitude":
        layers = _linears(model, "", n, m, filter_fn, report)
        stacks = _expert_stacks(model, "", n, m, filter_fn, report)
        if not layers and not stacks:
            raise ValueError("the model has no prunable nn.Linear layer or expert stack" + _why(report))
        _prune_layers(layers, None, method, n, m, report)
        for name, st in stacks.items():
            for part in ("gate_up", "down"):
                _prune_experts(name, st, part, None, method, n, m, report, None)
        return report
    if calibration is None:
        raise ValueError(f"method {method!r} needs calibration data (an iterable of model inputs)")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty")
    modes = {mod: mod.training for mod in model.modules()}
    backup: dict[torch.Tensor, torch.Tensor] = {}
    model.eval()
    try:
        _check_calibration(model, batches)  # bad data is refused before any weight changes
        found = _find_blocks(model, batches[0])
        whole = [_as_call(b) for b in batches]
        if found is None:  # no layer stack: the whole model is one block
            _prune_block(model, "", whole, method, n, m, filter_fn, report, backup)
        else:
            _prune_stack(model, found, batches, method, n, m, filter_fn, report, progress, backup)
            # layers outside the stack (embeddings' heads, routers...) are pruned as one last block
            _prune_block(model, "", whole, method, n, m, filter_fn, report, backup,
                         exclude={id(x) for x in found[1].modules()})
    except BaseException:
        with torch.no_grad():  # a failure part-way loses nothing: put every weight back
            for param, w in backup.items():
                param.copy_(w)
        raise
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    if not report.pruned:
        raise ValueError("the model has no prunable nn.Linear layer or expert stack" + _why(report))
    return report


def _as_call(batch) -> tuple[tuple, dict]:
    """A calibration batch as the (args, kwargs) of a model call (see :func:`_call`)."""
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _check_calibration(model: nn.Module, batches: list) -> None:
    def check(module, args):
        x = args[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError("calibration activations contain NaN/Inf: check the model and the calibration data")

    handles = [mod.register_forward_pre_hook(check) for mod in model.modules() if isinstance(mod, nn.Linear)]
    try:
        for batch in batches:
            _call(model, batch)
    finally:
        for h in handles:
            h.remove()


def _why(report: PruneReport) -> str:
    return (": " + "; ".join(f"{k}: {v}" for k, v in report.skipped.items())) if report.skipped else ""


def _run(model: nn.Module, batches: list) -> None:
    """Feed every calibration batch through the model; a hook may end a pass early with _Stop."""
    for batch in batches:
        try:
            _call(model, batch)
        except _Stop:
            pass


def _gather(layers: dict[str, nn.Linear], method: str, run: Callable[[], Any]) -> dict[str, _Stats]:
    """Statistics of each layer's inputs while ``run()`` executes."""
    memo: dict = {}
    stats = {name: _Stats(lin, method, memo) for name, lin in layers.items()}
    handles = [lin.register_forward_pre_hook(stats[name]) for name, lin in layers.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        memo.clear()
    return stats


def _stages(block: nn.Module, layers: dict[str, nn.Linear], sample: tuple,
            stacks: dict[str, _ExpertStack] | None = None) -> tuple[list[list], bool]:
    """The block's layers in the order one forward calls them, grouped: consecutive layers fed
    the same tensor form one stage; an expert stack gives two stages, ``[(name, "gate_up")]`` then
    ``[(name, "down")]``. Layers and stacks the forward never calls come last (they get no
    statistics and are reported as skipped). Also says whether every layer ran once."""
    stacks = stacks or {}
    order: list[tuple[str, Any]] = []
    handles = [lin.register_forward_pre_hook(lambda mod, args, k=k: order.append((k, args[0])))
               for k, lin in layers.items()]
    handles += [st.module.register_forward_pre_hook(lambda mod, args, k=k: order.append((k, None)))
                for k, st in stacks.items()]
    try:
        args, kwargs = sample
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list] = []
    seen: set[str] = set()
    last = None
    for k, x in order:
        if k in seen:
            continue
        seen.add(k)
        if k in stacks:
            groups += [[(k, "gate_up")], [(k, "down")]]
            x = None
        elif groups and x is last and isinstance(groups[-1][0], str):
            groups[-1].append(k)
        else:
            groups.append([k])
        last = x
    rest = [k for k in layers if k not in seen]
    if rest:
        groups.append(rest)
    missed = [k for k in stacks if k not in seen]
    for k in missed:  # no statistics: reported as skipped
        groups += [[(k, "gate_up")], [(k, "down")]]
    return groups, len(order) == len(seen) and not rest and not missed


def _run_block(block: nn.Module, captured: list, stop_after: nn.Module | None) -> None:
    """Run the block on every captured input; with ``stop_after``, end each pass once that
    layer has run (the rest of the block cannot change its statistics)."""
    def stop(module, args, out):
        raise _Stop

    h = stop_after.register_forward_hook(stop) if stop_after is not None else None
    try:
        for args, kwargs in captured:
            try:
                block(*args, **kwargs)
            except _Stop:
                pass
    finally:
        if h is not None:
            h.remove()


def _prune_block(block: nn.Module, prefix: str, captured: list, method: str, n: int, m: int, filter_fn,
                 report: PruneReport, backup: dict, exclude: set[int] = frozenset()) -> None:
    """Prune the Linears and expert stacks of ``block`` (not those in ``exclude``), calibrated on
    the block's ``captured`` (args, kwargs) calls, stage by stage: each stage (layers fed the same
    tensor, e.g. q/k/v, then o, then gate/up, then down; an expert stack's gate_up, then its down)
    is calibrated with the stages before it already pruned; a pass stops right after the stage's
    last layer has run."""
    layers = {k: v for k, v in _linears(block, prefix, n, m, filter_fn, report).items() if id(v) not in exclude}
    stacks = _expert_stacks(block, prefix, n, m, filter_fn, report, exclude)
    if not layers and not stacks:
        return
    groups, once = _stages(block, layers, captured[0], stacks)
    for group in groups:
        if isinstance(group[0], tuple):
            name, part = group[0]
            st = stacks[name]
            stats = _ExpertStats(st, part, method)
            h = st.module.register_forward_pre_hook(stats, with_kwargs=True)
            try:
                _run_block(block, captured, st.module if once else None)
            finally:
                h.remove()
            _prune_experts(name, st, part, stats, method, n, m, report, backup)
        else:
            sub = {k: layers[k] for k in group}
            stats = _gather(sub, method, lambda: _run_block(block, captured, sub[group[-1]] if once else None))
            _prune_layers(sub, stats, method, n, m, report, backup)


def _prune_stack(model, found, batches, method, n, m, filter_fn, report, progress, backup):
    from tqdm.auto import tqdm

    name, stack = found
    # 1. capture what the first block receives (positional and keyword arguments) per batch
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        # replays must not append to a KV cache created by the model's own forward
        kwargs = dict(kwargs)
        for key, value in kwargs.items():
            # the cache's keyword changed across transformers versions (past_key_value(s),
            # layer_past; `cache` in 5.x): drop any of them and any Cache object
            if key in ("past_key_value", "past_key_values", "layer_past", "cache") or type(value).__name__.endswith("Cache"):
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((args, kwargs))
        raise _Stop

    h = stack[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _run(model, batches)
    finally:
        h.remove()
    if len(captured) != len(batches):
        raise ValueError(f"the layer stack '{name}' was not reached by every calibration batch")
    # linears outside the stack are pruned after it (see prune_): ones that run before the stack
    # are still dense while the stack is calibrated
    # 2. block by block: gather statistics on the current inputs, prune, then replay the pruned
    #    block to produce the inputs of the next one
    for i, block in enumerate(tqdm(stack, desc=f"{report.method} {report.pattern}", unit="block", disable=not progress)):
        _prune_block(block, f"{name}.{i}", captured, method, n, m, filter_fn, report, backup)
        nxt = []
        for args, kwargs in captured:
            out = block(*args, **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            where, _ = _hidden(args, kwargs)
            if where == 0:
                nxt.append(((out,) + tuple(args[1:]), kwargs))
            else:  # the hidden states were passed by keyword
                nxt.append((args, {**kwargs, where: out}))
        captured = nxt
