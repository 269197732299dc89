"""Function layer of the embedding engine: checks a batch, lays out the kernels' arrays, picks the
backend (numba kernels or the pure-torch reference) and wires the fused optimizer into autograd.

``lookup`` is what :class:`~sparsewise.embedding.EmbeddingBagCollection` calls; it can also be
used on raw tensors. Everything that could make a kernel read out of bounds is checked before it
is read: offsets, dtypes, table shapes and contiguity before any kernel runs; ids (negative or >=
the table's rows) by the plain gather kernel itself, a block of ids before their rows, and before
the other paths run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels as K
from .config import Adam, TableConfig
from .jagged import KeyedJagged
from .reference import reference_pool, reference_update
from .storage import dequantize_rows, output_rows, storage_dtype

__all__ = ["Layout", "lookup", "default_prefetch", "KernelChooser", "torch_eligible"]


def default_prefetch(row_bytes: int) -> int:
    """Ids to prefetch ahead: about 16 KB of rows in flight per core, at least 8 and at most 64 rows
    (measured on 512 B rows: 16-32 rows ahead was best; farther ahead evicts rows before use)."""
    return int(min(64, max(8, (16 << 10) // max(1, row_bytes))))


@dataclass
class Layout:
    """The kernels' view of a collection for one order of input keys (built once, cached)."""

    keys: tuple[str, ...]  # input order
    feat_table: np.ndarray  # (F,) table index of each input feature
    feat_col: np.ndarray  # (F,) first output column of each input feature
    feat_pool: np.ndarray  # (F,)
    feat_rows: np.ndarray  # (F,)
    out_keys: tuple[str, ...]  # output order (the collection's feature order)
    out_cols: tuple[int, ...]
    out_dims: tuple[int, ...]
    width: int  # C
    has_max: bool

    @classmethod
    def build(cls, tables: list[TableConfig], keys: tuple[str, ...]) -> "Layout":
        owner, col, out_keys, out_cols, out_dims = {}, 0, [], [], []
        for t, cfg in enumerate(tables):
            for f in cfg.features:
                owner[f] = (t, col)
                out_keys.append(f)
                out_cols.append(col)
                out_dims.append(cfg.dim)
                col += cfg.dim
        unknown = [k for k in keys if k not in owner]
        missing = [k for k in owner if k not in keys]
        if unknown or missing:
            raise ValueError(f"the batch's keys do not match the collection's features: "
                             f"unknown {unknown}, missing {missing}")
        ft = np.array([owner[k][0] for k in keys], np.int64)
        return cls(
            keys=keys, feat_table=ft, feat_col=np.array([owner[k][1] for k in keys], np.int64),
            feat_pool=np.array([K.POOL_CODES[tables[t].pooling] for t in ft], np.int64),
            feat_rows=np.array([tables[t].num_rows for t in ft], np.int64),
            out_keys=tuple(out_keys), out_cols=tuple(out_cols), out_dims=tuple(out_dims), width=col,
            has_max=any(tables[t].pooling == "max" for t in ft))


def _as_np(t: torch.Tensor, dtype) -> np.ndarray:
    t = t if t.dtype == dtype else t.to(dtype)
    return t.contiguous().numpy()


def check_batch(kj: KeyedJagged):
    """Validate ``kj``'s layout; return (values, offsets, weights) as numpy arrays. The ids' range
    is checked where the path is known: the plain gather kernel checks each block of ids just
    before reading their rows (saves a pass over the ids), the other paths call
    :func:`check_ids_range` first."""
    kj.validate()
    values = _as_np(kj.values, torch.int64)
    offsets = _as_np(kj.offsets, torch.int64)
    weights = None if kj.weights is None else _as_np(kj.weights.detach(), torch.float32)
    return values, offsets, weights


def check_ids_range(values, offsets, B, layout: Layout) -> None:
    """Raise ValueError naming the first id out of its table's range, if any."""
    if values.size:
        bad = K.check_ids(values, offsets, B, layout.feat_rows)
        if bad >= 0:
            f = int(np.searchsorted(offsets, bad, side="right") - 1) // B
            raise ValueError(f"id {int(values[bad])} at values[{bad}] (feature {layout.keys[f]!r}) is out of range "
                             f"for its table of {int(layout.feat_rows[f])} rows")


def table_arrays(tables: list[TableConfig], weights: list[torch.Tensor]):
    """Addresses, strides, dims, dtype codes of the tables, after checking each stored tensor."""
    addr, stride, dim, code = [], [], [], []
    for cfg, w in zip(tables, weights):
        want_dtype = storage_dtype(cfg.dtype)
        want_shape = (cfg.num_rows, cfg.row_bytes if cfg.dtype == "int8" else cfg.dim)
        if w.dtype != want_dtype or tuple(w.shape) != want_shape or not w.is_contiguous() or w.device.type != "cpu":
            raise ValueError(f"table {cfg.name!r} is stored as {w.dtype} {tuple(w.shape)} on {w.device} "
                             f"(contiguous={w.is_contiguous()}); expected {want_dtype} {want_shape} contiguous on cpu "
                             f"(did something call .to() on the collection?)")
        addr.append(w.data_ptr())
        stride.append(cfg.row_bytes)
        dim.append(cfg.dim)
        code.append(K.DTYPE_CODES[cfg.dtype])
    return (np.array(addr, np.int64), np.array(stride, np.int64), np.array(dim, np.int64), np.array(code, np.int64))


def _forward_kernel(values, offsets, weights, B, layout, tables, tws, track, pf_dist, dedup=None):
    """``dedup``: None, or (tab_base (T,), total_rows) to run the deduplicating (sorted) gather.
    The ids' range: the plain gather checks each block of ids as it reads them (this then
    raises); the dedup gather has them checked first."""
    addr, stride, dim, code = table_arrays(tables, tws)
    # a large output on huge pages: a fresh 32 MB buffer costs 8192 page faults on 4 KB pages
    # (measured ~6 ms of a 54 ms lookup), 16 on 2 MB pages, none when a freed one is reused
    out_t = output_rows(B, layout.width)
    out = out_t.numpy()
    argmax = np.empty((B, layout.width) if track else (1, 1), np.int32)
    w = weights if weights is not None else np.empty(0, np.float32)
    if dedup is not None:
        check_ids_range(values, offsets, B, layout)
    if offsets.size > 1 and B > 0:
        args = (values, offsets, w, weights is not None, B, layout.feat_table, layout.feat_col, layout.feat_pool,
                addr, stride, dim, code, out, argmax, track, pf_dist)
        moved = int(values.size * stride.max())
        if dedup is None:
            if K.pooled_forward(*args, layout.feat_rows, moved_bytes=moved):
                check_ids_range(values, offsets, B, layout)
                raise AssertionError("the gather kernel flagged an id that check_ids accepts")
        else:
            K.pooled_forward_dedup(*args, dedup[0], dedup[1], moved_bytes=moved)
    return out_t, argmax


def _forward_reference(kj, layout, tables, tws):
    B = kj.batch_size
    out = torch.empty(B, layout.width)
    lengths = kj.lengths.to(torch.int64)
    off = kj.offsets
    for f, key in enumerate(layout.keys):
        cfg = tables[layout.feat_table[f]]
        lo, hi = int(off[f * B]), int(off[(f + 1) * B])
        rows = dequantize_rows(tws[layout.feat_table[f]], cfg.dtype, cfg.dim)
        w = None if kj.weights is None else kj.weights[lo:hi].to(torch.float32)
        col = int(layout.feat_col[f])
        out[:, col:col + cfg.dim] = reference_pool(rows, kj.values[lo:hi], lengths[f * B:(f + 1) * B], w, cfg.pooling)
    return out


def torch_eligible(layout: Layout, tables: list[TableConfig], weighted: bool, train: bool) -> bool:
    """Whether torch's own CPU kernels (FBGEMM's, behind ``F.embedding_bag`` and the quantized
    byte op) can compute this batch exactly as ours do: fp32 rows (per-id weights with sum only,
    no max when training: the fused backward needs our argmax), int8 rows with sum pooling and
    dim % 4 == 0 (then our row layout is FBGEMM's fused 8-bit layout)."""
    for t in set(int(x) for x in layout.feat_table):
        cfg = tables[t]
        if cfg.dtype == "fp32":
            if (weighted and cfg.pooling != "sum") or (train and cfg.pooling == "max"):
                return False
        elif cfg.dtype == "int8":
            if cfg.pooling != "sum" or cfg.dim % 4:
                return False
        else:
            return False
    return True


def _forward_torch(values, offsets, weights, B, layout, tables, tws):
    """Pooled output through torch's kernels, one call per feature (see :func:`torch_eligible`)."""
    import torch.nn.functional as Fnn

    vals, offs = torch.from_numpy(values), torch.from_numpy(offsets)
    w_all = None if weights is None else torch.from_numpy(weights)
    out = torch.empty(B, layout.width)
    for f in range(len(layout.keys)):
        t = int(layout.feat_table[f])
        cfg = tables[t]
        lo, hi = int(offsets[f * B]), int(offsets[(f + 1) * B])
        bag_off = offs[f * B:(f + 1) * B] - lo
        w = None if w_all is None else w_all[lo:hi]
        if cfg.dtype == "int8":
            r = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(tws[t], vals[lo:hi], bag_off, False, 0, False,
                                                                       w, None, False)
        else:
            r = Fnn.embedding_bag(vals[lo:hi], tws[t], bag_off, mode=cfg.pooling, per_sample_weights=w)
        col = int(layout.feat_col[f])
        out[:, col:col + cfg.dim] = r
    return out


class KernelChooser:
    """Picks the faster of our kernel and torch's for the batches a collection actually sees.

    Which one wins depends on the ids, not only on shapes: on tables far larger than the cache
    (uniform ids) our prefetching gather wins; when skewed ids keep the hot rows in cache, the
    work is compute-bound and FBGEMM's generated code can win. The first ``trials`` calls of each
    batch-size class alternate the two and time them; the faster by its fastest call is used for
    the next ``recheck`` calls, then they are timed again. Nothing else changes: both give the same
    values. The fastest call, not the median: noise (a first call that compiles, another process,
    a thread pool still spinning) only adds time, and with the median two slow calls of the faster
    kernel out of three picked the slower one (seen in training runs: torch, 2 ms a step slower).
    """

    def __init__(self, trials: int = 3, recheck: int = 500):
        self.trials, self.recheck = trials, recheck
        self._state: dict = {}

    def choose(self, key) -> str:
        st = self._state.setdefault(key, {"kernel": [], "torch": [], "calls": 0, "best": None})
        if st["best"] is not None:
            st["calls"] += 1
            if st["calls"] <= self.recheck:
                return st["best"]
            st.update(kernel=[], torch=[], calls=0, best=None)
        return "kernel" if len(st["kernel"]) <= len(st["torch"]) else "torch"

    def record(self, key, which: str, seconds: float) -> None:
        st = self._state[key]
        if st["best"] is not None:
            return
        st[which].append(seconds)
        if len(st["kernel"]) >= self.trials and len(st["torch"]) >= self.trials:
            fastest = {k: min(st[k]) for k in ("kernel", "torch")}
            st["best"] = min(fastest, key=fastest.get)

    def decisions(self) -> dict:
        return {k: v["best"] for k, v in self._state.items()}


def _forward_any(values, offsets, weights, B, layout, tables, tws, track, pf_dist, dedup, choice):
    """Run the kernel ``choice`` says ("kernel", "torch", or a (KernelChooser, key) pair to decide)."""
    import time

    chooser = None
    if isinstance(choice, tuple):
        chooser, key = choice
        choice = chooser.choose(key)
    t0 = time.perf_counter()
    if choice == "torch":
        check_ids_range(values, offsets, B, layout)
        out, argmax = _forward_torch(values, offsets, weights, B, layout, tables, tws), np.empty((1, 1), np.int32)
    else:
        out, argmax = _forward_kernel(values, offsets, weights, B, layout, tables, tws, track, pf_dist, dedup)
    if chooser is not None:
        chooser.record(key, choice, time.perf_counter() - t0)
    return out, argmax


class _FusedLookup(torch.autograd.Function):
    """Forward: the pooled lookup. Backward: no gradient flows to the tables; instead the
    deduplicated row gradients are applied by the optimizer in place (FBGEMM TBE semantics)."""

    @staticmethod
    def forward(ctx, anchor, state, values, offsets, weights, B, layout, pf_dist, dedup, choice):
        tables, tws = state.tables, state.weights()
        out, argmax = _forward_any(values, offsets, weights, B, layout, tables, tws, layout.has_max, pf_dist, dedup,
                                   choice)
        ctx.args = (state, values, offsets, weights, B, layout, argmax)
        return out

    @staticmethod
    def backward(ctx, grad):
        state, values, offsets, weights, B, layout, argmax = ctx.args
        if grad is None:
            return (None,) * 10
        g = grad.detach().to(torch.float32).contiguous()
        if not K.all_finite(g.numpy()):
            raise ValueError("the gradient reaching the embedding tables holds NaN or Inf; "
                             "no table or optimizer state was changed")
        state.apply_gradient(values, offsets, weights, B, layout, g.numpy(), argmax)
        return (None,) * 10


def lookup(kj: KeyedJagged, layout: Layout, state, *, train: bool, backend: str = "kernel",
           pf_dist: int | None = None, dedup: bool = False, chooser: "KernelChooser | None" = None) -> torch.Tensor:
    """Pooled (B, C) output of every feature of ``kj``. ``state`` is the collection (tables,
    stored weights, optimizer, ``tab_base``/``total_rows`` for ``dedup``). With ``train`` the
    output carries a grad_fn whose backward runs the fused optimizer. ``dedup`` reads each distinct
    row of a chunk of bags once, in address order (sorted gather)."""
    values, offsets, weights = check_batch(kj)  # ids: see check_batch
    B = kj.batch_size
    tables = state.tables
    if backend == "reference":
        check_ids_range(values, offsets, B, layout)
        if train:
            raise ValueError("backend='reference' is inference only; the reference update is reference_update()")
        return _forward_reference(kj, layout, tables, state.weights())
    if backend not in ("kernel", "torch", "auto"):
        raise ValueError(f"backend must be 'auto', 'kernel', 'torch' or 'reference', got {backend!r}")
    if backend != "kernel" and not dedup and torch_eligible(layout, tables, weights is not None, train):
        choice = "torch" if backend == "torch" else (chooser or KernelChooser(), (train, values.size.bit_length()))
    elif backend == "torch":
        raise ValueError("backend='torch' needs fp32 tables (sum with per-id weights; no max when training) or "
                         "int8 tables with sum pooling and dim % 4 == 0")
    else:
        choice = "kernel"
    if pf_dist is None:
        pf_dist = default_prefetch(max(t.row_bytes for t in tables))
    dd = (state.tab_base, state.total_rows) if dedup else None
    if train:
        return _FusedLookup.apply(state.anchor, state, values, offsets, weights, B, layout, pf_dist, dd, choice)
    out, _ = _forward_any(values, offsets, weights, B, layout, tables, state.weights(), False, pf_dist, dd, choice)
    return out


def optimizer_hparams(opt, step: int) -> np.ndarray:
    """The fused kernel's float32 hyper-parameters (lr, eps, beta1, beta2, adam_step_size)."""
    lr = float(opt.lr)
    eps = float(getattr(opt, "eps", 0.0))
    b1, b2 = (opt.betas if isinstance(opt, Adam) else (0.0, 0.0))
    step_size = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step) if isinstance(opt, Adam) else 0.0
    return np.array([lr, eps, b1, b2, step_size], np.float32)


def reference_step(tables, weights, states, opt, kj: KeyedJagged, grad: torch.Tensor, step: int) -> None:
    """Pure-torch equivalent of one fused backward + optimizer step (the tests' oracle): dense
    autograd through :func:`reference_pool`, then :func:`reference_update` on the touched rows."""
    layout = Layout.build(tables, tuple(kj.keys))
    B = kj.batch_size
    off, lengths = kj.offsets, kj.lengths
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    outs = torch.zeros(B, layout.width)
    for f in range(len(layout.keys)):
        t = int(layout.feat_table[f])
        cfg = tables[t]
        lo, hi = int(off[f * B]), int(off[(f + 1) * B])
        w = None if kj.weights is None else kj.weights[lo:hi].to(torch.float32)
        col = int(layout.feat_col[f])
        pooled = reference_pool(leaves[t], kj.values[lo:hi], lengths[f * B:(f + 1) * B], w, cfg.pooling)
        outs = outs.index_put((torch.arange(B)[:, None], torch.arange(col, col + cfg.dim)[None, :]), pooled)
    outs.backward(grad)
    for t, cfg in enumerate(tables):
        used = [f for f in range(len(layout.keys)) if layout.feat_table[f] == t]
        ids = torch.cat([kj.values[int(off[f * B]):int(off[(f + 1) * B])] for f in used]) if used else torch.empty(0, dtype=torch.int64)
        touched = torch.unique(ids.to(torch.int64))
        if touched.numel():
            with torch.no_grad():
                reference_update(weights[t], leaves[t].grad, touched, opt, states[t], step)
