"""``EmbeddingBagCollection``: many tables, one kernel call per batch, optimizer fused into backward.

>>> import torch
>>> from sparsewise.embedding import EmbeddingBagCollection, TableConfig, KeyedJagged, RowwiseAdagrad
>>> ebc = EmbeddingBagCollection([TableConfig("items", num_rows=100, dim=8, features=("item", "last_item"))],
...                              optimizer=RowwiseAdagrad(lr=0.1))
>>> kj = KeyedJagged.from_lists({"item": [[1, 2], [3]], "last_item": [[4], []]})
>>> out = ebc(kj)
>>> out.values.shape, out["last_item"].shape
(torch.Size([2, 16]), torch.Size([2, 8]))
>>> out.values.sum().backward()   # updates the rows 1, 2, 3, 4 of "items" in place
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .._util import atomic_path
from . import kernels as K
from .config import OPTIMIZERS, Adagrad, Adam, RowwiseAdagrad, SGD, TableConfig
from .functional import KernelChooser, Layout, lookup, optimizer_hparams, table_arrays
from .jagged import KeyedJagged
from .storage import alloc_rows, dequantize_rows, quantize_rows

__all__ = ["EmbeddingBagCollection", "PooledEmbeddings", "FORMAT"]

FORMAT = "sparsewise.embedding/1"


class PooledEmbeddings:
    """The pooled output: ``values`` (B, sum of dims) for the dense part, and one (B, D) view per feature."""

    __slots__ = ("keys", "dims", "_cols", "values")

    def __init__(self, values: torch.Tensor, keys: tuple[str, ...], cols: tuple[int, ...], dims: tuple[int, ...]):
        self.values, self.keys, self._cols, self.dims = values, keys, cols, dims

    def __getitem__(self, key: str) -> torch.Tensor:
        i = self.keys.index(key)
        return self.values[:, self._cols[i]:self._cols[i] + self.dims[i]]

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: self[k] for k in self.keys}

    def __repr__(self) -> str:
        return f"PooledEmbeddings(keys={list(self.keys)}, shape={tuple(self.values.shape)})"


class _Table(nn.Module):
    """Holds one table's stored rows and optimizer state as buffers (so state_dict sees them)."""

    def __init__(self, cfg: TableConfig, optimizer):
        super().__init__()
        w = alloc_rows(cfg.num_rows, cfg.dim, cfg.dtype)
        _initialise(w, cfg)
        self.register_buffer("weight", w)
        for name, kind in (optimizer.states if optimizer is not None else ()):
            shape = (cfg.num_rows,) if kind == "row" else (cfg.num_rows, cfg.dim)
            s = alloc_rows(cfg.num_rows, 1 if kind == "row" else cfg.dim, "fp32").view(shape)
            s.zero_()
            self.register_buffer(name, s)


def _initialise(w: torch.Tensor, cfg: TableConfig) -> None:
    gen = torch.Generator().manual_seed(cfg.seed)
    chunk = max(1, (64 << 20) // (4 * cfg.dim))  # bounded fp32 temporaries for any table size
    if callable(cfg.init):
        full = w if cfg.dtype == "fp32" else torch.empty(cfg.num_rows, cfg.dim)  # fp32: fill in place
        cfg.init(full)
        if full.shape != (cfg.num_rows, cfg.dim) or full.dtype != torch.float32:
            raise ValueError(f"table {cfg.name!r}: init must fill the float32 tensor in place")
        if full is not w:
            quantize_rows(full, cfg.dtype, out=w)
        return
    for lo in range(0, cfg.num_rows, chunk):
        n = min(chunk, cfg.num_rows - lo)
        if cfg.init == "uniform":
            bound = 1.0 / cfg.num_rows ** 0.5
            blk = torch.empty(n, cfg.dim).uniform_(-bound, bound, generator=gen)
        elif cfg.init == "normal":
            blk = torch.empty(n, cfg.dim).normal_(0.0, 1.0 / cfg.dim ** 0.5, generator=gen)
        else:
            blk = torch.zeros(n, cfg.dim)
        quantize_rows(blk, cfg.dtype, out=w[lo:lo + n])


class EmbeddingBagCollection(nn.Module):
    """Several embedding tables looked up together: ``forward(KeyedJagged) -> PooledEmbeddings``.

    One numba kernel call gathers and pools every feature from every table (any mix of dims,
    poolings and storage dtypes), prefetching rows ahead of the gather. With an ``optimizer``
    (``SGD``, ``Adagrad``, ``RowwiseAdagrad``, ``Adam`` from this package), training mode and
    autograd on, ``loss.backward()`` deduplicates the batch's ids (radix sort + segment reduce)
    and updates only the touched rows and their optimizer state, in place: there is no separate
    step for the tables. The dense part of a model trains with any torch optimizer as usual.
    Each backward through an output applies one update (so do not backward twice through it).

    ``prefetch``: ids to prefetch ahead (default from the row size). ``dedup=True`` switches the
    forward gather to the sorted, deduplicating kernel: each chunk of bags reads every distinct row
    once, in address order (see the README for where it pays on this machine). ``backend``:
    "kernel" (ours), "torch" (FBGEMM's kernels behind torch, where they compute the same thing:
    fp32 rows, or int8 rows with sum pooling) or "auto" (default: times both on the first live
    batches and keeps the faster, see :class:`~sparsewise.embedding.functional.KernelChooser`).
    ``forward(kj, backend="reference")`` runs the pure-torch reference.
    """

    def __init__(self, tables: Sequence[TableConfig], optimizer=None, *, prefetch: int | None = None,
                 dedup: bool = False, backend: str = "auto"):
        super().__init__()
        tables = list(tables)
        if not tables:
            raise ValueError("EmbeddingBagCollection needs at least one TableConfig")
        for t in tables:
            if not isinstance(t, TableConfig):
                raise TypeError(f"tables must be TableConfig objects, got {type(t).__name__}")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be unique, got {names}")
        seen = {}
        for t in tables:
            for f in t.features:
                if f in seen:
                    raise ValueError(f"feature {f!r} is listed by tables {seen[f]!r} and {t.name!r}; a feature reads one table")
                seen[f] = t.name
        if optimizer is not None and not isinstance(optimizer, OPTIMIZERS):
            raise TypeError(f"optimizer must be one of {[o.__name__ for o in OPTIMIZERS]} from sparsewise.embedding "
                            f"(torch.optim optimizers cannot be fused), got {type(optimizer).__name__}")
        if optimizer is not None:
            quantized = [t.name for t in tables if t.dtype != "fp32"]
            if quantized:
                raise NotImplementedError(f"training updates fp32 tables only; tables {quantized} are stored as "
                                          f"{sorted({t.dtype for t in tables if t.dtype != 'fp32'})}: train in fp32, "
                                          f"then quantize() for inference")
        if prefetch is not None and (not isinstance(prefetch, int) or prefetch < 0):
            raise ValueError(f"prefetch must be a non-negative integer (ids ahead), got {prefetch!r}")
        self.tables = tables
        self.optimizer = optimizer
        self.prefetch = prefetch
        if not isinstance(dedup, bool):
            raise TypeError(f"dedup must be True or False, got {dedup!r}")
        self.dedup = dedup
        self._update_pf = 16  # ids whose rows the fused update prefetches ahead
        if backend not in ("auto", "kernel", "torch"):
            raise ValueError(f"backend must be 'auto', 'kernel' or 'torch', got {backend!r}")
        self.backend = backend
        self.chooser = KernelChooser()
        self.embedding_tables = nn.ModuleDict({t.name: _Table(t, optimizer) for t in tables})
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # autograd needs an input that requires grad to call our backward; not a Parameter, so
        # model.parameters() (the dense optimizer's list) never sees it
        self.anchor = torch.zeros((), requires_grad=True)
        self._layouts: dict[tuple[str, ...], Layout] = {}
        tb = np.cumsum([0] + [t.num_rows for t in tables])
        self.tab_base = tb[:-1].astype(np.int64)
        self.total_rows = int(tb[-1])

    # ------------------------------------------------------------------ lookups
    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f for t in self.tables for f in t.features)

    @property
    def output_dim(self) -> int:
        return sum(t.dim * len(t.features) for t in self.tables)

    def weights(self) -> list[torch.Tensor]:
        """The stored tensors of the tables, in table order."""
        return [self.embedding_tables[t.name].weight for t in self.tables]

    def _layout(self, keys: tuple[str, ...]) -> Layout:
        lay = self._layouts.get(keys)
        if lay is None:
            lay = self._layouts[keys] = Layout.build(self.tables, keys)
        return lay

    def forward(self, kj: KeyedJagged, *, backend: str | None = None) -> PooledEmbeddings:
        if not isinstance(kj, KeyedJagged):
            raise TypeError(f"EmbeddingBagCollection takes a KeyedJagged batch, got {type(kj).__name__}")
        layout = self._layout(tuple(kj.keys))
        train = self.optimizer is not None and self.training and torch.is_grad_enabled()
        out = lookup(kj, layout, self, train=train, backend=backend or self.backend, pf_dist=self.prefetch,
                     dedup=self.dedup, chooser=self.chooser)
        # output columns follow the input key order; present them by the collection's features
        cols = {k: int(c) for k, c in zip(layout.keys, layout.feat_col)}
        keys = layout.out_keys
        return PooledEmbeddings(out, keys, tuple(cols[k] for k in keys), layout.out_dims)

    # ------------------------------------------------------------------ training
    def apply_gradient(self, values, offsets, weights, B, layout: Layout, grad: np.ndarray, argmax) -> None:
        """Fused backward + optimizer for one batch (called by autograd; grad is (B, C) float32)."""
        if values.size == 0:
            return
        opt = self.optimizer
        # the same checks the forward ran (tables still contiguous fp32 of their shapes), and the
        # state tensors', before anything changes
        addr, _, dims, _ = table_arrays(self.tables, self.weights())
        names = [n for n, _ in opt.states]
        s1 = np.zeros(len(self.tables), np.int64)
        s2 = np.zeros(len(self.tables), np.int64)
        for t, cfg in enumerate(self.tables):
            mod = self.embedding_tables[cfg.name]
            if names:
                s1[t] = _checked_state(mod, names[0], cfg).data_ptr()
            if len(names) > 1:
                s2[t] = _checked_state(mod, names[1], cfg).data_ptr()
        if values.size >= 1 << 32:  # the sort tags each id with its position in 32 bits
            raise ValueError(f"a training batch holds at most 2^32 - 1 ids, got {values.size}; split it")
        key, tag = K.sort_by_row(values, offsets, B, layout.feat_table, self.tab_base, self.total_rows,
                                 weights is not None or layout.has_max)
        self.step += 1
        w = weights if weights is not None else np.empty(0, np.float32)
        # serial or parallel by the bytes the update moves: per id (every id's gradient row is read;
        # a batch of few distinct rows still sums many rows), not per distinct row
        K.fused_update(offsets, w, weights is not None, B, layout.feat_table, layout.feat_col, layout.feat_pool,
                       key, tag, self.tab_base, grad, argmax, addr, dims, s1, s2, np.int64(opt.kind),
                       optimizer_hparams(opt, int(self.step)), int(dims.max()), self._update_pf,
                       moved_bytes=int(key.size * dims.max() * 4 * (1 + len(opt.states))))

    def optimizer_state(self, table: str) -> dict[str, torch.Tensor]:
        """The optimizer's state tensors of one table (empty for SGD)."""
        mod = self.embedding_tables[table]
        return {n: getattr(mod, n) for n, _ in (self.optimizer.states if self.optimizer else ())}

    # ------------------------------------------------------------------ inference copies
    def dequantized(self, table: str) -> torch.Tensor:
        """A table's rows as fp32 (a copy for quantized tables)."""
        cfg = next((t for t in self.tables if t.name == table), None)
        if cfg is None:
            raise KeyError(f"no table named {table!r}; tables: {[t.name for t in self.tables]}")
        return dequantize_rows(self.embedding_tables[table].weight, cfg.dtype, cfg.dim)

    def quantize(self, dtype: str | dict[str, str]) -> "EmbeddingBagCollection":
        """An inference copy with rows stored as ``dtype`` ("bf16", "fp16", "int8", "fp32"), or a
        ``{table: dtype}`` mapping. Error bounds: see ``sparsewise.embedding.storage``."""
        want = dtype if isinstance(dtype, dict) else {t.name: dtype for t in self.tables}
        unknown = set(want) - {t.name for t in self.tables}
        if unknown:
            raise KeyError(f"quantize names unknown tables {sorted(unknown)}")
        new_cfgs = []
        for t in self.tables:
            d = want.get(t.name, t.dtype)
            if t.dtype != "fp32" and d != t.dtype:
                raise ValueError(f"table {t.name!r} is already {t.dtype}; quantize from the fp32 collection")
            new_cfgs.append(_replace(t, dtype=d, init="zeros"))
        q = EmbeddingBagCollection(new_cfgs, optimizer=None, prefetch=self.prefetch, dedup=self.dedup,
                                   backend=self.backend)
        for t, nc in zip(self.tables, new_cfgs):
            src = self.embedding_tables[t.name].weight
            if nc.dtype == t.dtype:
                q.embedding_tables[t.name].weight.copy_(src)
            else:
                chunk = max(1, (64 << 20) // (4 * t.dim))
                dst = q.embedding_tables[t.name].weight
                for lo in range(0, t.num_rows, chunk):
                    quantize_rows(src[lo:lo + chunk].contiguous(), nc.dtype, out=dst[lo:lo + chunk])
        return q.eval()

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Write tables, optimizer state and configs to one safetensors file, atomically."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "tables": json.dumps([_cfg_dict(t) for t in self.tables]),
                "optimizer": json.dumps(_opt_dict(self.optimizer)), "prefetch": json.dumps(self.prefetch),
                "dedup": json.dumps(self.dedup)}
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingBagCollection":
        """Rebuild a collection saved with :meth:`save` (tables, optimizer state, step)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path} is not a sparsewise embedding checkpoint (format {meta.get('format')!r})")
                tables = [_cfg_from_dict(d) for d in json.loads(meta["tables"])]
                opt = _opt_from_dict(json.loads(meta["optimizer"]))
                ebc = cls([_replace(t, init="zeros") for t in tables], optimizer=opt, prefetch=json.loads(meta["prefetch"]),
                          dedup=bool(json.loads(meta.get("dedup", "false"))))
                state = ebc.state_dict()
                missing = set(state) - set(fh.keys())
                if missing:
                    raise ValueError(f"{path} lacks tensors {sorted(missing)}")
                for k, dst in state.items():
                    src = fh.get_tensor(k)
                    if src.shape != dst.shape or src.dtype != dst.dtype:
                        raise ValueError(f"{path}: tensor {k} is {src.dtype} {tuple(src.shape)}, expected {dst.dtype} {tuple(dst.shape)}")
                    dst.copy_(src)
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(f"cannot read embedding checkpoint {path}: {exc}") from None
        return ebc

    def extra_repr(self) -> str:
        return (f"tables={[f'{t.name}({t.num_rows}x{t.dim} {t.dtype} {t.pooling})' for t in self.tables]}, "
                f"optimizer={self.optimizer}")


def _checked_state(mod: nn.Module, name: str, cfg: TableConfig) -> torch.Tensor:
    s = getattr(mod, name)
    if s.dtype != torch.float32 or not s.is_contiguous() or s.shape[0] != cfg.num_rows:
        raise ValueError(f"optimizer state {name!r} of table {cfg.name!r} is not a contiguous fp32 tensor of {cfg.num_rows} rows")
    return s


def _replace(cfg: TableConfig, **kw) -> TableConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def _cfg_dict(t: TableConfig) -> dict:
    return {"name": t.name, "num_rows": t.num_rows, "dim": t.dim, "features": list(t.features), "pooling": t.pooling,
            "dtype": t.dtype, "init": t.init if isinstance(t.init, str) else "custom", "seed": t.seed}


def _cfg_from_dict(d: dict) -> TableConfig:
    d = dict(d)
    d["features"] = tuple(d["features"])
    if d.get("init") == "custom":
        d["init"] = "zeros"
    return TableConfig(**d)


_OPT_NAMES = {"SGD": SGD, "Adagrad": Adagrad, "RowwiseAdagrad": RowwiseAdagrad, "Adam": Adam}


def _opt_dict(opt) -> dict | None:
    if opt is None:
        return None
    import dataclasses

    return {"type": type(opt).__name__, **dataclasses.asdict(opt)}


def _opt_from_dict(d: dict | None):
    if d is None:
        return None
    d = dict(d)
    cls = _OPT_NAMES[d.pop("type")]
    if "betas" in d:
        d["betas"] = tuple(d["betas"])
    return cls(**d)
