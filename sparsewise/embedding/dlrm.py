"""DLRM (Naumov et al. 2019): bottom MLP on dense features, embedding bags, pairwise dot
interaction, top MLP -> click logit. Two implementations of the same model:

- :class:`DLRM` on :class:`~sparsewise.embedding.EmbeddingBagCollection` (optimizer fused into backward);
- :class:`TorchDLRM`, the plain torch way: one ``nn.EmbeddingBag(sparse=True)`` per table and
  ``torch.optim.Adagrad`` for them.

:func:`train` runs either with the same schedule (embedding Adagrad, dense Adam, same batches, same
initial weights via :meth:`TorchDLRM.from_dlrm`) and reports AUC and samples/s.

>>> from sparsewise.embedding.data import synthetic_criteo
>>> from sparsewise.embedding.dlrm import DLRM, train
>>> tr = synthetic_criteo(4096, seed=0); te = synthetic_criteo(1024, seed=1)   # doctest: +SKIP
>>> res = train(DLRM.for_data(tr, dim=16), tr, te, epochs=1)                   # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .collection import EmbeddingBagCollection
from .config import Adagrad, TableConfig
from .data import ClickData

__all__ = ["DLRM", "TorchDLRM", "TrainResult", "train", "auc", "mlp"]


def mlp(sizes: list[int], *, last_act: bool) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _interact(bottom: torch.Tensor, embs: torch.Tensor) -> torch.Tensor:
    # bottom (B, D), embs (B, F, D) -> (B, D + (F+1)F/2): bottom and the strictly-upper dot products
    z = torch.cat([bottom[:, None, :], embs], dim=1)
    dots = torch.bmm(z, z.transpose(1, 2))
    n = z.shape[1]
    iu = torch.triu_indices(n, n, offset=1)
    return torch.cat([bottom, dots[:, iu[0], iu[1]]], dim=1)


class DLRM(nn.Module):
    """DLRM whose sparse part is an EmbeddingBagCollection (every table the same ``dim``)."""

    def __init__(self, dense_in: int, ebc: EmbeddingBagCollection, *, bottom: tuple[int, ...] = (64,),
                 top: tuple[int, ...] = (128, 64), seed: int = 0):
        super().__init__()
        dims = {t.dim for t in ebc.tables}
        if len(dims) != 1:
            raise ValueError(f"the dot interaction needs one embedding dim for every table, got {sorted(dims)}")
        d = dims.pop()
        self.dim = d
        self.ebc = ebc
        self.num_features = len(ebc.feature_names)
        torch.manual_seed(seed)
        self.bottom = mlp([dense_in, *bottom, d], last_act=True)
        n = self.num_features + 1
        self.top = mlp([d + n * (n - 1) // 2, *top, 1], last_act=False)

    @classmethod
    def for_data(cls, data: ClickData, *, dim: int = 16, lr: float = 0.05, seed: int = 0, **kw) -> "DLRM":
        """One table per sparse feature of ``data``, sized from it, trained with fused Adagrad(lr)."""
        tables = [TableConfig(f"t_{f}", data.rows[f], dim, (f,), pooling="sum", init="uniform", seed=seed + i)
                  for i, f in enumerate(data.features)]
        return cls(data.dense.shape[1], EmbeddingBagCollection(tables, optimizer=Adagrad(lr=lr)), seed=seed, **kw)

    def forward(self, dense: torch.Tensor, kj) -> torch.Tensor:
        pooled = self.ebc(kj)
        embs = pooled.values.view(-1, self.num_features, self.dim)
        return self.top(_interact(self.bottom(dense), embs)).squeeze(1)

    def dense_parameters(self):
        return list(self.bottom.parameters()) + list(self.top.parameters())


class TorchDLRM(nn.Module):
    """The same model written the plain torch way (the baseline): nn.EmbeddingBag(sparse=True) per table."""

    def __init__(self, dlrm: DLRM):
        super().__init__()
        import copy

        self.dim = dlrm.dim
        self.features = dlrm.ebc.feature_names
        self.table_of = {f: t.name for t in dlrm.ebc.tables for f in t.features}
        self.bags = nn.ModuleDict()
        for t in dlrm.ebc.tables:
            eb = nn.EmbeddingBag(t.num_rows, t.dim, mode=t.pooling, sparse=True)
            with torch.no_grad():
                eb.weight.copy_(dlrm.ebc.dequantized(t.name))
            self.bags[t.name] = eb
        self.bottom = copy.deepcopy(dlrm.bottom)
        self.top = copy.deepcopy(dlrm.top)
        self.emb_lr = dlrm.ebc.optimizer.lr if dlrm.ebc.optimizer is not None else 0.05
        self.emb_eps = getattr(dlrm.ebc.optimizer, "eps", 1e-10)

    @classmethod
    def from_dlrm(cls, dlrm: DLRM) -> "TorchDLRM":
        return cls(dlrm)

    def forward(self, dense: torch.Tensor, kj) -> torch.Tensor:
        embs = []
        for f in self.features:
            v, l = kj[f]
            off = torch.zeros_like(l)
            off[1:] = torch.cumsum(l, 0)[:-1]
            embs.append(self.bags[self.table_of[f]](v, off))
        return self.top(_interact(self.bottom(dense), torch.stack(embs, dim=1))).squeeze(1)

    def dense_parameters(self):
        return list(self.bottom.parameters()) + list(self.top.parameters())


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    scores = scores.detach().to(torch.float64).flatten()
    labels = labels.flatten() > 0.5
    pos = int(labels.sum())
    neg = labels.numel() - pos
    if pos == 0 or neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    sorted_s, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg_rank = ends - (counts.to(torch.float64) - 1) / 2  # 1-based average rank of each tie group
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


@dataclass
class TrainResult:
    auc: float
    samples_per_s: float  # training throughput (forward, backward, both optimizers), first batch excluded
    seconds: float
    samples: int
    final_loss: float


def train(model: nn.Module, train_data: ClickData, test_data: ClickData, *, epochs: int = 1, batch_size: int = 256,
          dense_lr: float = 1e-3, progress: bool = False, desc: str = "train") -> TrainResult:
    """Train ``model`` (DLRM or TorchDLRM) with BCE loss; evaluate AUC on ``test_data``. Batches are
    taken in order (the data sets are already shuffled), so both models see the same batches."""
    from tqdm.auto import tqdm

    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size}, {epochs}")
    dense_opt = torch.optim.Adam(model.dense_parameters(), lr=dense_lr)
    sparse_opt = None
    if isinstance(model, TorchDLRM):
        sparse_opt = torch.optim.Adagrad(list(model.bags.parameters()), lr=model.emb_lr, eps=model.emb_eps)
    loss_fn = nn.BCEWithLogitsLoss()
    n = len(train_data)
    steps = [(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]
    model.train()
    elapsed, last, timed = 0.0, float("nan"), 0
    bar = tqdm(total=epochs * len(steps), desc=desc, disable=not progress, unit="batch")
    for ep in range(epochs):
        for k, (lo, hi) in enumerate(steps):
            dense, kj, y = train_data.batch(lo, hi)  # batch assembly is data loading, not timed
            t0 = time.perf_counter()
            dense_opt.zero_grad(set_to_none=True)
            if sparse_opt is not None:
                sparse_opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(dense, kj), y)
            loss.backward()  # DLRM: the embedding rows are updated here
            dense_opt.step()
            if sparse_opt is not None:
                sparse_opt.step()
            if ep or k:  # the first batch compiles the kernels (numba JIT): not throughput
                elapsed += time.perf_counter() - t0
                timed += hi - lo
            last = float(loss.detach())
            bar.update(1)
            if timed:
                bar.set_postfix(loss=f"{last:.4f}", samples_s=f"{timed / max(elapsed, 1e-9):,.0f}")
    bar.close()
    model.eval()
    scores = []
    with torch.no_grad():
        for lo in range(0, len(test_data), 4096):
            dense, kj, _ = test_data.batch(lo, min(len(test_data), lo + 4096))
            scores.append(model(dense, kj))
    return TrainResult(auc=auc(torch.cat(scores), test_data.labels), samples_per_s=timed / max(elapsed, 1e-9),
                       seconds=elapsed, samples=epochs * n, final_loss=last)
