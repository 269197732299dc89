"""Experts as stacked weights, and the dropless grouped compute over a RoutingPlan.

Legend: T = tokens, D = d_model, H = d_ff, E = experts, R = 2H (gated) or H ("gelu"),
N = kept assignments (rows sorted by expert).

Weights: ``gate_up`` (E, R, D) with the gate rows first, then the up rows (transformers'
``gate_up_proj`` layout), ``down`` (E, D, H). With ``weights="2:4"`` each expert's two matrices
are :class:`sparsewise.nm.NMTensor` (kept values are parameters, so the experts train with the
mask fixed) and the products run in ``sparsewise.nm``'s kernels: dual-side sparsity, the
router picks the token rows, the packed format skips half the weight bytes.

Paths, chosen per call:
- inference on CPU, dense weights: experts with at most ``DECODE_ROWS`` rows (decode) go through
  the numba ``grouped_matvec``, which reads each used expert once for all its rows; experts with
  more rows take torch's GEMM (on oneDNN-prepacked weights after ``set_prepack()``).
- inference on CPU, 2:4 weights: the 2:4 kernels (fused with gather and SwiGLU when every expert
  stays in them); in bf16, experts with more rows run nm's batched "dprows" kernel one expert at
  a time (``NM_ROWS_MIN_ROWS``), and from ``NM_ROWS_GEMM_MIN_ROWS`` rows (``NM_GEMM_MIN_ROWS`` on
  CPUs without "dprows") are expanded to dense in a scratch matrix for torch's GEMM (prefill), so
  no dense copy is kept.
- otherwise: per used expert, one torch GEMM for gate+up (fused) and one for down on the
  gathered rows (autograd flows to x, the weights and the routing weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nm.functional import nm_linear
from ..nm.kernels import decompress_24, nm_matmul
from ..nm.tensor import NMTensor
from .kernels import (ACTIVATIONS, WIDE_FROM, _weight_array, activate, decode_swiglu, decode_swiglu_nm, dp_kernel_applies,
                      grouped_matvec, grouped_nm_matmul, rows_kind)
from .routing import RoutingPlan

__all__ = ["Experts", "DECODE_ROWS", "DECODE_ROWS_DP", "DECODE_ROWS_PREPACKED", "NM_GEMM_MIN_ROWS", "NM_ROWS_GEMM_MIN_ROWS",
           "NM_ROWS_MIN_ROWS", "uniform_plan"]

# rows per expert up to which the weight-streaming kernel beat torch's GEMM on the development
# machine, Mixtral-sized experts, interleaved pairs: fp32 vs F.linear 2.6x at 64 rows (MKL's fp32
# GEMM is slow on this AMD CPU; F.grouped_mm slower still); bf16 vs F.grouped_mm 1.07x at 4 rows,
# 0.67x at 8
DECODE_ROWS = {torch.float32: 64, torch.bfloat16: 4}
# bf16 where grouped_matvec runs both matrices through the vdpbf16ps kernel (dp_kernel_applies):
# since that kernel takes every token of an expert in one pass over its weight rows (up to 8, then
# passes of 8), it beats F.grouped_mm up to ~24 rows per expert. Whole block, interleaved, on a
# slow-memory afternoon, threshold 8 / 16 / 24 / 32: Mixtral-shaped 32 tokens 9.8 / 7.7 / 8.1 ms,
# 48 tokens 13.7 / 10.8 / 10.7 ms, 128 tokens - / 19.9 / 19.4 / 26.2 ms; DeepSeek-shaped
# 128 tokens - / 24.2 / 19.1 / 20.3 ms
DECODE_ROWS_DP = 24
# the same against oneDNN's GEMM on prepacked weights (set_prepack), which reads weights well even
# at a few rows: kernel 1.59x (fp32) / 1.13x (bf16) at 2 rows, 0.90x / 0.61x at 4
DECODE_ROWS_PREPACKED = {torch.float32: 2, torch.bfloat16: 2}

# Above this many rows per expert (mean over the experts taking a GEMM) bf16 inference calls
# F.linear per expert instead of one F.grouped_mm: measured (Zen 5, bf16 SwiGLU experts, gate_up
# + down) F.linear was 1.14-1.28x faster at 32-512 rows on the Mixtral shape (8 x 1024 x 2816) and
# 1.42x at 192 rows on the DeepSeek shape (64 x 1024 x 512); below that (Mixtral 8-16 rows,
# DeepSeek 16-32) the two were 0.94-1.01x.
GROUPED_MM_MAX_ROWS = 64

# 2:4 experts in bf16 ("dp" kernel): an expert with at least this many rows is expanded to dense
# (sparsewise.nm.kernels.decompress_24, into one scratch matrix per call: no dense copy is kept)
# and multiplied by torch's GEMM; fewer rows stay in the 2:4 kernel. Whole Experts call, every
# expert at the same row count, kernel vs expand + F.linear (Zen 5, 2 threads): Mixtral shape
# (8 x 1024 x 2816) 0.77x at 32 rows, 1.01x at 64, 1.08x at 96, 1.39x at 192; DeepSeek shape
# (64 x 1024 x 512) 0.96x / 1.04x / 1.19x at 48 / 64 / 96; one 1024 x 1024 expert (in cache)
# 0.84x at 64, 1.02x at 96, 1.32x at 256. fp32 stays in the kernel at every size (MKL's fp32 GEMM
# on the AMD hosts: expand + F.linear 0.52x at 128 rows, 0.73x at 512).
NM_GEMM_MIN_ROWS = 96

# Where the CPU runs nm's "dprows" kernel (bf16 2:4, AVX512_BF16; it takes 16 weight rows per
# register and reads each weight once for up to 8 token rows a pass), 2:4 bf16 experts with at
# least NM_ROWS_MIN_ROWS rows (first value: experts whose packed gate_up is >= 2 MB; second: smaller
# ones, where the per-call costs weigh more) leave the fused kernel for two "dprows" calls of their
# own, and from NM_ROWS_GEMM_MIN_ROWS rows are expanded for torch's GEMM (NM_GEMM_MIN_ROWS is then
# unused). Whole Experts call, every expert at R rows, 7 interleaved rounds (Zen 5, 2 threads):
# Mixtral shape (8 x 1024 x 2816), "dprows" vs the fused kernel 0.80x at 2-6 rows, 1.06x at 8,
# 1.24x at 12, 1.36x at 32, 1.42x at 128; vs expand + F.linear 1.44x at 128, 1.12x at 256 and 384,
# 0.78-0.94x at 512. DeepSeek shape (64 x 1024 x 512): vs the fused kernel 0.52-0.82x at 2-16
# rows, 0.99x at 32, 1.06x at 64, 1.37x at 128; vs expand 1.13-1.17x at 128-192, 1.02x at 256,
# 1.15-1.25x at 320-384, 0.92x at 512.
NM_ROWS_MIN_ROWS = (12, 48)
NM_ROWS_GEMM_MIN_ROWS = 448
_NM_ROWS_LARGE_BYTES = 2 << 20


def uniform_plan(num_tokens: int, device: torch.device | str | None = None) -> RoutingPlan:
    """Every token to expert 0 with weight 1 (how shared experts reuse the expert kernels)."""
    tokens = torch.arange(num_tokens, device=device)
    return RoutingPlan(num_tokens, 1, 1, torch.zeros(num_tokens, 1, dtype=torch.int64, device=device),
                       torch.ones(num_tokens, 1, device=device), tokens, tokens,
                       torch.tensor([num_tokens], device=device), torch.tensor([0, num_tokens], device=device),
                       [num_tokens])


def bf16_prepack_supported() -> bool:
    """True when torch's oneDNN can reorder bf16 linear weights on this CPU (set_prepack)."""
    from .._intrinsics import cpu_flags

    flags = cpu_flags()
    return {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags


class Experts(nn.Module):
    """``num_experts`` feed-forward experts (SwiGLU, GeGLU or GELU) with stacked weights.

    >>> ex = Experts(4, 16, 32)
    >>> from sparsewise.moe.routing import build_plan
    >>> plan = build_plan(torch.tensor([[0, 2], [2, 3]]), torch.full((2, 2), 0.5), 4)
    >>> ex(torch.randn(2, 16), plan).shape
    torch.Size([2, 16])
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu", *,
                 dtype: torch.dtype | None = None):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.d_model, self.d_ff, self.activation = num_experts, d_model, d_ff, activation
        rows = 2 * d_ff if activation != "gelu" else d_ff
        self.gate_up = nn.Parameter(torch.empty(num_experts, rows, d_model, dtype=dtype))
        self.down = nn.Parameter(torch.empty(num_experts, d_model, d_ff, dtype=dtype))
        nn.init.normal_(self.gate_up, std=d_model ** -0.5)
        nn.init.normal_(self.down, std=d_ff ** -0.5)
        self.packed: tuple[list[NMTensor], list[NMTensor]] | None = None
        self.prepack = False  # see set_prepack
        self._packed_gemm = None

    def set_prepack(self, enabled: bool = True) -> "Experts":
        """Keep oneDNN-blocked copies of the dense expert weights for inference GEMMs: experts with
        more than ``DECODE_ROWS_PREPACKED`` rows use them. Costs a second copy of the weights in
        memory; on the development machine 1.1-1.6x faster prefill than F.linear on the plain
        weights, and faster decode from 3-4 rows per expert. Dense experts, torch's mkldnn backend."""
        if enabled and not torch.backends.mkldnn.is_available():
            raise NotImplementedError("prepacked expert weights need torch's mkldnn (oneDNN) backend")
        if enabled and self.dtype == torch.bfloat16 and not bf16_prepack_supported():
            # torch's mkldnn_reorder_linear_weight raises on the first forward otherwise
            raise NotImplementedError("prepacked bf16 expert weights need a CPU with avx512bw + avx512vl + avx512dq "
                                      "or avx_ne_convert (oneDNN's bf16 path); this one has neither")
        self.prepack = bool(enabled)
        if not enabled:
            self._packed_gemm = None
        return self

    @property
    def weights_format(self) -> str:
        return "dense" if self.packed is None else f"{self.packed[0][0].n}:{self.packed[0][0].m}"

    @property
    def dtype(self) -> torch.dtype:
        return (self.gate_up if self.packed is None else self.gate_up_values).dtype

    # ------------------------------------------------------------ 2:4 packing
    @torch.no_grad()
    def sparsify_(self, n: int = 2, m: int = 4) -> "Experts":
        """Pack both matrices of every expert N:M (magnitude mask; an already N:M weight, e.g.
        from ``sparsewise.nm.prune_`` or a pruned checkpoint, is kept exactly). The dense
        parameters are replaced by the kept values (half the bytes for 2:4)."""
        if self.packed is not None:
            raise ValueError(f"experts are already packed ({self.weights_format})")
        for name, w in (("gate_up", self.gate_up), ("down", self.down)):
            if w.shape[-1] % m:
                raise ValueError(f"{name} has {w.shape[-1]} input features, not divisible by m={m}")
        gu = [NMTensor.from_dense(self.gate_up[e], n, m) for e in range(self.num_experts)]
        dn = [NMTensor.from_dense(self.down[e], n, m) for e in range(self.num_experts)]
        del self.gate_up, self.down
        self.gate_up_values = nn.Parameter(torch.stack([t.values for t in gu]))
        self.down_values = nn.Parameter(torch.stack([t.values for t in dn]))
        self.register_buffer("gate_up_indices", torch.stack([t.indices for t in gu]))
        self.register_buffer("down_indices", torch.stack([t.indices for t in dn]))
        self._nm = (n, m)
        self._relink()
        self.__dict__.pop("_fused_cache", None)  # holds views of the dense weights
        return self

    def _relink(self) -> None:
        # NMTensors whose values/indices are views of the parameters and buffers (no copies):
        # optimizer steps and load_state_dict stay visible to the kernels
        n, m = self._nm
        e_, r, _ = self.gate_up_values.shape
        gu = [NMTensor(self.gate_up_values.data[e], self.gate_up_indices[e], n, m, (r, self.d_model))
              for e in range(e_)]
        dn = [NMTensor(self.down_values.data[e], self.down_indices[e], n, m, (self.d_model, self.d_ff))
              for e in range(e_)]
        self.packed = (gu, dn)

    def _apply(self, fn, *args, **kwargs):  # .to(dtype) and friends: rebuild the packed views
        out = super()._apply(fn, *args, **kwargs)
        self.__dict__.pop("_fused_cache", None)
        if self.packed is not None:
            self._relink()
        return out

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) as dense tensors (pruned positions zero for packed experts)."""
        if self.packed is None:
            return self.gate_up, self.down
        return (torch.stack([t.to_dense() for t in self.packed[0]]),
                torch.stack([t.to_dense() for t in self.packed[1]]))

    def weight_bytes(self, experts: list[int] | None = None) -> int:
        """Bytes of the weights of ``experts`` (all by default) as stored."""
        ids = range(self.num_experts) if experts is None else experts
        if self.packed is None:
            per = (self.gate_up[0].numel() + self.down[0].numel()) * self.gate_up.element_size()
            return per * len(ids)
        return sum(self.packed[0][e].nbytes + self.packed[1][e].nbytes for e in ids)

    # ------------------------------------------------------------ compute
    def _check(self, x: torch.Tensor, plan: RoutingPlan) -> None:
        if not isinstance(plan, RoutingPlan):
            raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x must be (tokens, d_model={self.d_model}), got {tuple(x.shape)}")
        if plan.num_tokens != x.shape[0]:
            raise ValueError(f"plan routes {plan.num_tokens} tokens but x has {x.shape[0]}")
        if plan.num_experts != self.num_experts:
            raise ValueError(f"plan is for {plan.num_experts} experts, these experts number {self.num_experts}")
        if x.dtype != self.dtype:
            raise TypeError(f"x is {x.dtype} but the expert weights are {self.dtype}")

    def forward(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """(T, D) tokens and their plan -> (T, D): sum over each token's kept experts of
        weight * expert(x). Dropless unless the plan dropped assignments (capacity mode)."""
        self._check(x, plan)
        if not plan.token_index.numel():
            return torch.zeros_like(x) + 0.0 * plan.weights.sum().to(x.dtype)  # keep the graph for empty routes
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not grad and x.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16):
            kernel = self._nm_kernel() if self.packed is not None else None
            if self.packed is None or kernel is not None:
                return self._infer(x, plan, kernel).to(x.dtype)
        # training (autograd through torch's GEMMs), other devices and dtypes, patterns without
        # a compiled kernel: per used expert, one product for gate+up (fused) and one for down
        xs = x.index_select(0, plan.token_index)
        off = plan.offsets.tolist()
        outs = []
        for e in plan.used_experts():
            xe = xs[off[e]:off[e + 1]]
            if self.packed is None:
                h = F.linear(xe, self.gate_up[e])
                outs.append(F.linear(activate(h, self.activation), self.down[e]))
            elif grad:
                gu, dn = self.packed
                h = nm_linear(xe, gu[e], values=self.gate_up_values[e])
                outs.append(nm_linear(activate(h, self.activation), dn[e], values=self.down_values[e]))
            else:
                gu, dn = self.packed
                outs.append(nm_linear(activate(nm_linear(xe, gu[e]), self.activation), dn[e]))
        y = torch.cat(outs) if len(outs) > 1 else outs[0]
        y = y * plan.sorted_weights.unsqueeze(1).to(y.dtype)
        return torch.zeros_like(x).index_add(0, plan.token_index, y.to(x.dtype))

    def _decode_limit(self) -> int:
        # rows per expert up to which inference takes the weight-streaming kernels
        if not self.prepack and dp_kernel_applies(self.gate_up) and dp_kernel_applies(self.down):
            return DECODE_ROWS_DP
        return (DECODE_ROWS_PREPACKED if self.prepack else DECODE_ROWS)[self.gate_up.dtype]

    def _gemm_experts(self, plan: RoutingPlan, kernel: str | None) -> list[int]:
        # the used experts that leave the fused / grouped kernels in inference, one call each:
        # dense: more rows than the streaming kernels win at (torch's GEMM); 2:4 bf16: see
        # NM_ROWS_MIN_ROWS ("dprows", then expanded for torch's GEMM) and NM_GEMM_MIN_ROWS
        if self.packed is None:
            limit = self._decode_limit()
            return [e for e in plan.used_experts() if plan.counts_list[e] > limit]
        if kernel != "dp":
            return []
        limit = self._nm_rows_min() or NM_GEMM_MIN_ROWS
        return [e for e in plan.used_experts() if plan.counts_list[e] >= limit]

    def fused_args(self) -> tuple[tuple[str, str], tuple, int] | None:
        """For ``MoE``'s one-call decode: (kernel variant, weight arrays and sizes, most rows per
        expert) of the compiled kernel that runs these experts in inference where no expert has
        more than that many rows, or None where inference takes another path (other activations
        or dtypes). The arrays are views of the weights (in-place edits are seen), cached until a
        weight is replaced, re-packed or converted."""
        ts = (self.gate_up, self.down) if self.packed is None else \
            (self.gate_up_values, self.gate_up_indices, self.down_values, self.down_indices)
        key = (self.prepack, self.activation) + tuple((t.data_ptr(), t.dtype, t.shape) for t in ts)
        cached = self.__dict__.get("_fused_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_fused_cache"] = (key, self._fused_build())
        return cached[1]

    def _fused_build(self) -> tuple[tuple[str, str], tuple, int] | None:
        # (variant, args, most rows per expert the kernel takes in inference) or None
        if self.activation != "swiglu" or self.dtype not in (torch.float32, torch.bfloat16):
            return None
        if self.packed is None:
            kind = rows_kind(self.gate_up)
            if rows_kind(self.down) != kind:
                kind = "widen"
            return (("dense", kind), (_weight_array(self.gate_up.detach()), _weight_array(self.down.detach()),
                                      WIDE_FROM[self.gate_up.dtype]), self._decode_limit())
        kernel = self._nm_kernel()
        if kernel is None:
            return None
        from ..nm.kernels import _as_kernel_values

        most = (self._nm_rows_min() or NM_GEMM_MIN_ROWS) - 1 if kernel == "dp" else 1 << 62
        e_, r, _ = self.gate_up_values.shape
        return (("nm", kernel), (_as_kernel_values(self.gate_up_values.detach()), self.gate_up_indices.numpy().reshape(-1),
                                 _as_kernel_values(self.down_values.detach()), self.down_indices.numpy().reshape(-1),
                                 e_, r, self.d_model, self.d_ff), most)

    def _nm_rows_min(self) -> int | None:
        # rows from which a 2:4 bf16 expert runs "dprows" calls of its own (None: not on this CPU)
        from ..nm.kernels import available_kernels

        gu, dn = self.packed[0][0], self.packed[1][0]
        if "dprows" not in available_kernels(gu) or "dprows" not in available_kernels(dn):
            return None
        return NM_ROWS_MIN_ROWS[0 if gu.nbytes >= _NM_ROWS_LARGE_BYTES else 1]

    def _infer(self, x: torch.Tensor, plan: RoutingPlan, kernel: str | None) -> torch.Tensor:
        """Inference on CPU -> (T, D) float32: the experts with few rows in one compiled call
        (gather, gate+up, activation, down, weighted sum; 2:4 weights through ``kernel``), the
        others on torch's GEMM one expert at a time, each adding its weighted rows into the output.
        Every temporary is per expert: (T*k, D) buffers of all routed rows came from fresh pages on
        every call once they outgrew glibc's mmap threshold (measured, DeepSeek shape at 2048
        tokens: ~37k page faults and +40 ms a call, depending on the process's allocation history)."""
        big = self._gemm_experts(plan, kernel)
        small = [e for e in plan.used_experts() if e not in big]
        if not small:
            out = torch.zeros(x.shape, dtype=torch.float32)
        else:
            tok, wts, offs = plan.token_index, plan.sorted_weights, plan.offsets
            if big:  # the plan restricted to the small experts
                keep = torch.ones(self.num_experts, dtype=torch.bool)
                keep[big] = False
                rows = keep.repeat_interleave(plan.counts)
                tok, wts = tok[rows], wts[rows]
                offs = torch.cat([plan.offsets[:1], (plan.counts * keep).cumsum(0)])
            out = self._kernel_experts(x, tok, wts, offs, small, kernel)
        if not big:
            return out
        off = plan.offsets.tolist()
        sw = plan.sorted_weights
        if (self.packed is None and not self.prepack and self.gate_up.dtype == torch.bfloat16
                and hasattr(F, "grouped_mm") and self.d_model % 8 == 0 and self.d_ff % 8 == 0  # 16-byte strides
                and sum(plan.counts_list[e] for e in big) < GROUPED_MM_MAX_ROWS * len(big)):
            # bf16, plain weights, up to GROUPED_MM_MAX_ROWS rows an expert on average: one grouped
            # GEMM over the big experts' rows (empty groups for the others, no weight copies):
            # faster than the kernel from 5-8 rows; with more rows, F.linear per expert below
            rows = torch.cat([torch.arange(off[e], off[e + 1]) for e in big])
            tok = plan.token_index[rows]
            counts = torch.zeros(self.num_experts, dtype=torch.int64)
            counts[big] = plan.counts[big]
            offs = counts.cumsum(0).to(torch.int32)
            h = F.grouped_mm(x.index_select(0, tok), self.gate_up.transpose(-2, -1), offs=offs)
            y = F.grouped_mm(activate(h, self.activation).contiguous(), self.down.transpose(-2, -1), offs=offs)
            return out.index_add_(0, tok, y.to(torch.float32).mul_(sw[rows].unsqueeze(1)))
        prepacked = self._prepacked() if self.prepack and self.packed is None else None
        expand_from = 0
        if self.packed is not None:
            expand_from = NM_ROWS_GEMM_MIN_ROWS if self._nm_rows_min() else 0
            if any(plan.counts_list[e] >= expand_from for e in big):  # one scratch matrix per shape
                w_gu = torch.empty(self.packed[0][0].shape, dtype=self.dtype)
                w_dn = torch.empty(self.packed[1][0].shape, dtype=self.dtype)
        for e in big:
            tok = plan.token_index[off[e]:off[e + 1]]
            xe = x.index_select(0, tok)
            if self.packed is not None and plan.counts_list[e] < expand_from:
                h = nm_matmul(xe, self.packed[0][e], kernel="dprows")
                y = nm_matmul(activate(h, self.activation), self.packed[1][e], kernel="dprows")
            elif self.packed is not None:
                h = F.linear(xe, decompress_24(self.gate_up_values[e], self.gate_up_indices[e], w_gu))
                y = F.linear(activate(h, self.activation), decompress_24(self.down_values[e], self.down_indices[e], w_dn))
            elif prepacked is not None:
                linear = torch.ops.mkldnn._linear_pointwise
                h = linear(xe, prepacked[0][e], None, "none", [], "")
                y = linear(activate(h, self.activation), prepacked[1][e], None, "none", [], "")
            else:
                y = F.linear(activate(F.linear(xe, self.gate_up[e]), self.activation), self.down[e])
            out.index_add_(0, tok, y.to(torch.float32).mul_(sw[off[e]:off[e + 1]].unsqueeze(1)))
        return out

    def _kernel_experts(self, x, tok, wts, offs, used, kernel) -> torch.Tensor:
        # (T, D) float32 from the experts in ``used`` through the compiled kernels
        if self.activation == "swiglu":  # one fused call
            if self.packed is None:
                return decode_swiglu(self.gate_up, self.down, x, tok, wts, offs, used)
            return decode_swiglu_nm(self.gate_up_values, self.gate_up_indices, self.down_values, self.down_indices,
                                    x, tok, wts, offs, used, kernel)
        xs = x.index_select(0, tok)
        if self.packed is None:
            h = grouped_matvec(self.gate_up, xs, offs, used)
            y = grouped_matvec(self.down, activate(h, self.activation), offs, used)
        else:
            h = grouped_nm_matmul(self.gate_up_values, self.gate_up_indices, xs, offs, used, kernel)
            y = grouped_nm_matmul(self.down_values, self.down_indices, activate(h, self.activation), offs, used, kernel)
        return torch.zeros(x.shape, dtype=torch.float32).index_add_(0, tok, y.mul_(wts.to(torch.float32).unsqueeze(1)))

    def _prepacked(self):
        # oneDNN-blocked copies of each expert's weights, rebuilt when the weights change
        key = (self.gate_up._version, self.down._version, self.gate_up.data_ptr(), self.down.data_ptr(), self.gate_up.dtype)
        if self._packed_gemm is None or self._packed_gemm[0] != key:
            reorder = torch.ops.mkldnn._reorder_linear_weight
            with torch.no_grad():
                gu = [reorder(self.gate_up[e].contiguous(), None) for e in range(self.num_experts)]
                dn = [reorder(self.down[e].contiguous(), None) for e in range(self.num_experts)]
            self._packed_gemm = (key, (gu, dn))
        return self._packed_gemm[1]

    def _nm_kernel(self) -> str | None:
        # the stacked 2:4 kernel this CPU can run for these experts (None: per-expert nm_linear)
        from ..nm.kernels import available_kernels

        if self._nm != (2, 4):
            return None
        usable = [k for k in available_kernels(self.packed[0][0]) if k in ("dp", "perm")]
        usable_dn = available_kernels(self.packed[1][0])
        return next((k for k in usable if k in usable_dn), None)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation}, weights={self.weights_format}")
