"""Routing: which experts each token goes to, computed once and handed to the experts.

Legend: T = tokens, D = d_model, E = experts, k = experts per token, N = routed assignments
kept (T*k without capacity dropping), C = per-expert capacity.

- softmax top-k (Mixtral, Qwen2-MoE): p = softmax(logits); pick the k largest; weights = the
  picked p, renormalised to sum 1 when ``norm_topk_prob``.
- sigmoid top-k with a per-expert bias (DeepSeek-V3, aux-loss-free balancing): s = sigmoid(logits);
  pick the k largest of s + bias (the bias only steers selection); weights = the picked s,
  renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``. After each training step
  :meth:`Router.update_bias` moves the bias of overloaded experts down and of idle experts up.
- group-limited top-k (``n_group`` groups of E/n_group experts, DeepSeek-V3): a group scores the
  sum of its 2 best selection scores (its best one when groups hold one expert); only the
  ``topk_group`` best groups may be picked from.

Losses (on the plan, added by the caller to its training loss):
- Switch load balancing ``alpha * E * sum_i f_i * P_i``: f_i = fraction of the T*k assignments
  routed to expert i (before capacity dropping), P_i = mean over tokens of the router
  probability of i (softmax; for sigmoid scores the scores normalised per token). Perfect
  balance gives ``alpha``.
- router z-loss ``beta * mean_t logsumexp(logits_t)^2`` (ST-MoE).

Capacity mode (Switch / GShard): C = ceil(capacity_factor * T * k / E). Assignments claim
slots in priority order: every token's first choice in token order, then every second choice,
and so on; an assignment that finds its expert full is dropped (its token gets nothing from
that expert; weights are not renormalised, the residual carries the token).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RouterConfig", "Router", "RoutingPlan", "build_plan", "load_balancing_loss", "router_z_loss",
           "capacity_keep_mask", "expert_capacity"]


def _check_int(name: str, value, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


@dataclass(frozen=True)
class RouterConfig:
    """How tokens pick experts. Validated on construction; errors name the field.

    >>> mixtral = RouterConfig(num_experts=8, top_k=2)
    >>> deepseek = RouterConfig(64, 6, scoring="sigmoid", expert_bias=True, n_group=8, topk_group=4)
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"            # "softmax" | "sigmoid"
    norm_topk_prob: bool = True         # renormalise the k picked weights to sum 1
    expert_bias: bool = False           # DeepSeek-V3 aux-loss-free balancing bias (selection only)
    bias_update_rate: float = 1e-3      # gamma of the bias update
    n_group: int = 1                    # group-limited routing: number of expert groups
    topk_group: int = 1                 # groups a token may pick from (ignored when n_group == 1)
    routed_scaling_factor: float = 1.0
    aux_loss_coef: float = 0.0          # alpha of the Switch balancing loss (0: not computed)
    z_loss_coef: float = 0.0            # beta of the router z-loss (0: not computed)

    def __post_init__(self):
        _check_int("num_experts", self.num_experts, 1)
        _check_int("top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {self.scoring!r}")
        _check_int("n_group", self.n_group, 1)
        _check_int("topk_group", self.topk_group, 1)
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group ({self.n_group}) must divide num_experts ({self.num_experts})")
        if self.n_group > 1:
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
            if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
                raise ValueError(f"topk_group ({self.topk_group}) groups of {self.num_experts // self.n_group} "
                                 f"experts hold fewer than top_k ({self.top_k}) experts")
        for name in ("bias_update_rate", "routed_scaling_factor", "aux_loss_coef", "z_loss_coef"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


@dataclass
class RoutingPlan:
    """Where every token goes, sorted by expert. Built once per forward, read by the experts.

    ``expert_ids`` (T, k) int64 and ``weights`` (T, k) float32 (differentiable) per token;
    ``token_index`` (N,) the token of each kept assignment in expert order and ``slot`` (N,) its
    flat position t*k + j; ``counts`` (E,) kept assignments per expert, ``offsets`` (E+1,)
    their prefix sums (expert e owns rows offsets[e]:offsets[e+1]); ``counts_list`` the same
    counts as Python ints (one sync, reused by every kernel launch).
    """

    num_tokens: int
    num_experts: int
    top_k: int
    expert_ids: torch.Tensor
    weights: torch.Tensor
    token_index: torch.Tensor
    slot: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    counts_list: list
    dropped: int = 0                   # assignments dropped by capacity (0 in dropless mode)
    capacity: int | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None

    @property
    def dropped_fraction(self) -> float:
        total = self.num_tokens * self.top_k
        return self.dropped / total if total else 0.0

    @property
    def sorted_weights(self) -> torch.Tensor:
        """(N,) the routing weight of each kept assignment, in expert order."""
        return self.weights.reshape(-1)[self.slot]

    def used_experts(self) -> list[int]:
        return [e for e, c in enumerate(self.counts_list) if c]


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """C = ceil(capacity_factor * T * k / E) (Switch / GShard)."""
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(T, k) bool: which assignments get a slot. Priority: choice rank first, then token order."""
    t, k = expert_ids.shape
    prio = expert_ids.T.reshape(-1)                               # (k*T,) rank-major order
    onehot = F.one_hot(prio, num_experts)                         # (k*T, E)
    position = (onehot.cumsum(0) * onehot).sum(1) - 1             # slot index within its expert
    return (position < capacity).reshape(k, t).T


@functools.lru_cache(maxsize=None)
def _counting_sort():
    import numba
    import numpy as np

    @numba.njit
    def sort(flat, num_experts):
        # flat (N,) expert ids -> (ok, slot (N,) flat positions in expert order, stable; counts (E,),
        # offsets (E+1,)); ok False (and nothing else meaningful) when an id is out of range
        n = flat.shape[0]
        counts = np.zeros(num_experts, np.int64)
        offsets = np.zeros(num_experts + 1, np.int64)
        slot = np.empty(n, np.int64)
        for i in range(n):
            e = flat[i]
            if e < 0 or e >= num_experts:
                return False, slot, counts, offsets
            counts[e] += 1
        for e in range(num_experts):
            offsets[e + 1] = offsets[e] + counts[e]
        fill = offsets[:-1].copy()
        for i in range(n):
            e = flat[i]
            slot[fill[e]] = i
            fill[e] += 1
        return True, slot, counts, offsets

    return sort


@functools.lru_cache(maxsize=None)
def _compiled_route():
    import math as m

    import numba
    import numpy as np

    sort = _counting_sort()

    @numba.njit
    def route(logits, bias, sigmoid, n_group, topk_group, k, norm, scale):
        # Router.scores + Router.select + build_plan for (T, E) float32 logits, without autograd:
        # returns (ok, weights (T, k) f32, ids (T, k), slot, counts, offsets); ok False when a
        # logit is NaN or Inf. Ties pick the lower expert index.
        t_, e_ = logits.shape
        weights = np.empty((t_, k), np.float32)
        ids = np.empty((t_, k), np.int64)
        for t in range(t_):
            for e in range(e_):
                if not m.isfinite(logits[t, e]):
                    z = np.empty(0, np.int64)
                    return False, weights, ids, z, z, z
        scores = np.empty(e_, np.float32)
        choice = np.empty(e_, np.float32)
        gsize = e_ // n_group
        best = np.empty(n_group, np.float32)
        keep = np.empty(n_group, np.bool_)
        for t in range(t_):
            if sigmoid:
                for e in range(e_):
                    scores[e] = np.float32(1.0) / (np.float32(1.0) + np.float32(m.exp(-logits[t, e])))
            else:
                mx = logits[t, 0]
                for e in range(1, e_):
                    mx = max(mx, logits[t, e])
                tot = np.float32(0.0)
                for e in range(e_):
                    scores[e] = np.float32(m.exp(logits[t, e] - mx))
                    tot += scores[e]
                for e in range(e_):
                    scores[e] = scores[e] / tot
            for e in range(e_):
                choice[e] = scores[e] + bias[e] if bias.shape[0] else scores[e]
            if n_group > 1:  # keep the topk_group groups with the largest sum of their top-2 choices
                for g in range(n_group):
                    a = -np.inf
                    b = -np.inf
                    for e in range(g * gsize, (g + 1) * gsize):
                        if choice[e] > a:
                            a, b = choice[e], a
                        elif choice[e] > b:
                            b = choice[e]
                    best[g] = a + b if gsize > 1 else a
                    keep[g] = False
                for _ in range(topk_group):
                    at = -1
                    for g in range(n_group):
                        if not keep[g] and (at < 0 or best[g] > best[at]):
                            at = g
                    keep[at] = True
                for e in range(e_):
                    if not keep[e // gsize]:
                        choice[e] = -np.inf
            wsum = np.float32(0.0)
            for j in range(k):  # top-k by repeated arg-max (E is small)
                at = -1
                for e in range(e_):
                    if (at < 0 or choice[e] > choice[at]) and not (j > 0 and _picked(ids, t, j, e)):
                        at = e
                ids[t, j] = at
                weights[t, j] = scores[at]
                wsum += scores[at]
            if norm:
                wsum = max(wsum, np.float32(1e-20))
                for j in range(k):
                    weights[t, j] = weights[t, j] / wsum
            if scale != 1.0:
                for j in range(k):
                    weights[t, j] = weights[t, j] * np.float32(scale)
        _, slot, counts, offsets = sort(ids.reshape(-1), e_)
        return True, weights, ids, slot, counts, offsets

    @numba.njit(inline="always")
    def _picked(ids, t, j, e):
        for q in range(j):
            if ids[t, q] == e:
                return True
        return False

    return route


def build_plan(expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
               capacity_factor: float | None = None) -> RoutingPlan:
    """Sort assignments by expert (stable: token order within an expert), optionally dropping
    what exceeds each expert's capacity. Used by :class:`Router`; callable with external routing
    (e.g. a transformers gate) to reuse the expert kernels."""
    if expert_ids.dim() != 2 or weights.shape != expert_ids.shape:
        raise ValueError(f"expert_ids and weights must both be (T, k), got {tuple(expert_ids.shape)} "
                         f"and {tuple(weights.shape)}")
    t, k = expert_ids.shape
    ids = expert_ids.to(torch.int64)
    if capacity_factor is None and ids.device.type == "cpu" and ids.numel():
        # one compiled counting sort (stable, as torch.sort(stable=True)) instead of ~10 torch ops:
        # at decode sizes those cost more than the routing itself
        ok, slot, counts, offsets = _counting_sort()(ids.reshape(-1).contiguous().numpy(), num_experts)
        if ok:
            slot, counts = torch.from_numpy(slot), torch.from_numpy(counts)
            return RoutingPlan(t, num_experts, k, ids, weights, slot // k, slot, counts, torch.from_numpy(offsets),
                               counts.tolist())
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got [{int(ids.min())}, {int(ids.max())}]")
    flat = ids.reshape(-1)
    capacity, dropped = None, 0
    if capacity_factor is not None:
        capacity = expert_capacity(capacity_factor, t, k, num_experts)
        keep = capacity_keep_mask(ids, num_experts, capacity).reshape(-1)
        dropped = int((~keep).sum())
        kept_slots = keep.nonzero().squeeze(1)
        slot = kept_slots[torch.sort(flat[kept_slots], stable=True).indices]
    else:
        slot = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat[slot], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return RoutingPlan(t, num_experts, k, ids, weights, slot // k, slot, counts, offsets, counts.tolist(),
                       dropped=dropped, capacity=capacity)


def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
                        alpha: float = 1.0) -> torch.Tensor:
    """Switch loss ``alpha * E * sum_i f_i * P_i``; probs (T, E) sum to 1 per token, expert_ids (T, k).

    >>> p = torch.tensor([[0.5, 0.5], [0.5, 0.5]]); ids = torch.tensor([[0], [1]])
    >>> float(load_balancing_loss(p, ids, 2))                      # perfect balance -> alpha
    1.0
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    f = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).to(probs.dtype) / expert_ids.numel()
    p = probs.mean(0)
    return alpha * num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``beta * mean_t logsumexp(logits_t)^2`` (keeps router logits small)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return beta * torch.logsumexp(logits.to(torch.float32), dim=-1).square().mean()


_NO_BIAS = torch.zeros(0, dtype=torch.float32)


class Router(nn.Module):
    """Linear router (E x D weight) producing a :class:`RoutingPlan`.

    >>> r = Router(16, RouterConfig(num_experts=4, top_k=2))
    >>> plan = r(torch.randn(5, 16)); plan.counts.sum().item()
    10
    """

    def __init__(self, d_model: int, config: RouterConfig, *, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(config, RouterConfig):
            raise TypeError(f"config must be a RouterConfig, got {type(config).__name__}")
        _check_int("d_model", d_model, 1)
        self.config = config
        self.d_model = d_model
        self.weight = nn.Parameter(torch.empty(config.num_experts, d_model, dtype=dtype))
        nn.init.normal_(self.weight, std=d_model ** -0.5)
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, E) float32 router scores: softmax probabilities or sigmoid scores."""
        z = logits.to(torch.float32)
        return torch.softmax(z, -1) if self.config.scoring == "softmax" else torch.sigmoid(z)

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (optionally group-limited) on scores (+ bias); returns (weights, expert_ids), (T, k)."""
        cfg = self.config
        choice = scores.detach()
        if self.expert_bias is not None:
            choice = choice + self.expert_bias
        if cfg.n_group > 1:
            t = choice.shape[0]
            grouped = choice.reshape(t, cfg.n_group, cfg.num_experts // cfg.n_group)  # (-1 fails at 0 tokens)
            best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)   # (T, G)
            keep = torch.zeros_like(best, dtype=torch.bool)
            keep.scatter_(1, best.topk(cfg.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        ids = choice.topk(cfg.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
        if cfg.routed_scaling_factor != 1.0:
            w = w * cfg.routed_scaling_factor
        return w, ids

    def forward(self, x: torch.Tensor, capacity_factor: float | None = None) -> RoutingPlan:
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"router input must be (tokens, d_model={self.d_model}), got {tuple(x.shape)}")
        logits = F.linear(x, self.weight.to(x.dtype))
        return self.plan_from_logits(logits, capacity_factor)

    def plan_from_logits(self, logits: torch.Tensor, capacity_factor: float | None = None) -> RoutingPlan:
        """Everything after the router matmul; (T, E) logits -> plan (with losses when configured)."""
        cfg = self.config
        if logits.dim() != 2 or logits.shape[1] != cfg.num_experts:
            raise ValueError(f"router logits must be (tokens, num_experts={cfg.num_experts}), got {tuple(logits.shape)}")
        if (capacity_factor is None and logits.device.type == "cpu" and cfg.aux_loss_coef == 0
                and cfg.z_loss_coef == 0 and not (torch.is_grad_enabled() and logits.requires_grad)):
            # inference: scores, selection and plan in one compiled call (each small torch op costs
            # tens of microseconds once the experts' weights have streamed through the caches)
            return self._plan_compiled(logits)
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("router logits contain NaN or Inf (check the input and the router weight)")
        scores = self.scores(logits)
        weights, ids = self.select(scores)
        plan = build_plan(ids, weights, cfg.num_experts, capacity_factor)
        if cfg.aux_loss_coef > 0:
            probs = scores if cfg.scoring == "softmax" else scores / scores.sum(-1, keepdim=True)
            plan.aux_loss = load_balancing_loss(probs, ids, cfg.num_experts, cfg.aux_loss_coef)
        if cfg.z_loss_coef > 0:
            plan.z_loss = router_z_loss(logits, cfg.z_loss_coef)
        if self.training and self.expert_bias is not None:
            self._last_counts = torch.bincount(ids.reshape(-1), minlength=cfg.num_experts)
        return plan

    def _plan_compiled(self, logits: torch.Tensor) -> RoutingPlan:
        cfg = self.config
        bias = self.expert_bias if self.expert_bias is not None else _NO_BIAS
        ok, w, ids, slot, counts, offsets = _compiled_route()(
            logits.detach().to(torch.float32).contiguous().numpy(), bias.detach().numpy(), cfg.scoring == "sigmoid",
            cfg.n_group, cfg.topk_group, cfg.top_k, cfg.norm_topk_prob, float(cfg.routed_scaling_factor))
        if not ok:
            raise ValueError("router logits contain NaN or Inf (check the input and the router weight)")
        ids, counts = torch.from_numpy(ids), torch.from_numpy(counts)
        if self.training and self.expert_bias is not None:
            self._last_counts = counts
        slot = torch.from_numpy(slot)
        return RoutingPlan(logits.shape[0], cfg.num_experts, cfg.top_k, ids, torch.from_numpy(w), slot // cfg.top_k,
                           slot, counts, torch.from_numpy(offsets), counts.tolist())

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None) -> None:
        """DeepSeek-V3 aux-loss-free step: bias_i += gamma * sign(mean load - load_i). Uses the
        counts of the last training forward when ``counts`` is None."""
        if self.expert_bias is None:
            raise ValueError("this router has no expert bias (RouterConfig(expert_bias=True) enables it)")
        if counts is None:
            counts = getattr(self, "_last_counts", None)
            if counts is None:
                raise ValueError("no routed batch yet: run a training forward first or pass counts")
        load = counts.to(torch.float32)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
