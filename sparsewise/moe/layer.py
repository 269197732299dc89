"""``MoE``: router + experts (+ shared experts) as one module, and conversion from transformers.

Legend: T = tokens, D = d_model, H = d_ff, E = experts, k = experts per token.

>>> moe = MoE(64, 128, num_experts=8, top_k=2)
>>> y = moe(torch.randn(2, 5, 64)); y.shape
torch.Size([2, 5, 64])
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn

from .experts import NM_GEMM_MIN_ROWS, Experts, uniform_plan
from .kernels import ACTIVATIONS, _compiled_block, _weight_array, variant_input
from .routing import _NO_BIAS, Router, RouterConfig, RoutingPlan

__all__ = ["MoEConfig", "MoE", "hf_available"]

_WEIGHTS = ("dense", "2:4")

# The one-call decode (MoE._fused_decode) is tried up to this many tokens (its router is a serial
# matvec) and where the routed rows per expert can stay within the experts' streaming kernels
# (Experts.fused_args); it gives up after routing, before any expert math, when an expert got more
# rows. Shared experts see every token: 2:4 bf16 ones stay in it up to NM_GEMM_MIN_ROWS - 1 rows,
# past the "dprows" crossover of one expert alone (NM_ROWS_MIN_ROWS: the step path's extra calls
# cost more). Paired on the DeepSeek shape, bf16 2:4, the one call against the step path: 1.13-1.23x
# at 16 tokens, 1.14-1.16x at 24, 1.08-1.09x at 32, 1.07x at 48 and 64, 1.04-1.05x at 96.
FUSED_MAX_TOKENS = 96


@dataclass(frozen=True)
class MoEConfig:
    """Shape and mode of a MoE block; validated on construction (errors name the field)."""

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    activation: str = "swiglu"
    capacity_factor: float | None = None   # None: dropless; else Switch/GShard capacity with dropping
    expert_weights: str = "dense"          # "dense" | "2:4"
    shared_experts: int = 0                # always-on experts of width d_ff each (DeepSeek, Qwen2-MoE)
    shared_d_ff: int | None = None         # total width of the shared experts (default shared_experts * d_ff)
    shared_expert_gate: bool = False       # Qwen2-MoE: sigmoid(x @ g) scales the shared output

    def __post_init__(self):
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if not isinstance(cf, (int, float)) or isinstance(cf, bool) or not cf > 0 or cf != cf or cf == float("inf"):
                raise ValueError(f"capacity_factor must be a finite number > 0 or None, got {cf!r}")
        if self.expert_weights not in _WEIGHTS:
            raise ValueError(f"expert_weights must be one of {_WEIGHTS}, got {self.expert_weights!r}")
        if not isinstance(self.shared_experts, int) or isinstance(self.shared_experts, bool) or self.shared_experts < 0:
            raise ValueError(f"shared_experts must be an integer >= 0, got {self.shared_experts!r}")
        if self.shared_d_ff is not None and (not isinstance(self.shared_d_ff, int) or self.shared_d_ff < 1):
            raise ValueError(f"shared_d_ff must be a positive integer or None, got {self.shared_d_ff!r}")
        if self.shared_expert_gate and not self.shared_experts:
            raise ValueError("shared_expert_gate needs shared_experts >= 1")

    @property
    def shared_width(self) -> int:
        return self.shared_d_ff if self.shared_d_ff is not None else self.shared_experts * self.d_ff


class MoE(nn.Module):
    """Mixture-of-Experts feed-forward block: ``y = sum_j w_j expert_{e_j}(x) [+ shared(x)]``.

    ``router``: a :class:`RouterConfig` (its num_experts/top_k must match), a :class:`Router`,
    or None (softmax top-k, Mixtral). Training: gradients reach the router (through the routing
    weights and the aux losses) and the experts; add :meth:`aux_loss` to the training loss.
    After a forward, ``last_plan`` holds the routing (counts, dropped fraction in capacity mode).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, router=None, *,
                 capacity_factor: float | None = None, expert_weights: str = "dense", shared_experts: int = 0,
                 activation: str = "swiglu", shared_d_ff: int | None = None, shared_expert_gate: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = MoEConfig(d_model, d_ff, num_experts, top_k, activation, capacity_factor, expert_weights,
                                shared_experts, shared_d_ff, shared_expert_gate)
        if router is None:
            router = RouterConfig(num_experts, top_k)
        if isinstance(router, RouterConfig):
            if (router.num_experts, router.top_k) != (num_experts, top_k):
                raise ValueError(f"router config has num_experts={router.num_experts}, top_k={router.top_k}; "
                                 f"the MoE has num_experts={num_experts}, top_k={top_k}")
            router = Router(d_model, router, dtype=dtype)
        if not isinstance(router, Router):
            raise TypeError(f"router must be a RouterConfig, a Router or None, got {type(router).__name__}")
        if router.d_model != d_model or router.config.num_experts != num_experts or router.config.top_k != top_k:
            raise ValueError("router shape (d_model, num_experts, top_k) does not match the MoE")
        self.router = router
        self.experts = Experts(num_experts, d_model, d_ff, activation, dtype=dtype)
        self.shared = Experts(1, d_model, self.config.shared_width, activation, dtype=dtype) \
            if shared_experts else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False, dtype=dtype) if shared_expert_gate else None
        self.last_plan: RoutingPlan | None = None
        if expert_weights == "2:4":
            self.sparsify_()

    @torch.no_grad()
    def sparsify_(self, n: int = 2, m: int = 4) -> "MoE":
        """Pack routed and shared experts N:M (magnitude; already-pruned weights kept exactly)."""
        self.experts.sparsify_(n, m)
        if self.shared is not None:
            self.shared.sparsify_(n, m)
        if (n, m) == (2, 4):
            self.config = replace(self.config, expert_weights="2:4")
        return self

    def set_prepack(self, enabled: bool = True) -> "MoE":
        """Inference GEMMs (prefill) on oneDNN-prepacked copies of the dense expert weights:
        faster prefill for a second copy of the weights in memory (see Experts.set_prepack)."""
        for ex in (self.experts, self.shared):
            if ex is not None and ex.packed is None:
                ex.set_prepack(enabled)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor")
        if x.dim() < 1 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"x must end in d_model={self.config.d_model} features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.config.d_model)
        y = self._fused_decode(x2)
        if y is not None:
            return y.reshape(*lead, self.config.d_model)
        plan = self.router(x2, self.config.capacity_factor)
        self.last_plan = plan
        y = self.experts(x2, plan)
        if self.shared is not None:
            s = self.shared(x2, uniform_plan(x2.shape[0], x2.device))
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x2)) * s
            y = y + s
        return y.reshape(*lead, self.config.d_model)

    def _fused_decode(self, x2: torch.Tensor) -> torch.Tensor | None:
        """Inference with few tokens on CPU: router matmul, routing, routed and shared experts and
        the shared gate in one compiled call (kernels._compiled_block); None where it does not apply
        (autograd, forward hooks on a submodule, capacity mode, aux losses, expert groups beyond
        the streaming kernels' rows: see FUSED_MAX_TOKENS). Same arithmetic as the
        step-by-step path up to rounding: bf16 blocks round the router and gate logits to bf16
        as a bf16 model computes them, and the output once at the end."""
        cfg, router = self.config, self.router
        rc = router.config
        t = x2.shape[0]
        if (not t or cfg.capacity_factor is not None or x2.device.type != "cpu" or x2.dtype != self.experts.dtype
                or rc.aux_loss_coef or rc.z_loss_coef):
            return None
        if torch.is_grad_enabled() and (x2.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        if _hooked(self.router, self.experts, self.shared, self.shared_gate):  # e.g. pruning's calibration
            return None
        routed = self.experts.fused_args()
        shared = self.shared.fused_args() if self.shared is not None else None
        if routed is None or (self.shared is not None and shared is None) or t > FUSED_MAX_TOKENS:
            return None
        rv, rargs, most = routed
        if -(-t * rc.top_k // rc.num_experts) > most:  # some expert is sure to get more rows
            return None
        sv, sargs = None, rargs
        if shared is not None:
            sv, sargs, shared_most = shared
            if t > (NM_GEMM_MIN_ROWS - 1 if sv == ("nm", "dp") else shared_most):
                return None
        xf = x2.to(torch.float32).contiguous().numpy()
        xr = variant_input(x2, rv)
        xs = variant_input(x2, sv) if sv is not None else xr
        rw, gw = self._fused_small(x2.dtype)
        bias = router.expert_bias if router.expert_bias is not None else _NO_BIAS
        status, out, w, ids, slot, counts, offsets, tok = _compiled_block(rv, sv)(
            xf, rw, x2.dtype == torch.bfloat16, bias.detach().numpy(), rc.scoring == "sigmoid", rc.n_group,
            rc.topk_group, rc.top_k, rc.norm_topk_prob, float(rc.routed_scaling_factor), most, xr, rargs,
            sv is not None, xs, sargs, gw)
        if status == 0:
            raise ValueError("router logits contain NaN or Inf (check the input and the router weight)")
        if status == 2:  # an expert got more rows than the one-call kernels take: the step path
            return None
        counts = torch.from_numpy(counts)
        if router.training and router.expert_bias is not None:
            router._last_counts = counts
        self.last_plan = RoutingPlan(t, rc.num_experts, rc.top_k, torch.from_numpy(ids), torch.from_numpy(w),
                                     torch.from_numpy(tok), torch.from_numpy(slot), counts, torch.from_numpy(offsets),
                                     counts.tolist())
        return torch.from_numpy(out).to(x2.dtype)

    def _fused_small(self, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
        # router and shared-gate weights as the block reads them: views (fp32, or bf16 bits) of
        # weights already in ``dtype``, cached by address; others rounded to ``dtype`` per call
        ws = (self.router.weight,) + ((self.shared_gate.weight,) if self.shared_gate is not None else ())
        key = (dtype,) + tuple((w.data_ptr(), w.dtype, w.shape) for w in ws)
        cached = self.__dict__.get("_fused_small_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        arrays = tuple(_weight_array(w.detach().to(dtype).contiguous()) for w in ws)
        out = (arrays[0], arrays[1] if len(arrays) > 1 else _NO_GATE)
        if all(w.dtype == dtype and w.is_contiguous() for w in ws):
            self.__dict__["_fused_small_cache"] = (key, out)
        return out

    def aux_loss(self) -> torch.Tensor:
        """Balancing loss + z-loss of the last forward (zero when neither is configured)."""
        if self.last_plan is None:
            raise ValueError("no forward has run yet")
        total = torch.zeros((), dtype=torch.float32, device=self.last_plan.weights.device)
        for part in (self.last_plan.aux_loss, self.last_plan.z_loss):
            if part is not None:
                total = total + part
        return total

    # ------------------------------------------------------------ transformers
    @classmethod
    def from_hf(cls, block: nn.Module, expert_weights: str = "dense") -> "MoE":
        """Convert transformers' ``MixtralSparseMoeBlock`` or ``Qwen2MoeSparseMoeBlock``.

        Handles the experts as stacked 3-D parameters (``gate_up_proj`` (E, 2H, D), ``down_proj``
        (E, D, H): transformers >= 5) and as a ModuleList of per-expert MLPs (``w1/w3/w2`` or
        ``gate_proj/up_proj/down_proj``: older versions). Same routing (softmax top-k, Mixtral
        renormalises, Qwen2-MoE per ``norm_topk_prob``), same shared expert and gate. With
        ``expert_weights="2:4"`` the expert weights are packed 2:4 by magnitude (already-pruned
        weights are kept exactly).

        >>> moe = MoE.from_hf(model.model.layers[0].mlp)                 # doctest: +SKIP
        """
        if expert_weights not in _WEIGHTS:
            raise ValueError(f"expert_weights must be one of {_WEIGHTS}, got {expert_weights!r}")
        kind = type(block).__name__
        if kind not in ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock"):
            raise TypeError(f"from_hf converts MixtralSparseMoeBlock or Qwen2MoeSparseMoeBlock, got {kind}")
        gate = block.gate
        gate_w = gate.weight
        e, d = gate_w.shape
        top_k = int(getattr(gate, "top_k", None) or getattr(block, "top_k"))
        norm = bool(getattr(gate, "norm_topk_prob", getattr(block, "norm_topk_prob", kind == "MixtralSparseMoeBlock")))
        if kind == "MixtralSparseMoeBlock":
            norm = True
        gate_up, down = _hf_expert_weights(block.experts, e)
        act = _hf_activation(block.experts)
        h = down.shape[2]
        kwargs = {}
        if kind == "Qwen2MoeSparseMoeBlock":
            sh = block.shared_expert
            kwargs = dict(shared_experts=1, shared_d_ff=sh.gate_proj.weight.shape[0], shared_expert_gate=True)
        moe = cls(d, h, e, top_k, RouterConfig(e, top_k, norm_topk_prob=norm), activation=act,
                  dtype=gate_up.dtype, **kwargs)
        with torch.no_grad():
            moe.router.weight.copy_(gate_w)
            moe.experts.gate_up.copy_(gate_up)
            moe.experts.down.copy_(down)
            if kind == "Qwen2MoeSparseMoeBlock":
                sh = block.shared_expert
                moe.shared.gate_up.copy_(torch.cat([sh.gate_proj.weight, sh.up_proj.weight])[None])
                moe.shared.down.copy_(sh.down_proj.weight[None])
                moe.shared_gate.weight.copy_(block.shared_expert_gate.weight)
        if expert_weights == "2:4":
            moe.sparsify_()
        return moe


def _hf_activation(experts: nn.Module) -> str:
    act = getattr(experts, "act_fn", None)
    if act is None and isinstance(experts, nn.ModuleList) and len(experts):
        act = getattr(experts[0], "act_fn", None)
    name = type(act).__name__.lower()
    if "silu" in name or "swish" in name:
        return "swiglu"
    if "gelu" in name:
        return "geglu"
    raise NotImplementedError(f"expert activation {type(act).__name__} is not supported (SiLU or GELU gates are)")


def _hf_expert_weights(experts: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
        gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if getattr(experts, "is_transposed", False):
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        if getattr(experts, "is_concatenated", True) is False:  # interleaved gate0, up0, gate1, ...
            gu = torch.cat([gu[:, 0::2], gu[:, 1::2]], dim=1)
        if getattr(experts, "has_bias", False):
            raise NotImplementedError("experts with biases are not supported")
        return gu.contiguous(), dn.contiguous()
    if isinstance(experts, nn.ModuleList) and len(experts) == e:
        first = experts[0]
        names = ("w1", "w3", "w2") if hasattr(first, "w1") else ("gate_proj", "up_proj", "down_proj")
        g = torch.stack([getattr(m, names[0]).weight.detach() for m in experts])
        u = torch.stack([getattr(m, names[1]).weight.detach() for m in experts])
        dn = torch.stack([getattr(m, names[2]).weight.detach() for m in experts])
        return torch.cat([g, u], dim=1).contiguous(), dn.contiguous()
    raise NotImplementedError(f"cannot read expert weights from {type(experts).__name__}")


def hf_available() -> bool:
    """True when transformers is installed (``pip install 'sparsewise[hf]'``)."""
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


_NO_GATE = np.zeros((0, 1), dtype=np.float32)


def _hooked(*modules) -> bool:
    # True when a forward hook would see the submodules' calls (the one-call decode makes none)
    from torch.nn.modules import module as M

    if M._global_forward_hooks or M._global_forward_pre_hooks:
        return True
    return any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)
